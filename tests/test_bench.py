"""The benchmark: report maths and rendering (pure), the pieces that prepare upstream's build and
our cold builds, and `python -m pipeline bench --only sync,size` run for real in the lab."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.images import SmokeImage
from fixtures.lab import REPO_ROOT, copy_project, require_lab

from pipeline.bench import upstream as bench_upstream
from pipeline.bench.builds import (
    force_emulated_builder,
    ninja_progress,
    salt_cache_mounts,
    salted_dockerfile,
)
from pipeline.bench.core import machine_info
from pipeline.bench.lock import lab_lock
from pipeline.bench.options import BENCH_PARTS, parse_parts
from pipeline.bench.parts.rebuild import touched
from pipeline.bench.parts.size import VULKAN_PARTS, loaded_files, part_weights
from pipeline.bench.report import (
    README_END,
    README_START,
    Figure,
    Goal,
    Metric,
    PartResult,
    format_figure,
    format_number,
    markdown_report,
    markdown_table,
    median,
    merge_parts,
    parse_report,
    ratio,
    replace_readme_section,
    report_json,
    spread,
    table_rows,
    write_chart,
)
from pipeline.core.errors import BuildError, BuildTimedOut, ConfigError
from pipeline.core.project import Project
from pipeline.oci.buildx import run_buildx
from pipeline.oci.elf import ImageTree

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
MACHINE = {"cpus": 2, "cpu_model": "Test CPU", "memory_gib": 8, "docker": "28.5.2"}


def part(name: str, metrics: tuple[Metric, ...], commit: str = COMMIT) -> PartResult:
    return PartResult(name, commit, "2026-11-22T05:00:00Z", 1.0, metrics, ("a note",), {"k": 1})


# --------------------------------------------------------------------------- maths


def test_an_images_weight_by_part_counts_each_file_once() -> None:
    tree = ImageTree(
        sizes={
            "/app/llama-server": 5,
            "/app/libggml-vulkan.so": 50,
            "/lib/x86_64-linux-gnu/libLLVM.so.19.1": 120,
            "/lib/x86_64-linux-gnu/libvulkan_lvp.so": 10,
            "/lib/x86_64-linux-gnu/libvulkan.so.1": 1,
            "/lib/x86_64-linux-gnu/libc.so.6": 2,
            "/bin/busybox": 1,
        }
    )
    weights = part_weights(tree, VULKAN_PARTS)
    assert list(weights.values()) == [55, 120, 10, 1, 3]
    assert sum(weights.values()) == sum(tree.sizes.values())


def test_median_odd_even_and_spread() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert spread([1.5, 0.5, 1.0]) == 1.0
    assert spread([7.0]) == 0.0
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        spread([])


def test_figure_median_spread_and_missing() -> None:
    figure = Figure.of(1, 3, 2)
    assert figure.value == 2.0 and figure.spread == 2.0 and figure.ok
    assert Figure.of(5).spread is None  # one run: no spread to report
    missing = Figure.missing("did not finish in 10 min")
    assert missing.value is None and not missing.ok


def test_ratio_unknown_or_zero_is_none() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


@pytest.mark.parametrize(
    ("op", "value", "met"),
    [
        ("<=", 60.0, True),
        ("<=", 60.1, False),
        ("<", 1.0, False),
        ("<", 0.99, True),
        (">=", 0.95, True),
        (">=", 0.94, False),
        (">", 0.95, False),
    ],
)
def test_goal_comparison_at_the_boundary(op: str, value: float, met: bool) -> None:
    target = {"<=": 60.0, "<": 1.0, ">=": 0.95, ">": 0.95}[op]
    assert Goal(op, target).met(value) is met  # type: ignore[arg-type]


def test_metric_goal_on_value_or_ratio() -> None:
    size = Metric("s", "size", "MB", Figure.of(40), Figure.of(1000), goal=Goal("<=", 60))
    assert size.ratio == 0.04 and size.met is True
    build = Metric(
        "b", "build", "s", Figure.of(600), Figure.of(1000), goal=Goal("<=", 0.5, on="ratio")
    )
    assert build.met is False  # 0.6 > 0.5, although 600 s alone says nothing
    unmeasured = Metric("q", "qemu", "s", Figure.missing("did not finish"), Figure.of(10))
    assert unmeasured.ratio is None and unmeasured.met is None
    no_goal = Metric("x", "x", "s", Figure.of(1), Figure.of(2))
    assert no_goal.met is None


# ---------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0"), (0.01234, "0.0123"), (1.234, "1.23"), (12.34, "12.3"), (1234.5, "1,234")],
)
def test_format_number_three_significant_figures(value: float, text: str) -> None:
    assert format_number(value) == text


def test_format_figure_with_spread_note_and_units() -> None:
    assert format_figure(Figure.of(1.0, 1.2, 0.8), "s") == "1.00 s ±0.20 (n=3)"
    assert format_figure(Figure.of(0.5), "x") == "0.500x"
    assert format_figure(Figure.of(31.3, note="one run"), "MB") == "31.3 MB (one run)"
    assert format_figure(Figure.missing("did not finish in 10 min"), "s") == (
        "did not finish in 10 min"
    )
    assert format_figure(Figure(), "s") == "—"


def test_markdown_table_rows_goals_and_escaping() -> None:
    metrics = (
        Metric(
            "a", "size | uncompressed", "MB", Figure.of(42), Figure.of(1021), goal=Goal("<=", 60)
        ),
        Metric(
            "b",
            "generation",
            "tok/s",
            Figure.of(9.0, 9.4, 10.0),
            Figure.of(10.0),
            other_label="native",
            goal=Goal(">=", 0.95, on="ratio"),
        ),
    )
    table = markdown_table(metrics)
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | ours | upstream (or reference) | ratio | goal | met? |"
    assert len(lines) == 4
    assert r"size \| uncompressed" in lines[2]  # a pipe in a label must not split the row
    assert "| 42.0 MB | 1,021 MB | 0.0411x | ≤ 60.0 MB | yes |" in lines[2]
    assert "10.0 tok/s (native)" in lines[3]
    assert "| 0.940x | ratio ≥ 0.950 | **no** |" in lines[3]  # the median, 9.4, decides
    # Plain rows (the console table) carry no Markdown emphasis.
    assert table_rows(metrics[1:])[0][-1] == "no"


def test_markdown_report_names_machine_date_parts_and_notes() -> None:
    metrics = (Metric("a", "m", "s", Figure.of(1), Figure.of(2)),)
    text = markdown_report([part("sync", metrics)], MACHINE, "2026-11-22T05:10:00Z")
    assert "2 cores, Test CPU, 8 GiB RAM, Docker 28.5.2" in text
    assert "Measured 2026-11-22 05:00 UTC" in text
    assert "llama.cpp 0c1e570" in text
    assert "- **sync**: a note" in text


def test_measured_span_runs_to_the_end_of_the_last_part() -> None:
    metrics = (Metric("a", "m", "s", Figure.of(1), Figure.of(2)),)
    early = PartResult("build", COMMIT, "2026-11-22T04:29:58Z", 1101.8, metrics)
    late = PartResult("rebuild", COMMIT, "2026-11-22T06:31:03Z", 881.2, metrics)
    text = markdown_report([early, late], MACHINE, "2026-11-22T07:00:00Z")
    assert "Measured 2026-11-22 04:29 to 2026-11-22 06:45 UTC" in text


# -------------------------------------------------------------------------- README


def test_readme_section_replaced_between_markers_only() -> None:
    readme = f"# Title\n\nintro\n\n{README_START}\nold table\n{README_END}\n\n## After\nkept\n"
    new = replace_readme_section(readme, "new table\n")
    assert new == f"# Title\n\nintro\n\n{README_START}\nnew table\n{README_END}\n\n## After\nkept\n"
    assert replace_readme_section(new, "new table") == new  # idempotent
    # Backslashes and group references in the body are text, not regex syntax.
    odd = replace_readme_section(readme, r"a \1 b \\ c")
    assert r"a \1 b \\ c" in odd


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{README_START}\n",
        f"{README_END}\n{README_START}\n",
        f"{README_START}\n{README_END}\n{README_START}\n{README_END}\n",
    ],
)
def test_readme_without_one_ordered_marker_pair_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        replace_readme_section(text, "table")


# --------------------------------------------------------------------- report.json


def test_report_json_round_trip_and_merge() -> None:
    metric = Metric(
        "b", "build", "s", Figure.of(600), Figure.of(1200), goal=Goal("<=", 0.5, on="ratio")
    )
    data = report_json([part("build", (metric,))], MACHINE, "2026-11-22T05:00:00Z")
    data = json.loads(json.dumps(data))  # through real JSON
    (parsed,) = parse_report(data, "report.json")
    assert parsed.metrics[0] == metric
    assert parsed.metrics[0].met is True
    assert data["parts"][0]["metrics"][0]["ratio"] == 0.5
    with pytest.raises(ConfigError):
        parse_report({"schema": 99}, "report.json")

    old_sync = part("sync", ())
    old_other_commit = part("size", (), commit="f" * 40)
    new_build = part("build", ())
    merged = merge_parts([old_sync, old_other_commit], [new_build], COMMIT, BENCH_PARTS)
    # Kept: earlier sync (same commit); dropped: a part measured on another commit.
    assert [p.name for p in merged] == ["sync", "build"]


def test_chart_is_a_png(tmp_path: Path) -> None:
    metrics = [
        Metric("a", "build", "s", Figure.of(600), Figure.of(1200), goal=Goal("<=", 0.5, "ratio")),
        Metric("b", "size", "MB", Figure.of(40), Figure.of(1000), goal=Goal("<=", 60)),
        Metric("c", "qemu", "s", Figure.missing("did not finish"), Figure.of(900)),
    ]
    path = write_chart(metrics, tmp_path / "chart.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = write_chart([], tmp_path / "empty.png", "title")
    assert empty.stat().st_size > 0


def test_only_parses_and_orders_parts() -> None:
    assert parse_parts("size,sync") == ("sync", "size")
    assert parse_parts(None) == BENCH_PARTS
    with pytest.raises(Exception, match="unknown part"):
        parse_parts("sync,nope")


# ------------------------------------------------------------- build preparation


def test_cache_mounts_get_salted_ids() -> None:
    text = (
        "RUN --mount=type=cache,id=ccache-cpu-$TARGETARCH,target=/root/.cache/ccache \\\n"
        "    --mount=type=cache,target=/var/cache/apt,sharing=locked make\n"
        "RUN --mount=type=bind,from=support,target=/support true\n"
    )
    salted = salt_cache_mounts(text, "bench-1")
    assert "id=ccache-cpu-$TARGETARCH-bench-1,target=/root/.cache/ccache" in salted
    assert "--mount=type=cache,id=var-cache-apt-bench-1,target=/var/cache/apt" in salted
    assert "--mount=type=bind,from=support,target=/support" in salted  # bind mounts untouched


def test_fresh_runner_salts_only_the_compiler_cache(tmp_path: Path) -> None:
    # A fresh runner has an empty compiler cache but imports every layer: only the ccache
    # mounts may differ from the previous build's Dockerfile, or its stages would rebuild.
    project = Project(copy_project(tmp_path / "project"))
    previous = salted_dockerfile(project, "bench-x").read_text()
    fresh = salted_dockerfile(project, "bench-x", fresh_ccache="fresh-1").read_text()
    changed = [
        (old, new)
        for old, new in zip(previous.splitlines(), fresh.splitlines(), strict=True)
        if old != new
    ]
    assert changed, "the compiler-cache mounts were not salted"
    for old, new in changed:
        assert "id=ccache-" in old
        assert new == old.replace("-bench-x,", "-bench-x-fresh-1,")
    assert "id=npm-$BUILDARCH-bench-x," in fresh  # the UI's layers stay the previous build's


def test_rendered_dockerfile_salted_and_emulated(tmp_path: Path) -> None:
    project = Project(copy_project(tmp_path / "project"))
    text = project.rendered_dockerfile("cpu").read_text()
    salted = salted_dockerfile(project, "bench-x").read_text()
    mounts = re.findall(r"--mount=type=cache\S*", salted)
    assert mounts and all(re.search(r",id=[^,]*-bench-x[,\s]", m + " ") for m in mounts)
    # Everything but the cache ids is the Dockerfile `nox -s build` builds.
    assert re.sub(r"-bench-x", "", salted) == text
    assert salt_cache_mounts(text, "bench-x") == salted
    emulated = force_emulated_builder(salted)
    assert salted_dockerfile(project, "bench-y", emulated=True).read_text() == (
        force_emulated_builder(salt_cache_mounts(text, "bench-y"))
    )
    froms = [line for line in emulated.splitlines() if line.startswith("FROM ")]
    assert any("--platform=$TARGETPLATFORM" in line for line in froms)
    assert not any("$BUILDPLATFORM" in line for line in froms)
    # The scripts see the target as the host: no cross toolchain, no CMAKE_SYSTEM_NAME.
    runs = [line for line in emulated.splitlines() if not line.startswith(("ARG ", "#"))]
    assert not any("BUILDARCH" in line for line in runs)


SAMPLE_UPSTREAM = """\
ARG UBUNTU_VERSION=24.04
FROM docker.io/node:24 AS web
RUN npm ci
FROM docker.io/ubuntu:$UBUNTU_VERSION AS build
COPY --from=web /app/tools/ui/dist tools/ui/dist
FROM docker.io/ubuntu:$UBUNTU_VERSION AS base
"""


def test_upstream_dockerfile_reading() -> None:
    assert bench_upstream.base_image_name(SAMPLE_UPSTREAM) == "docker.io/ubuntu:24.04"
    assert bench_upstream.dist_copy_path(SAMPLE_UPSTREAM) == "/app/tools/ui/dist"
    assert bench_upstream.mirror_name("docker.io/ubuntu:24.04") == (
        "127.0.0.1:5000/library/ubuntu:24.04"
    )
    assert bench_upstream.mirror_name("acme/img:1") == "127.0.0.1:5000/acme/img:1"
    with pytest.raises(ConfigError):
        bench_upstream.dist_copy_path("FROM x AS build\n")


def test_upstream_real_dockerfile_and_web_context(upstream_mirror: Path, tmp_path: Path) -> None:
    text = (upstream_mirror / bench_upstream.DOCKERFILE).read_text()
    dist = bench_upstream.dist_copy_path(text)
    assert bench_upstream.base_image_name(text).startswith("docker.io/ubuntu:")
    web = bench_upstream.write_web_context(tmp_path / "web", dist)
    files = sorted(p.name for p in (web / dist.lstrip("/")).iterdir())
    # Every file name upstream's ui-assets.cmake requires of a prebuilt dist, none empty.
    cmake = (upstream_mirror / "scripts/ui-assets.cmake").read_text()
    required = re.findall(r'base STREQUAL "([^"]+)"', cmake)
    assert required and set(required) <= set(files)
    for prefix in ("bundle", "workbox"):
        assert any(f.startswith(prefix) and f.endswith(".js") for f in files)
    assert all((web / dist.lstrip("/") / f).stat().st_size > 0 for f in files)


def test_touched_file_is_restored(tmp_path: Path) -> None:
    source = tmp_path / "server.cpp"
    source.write_bytes(b"int main() { return 0; }\n")
    with touched(source, "run-1"):
        changed = source.read_text()
        assert changed.startswith("int main()") and "llama_bench_touch_run_1" in changed
    assert source.read_bytes() == b"int main() { return 0; }\n"
    with pytest.raises(ConfigError), touched(tmp_path / "missing.cpp", "x"):
        pass


@pytest.mark.parametrize(
    ("suffix", "compiler", "std"), [(".c", "gcc", "-std=c11"), (".cpp", "g++", "-std=c++17")]
)
def test_the_appended_definition_compiles_cleanly_in_c_and_cpp(
    tmp_path: Path, suffix: str, compiler: str, std: str
) -> None:
    """The rebuild and fresh-runner parts change sources by appending a definition: it must
    compile (warning-free, as ggml's C11 and llama's C++17) and change the object file."""
    from pipeline.bench.builds import appended_definition

    require_lab(shutil.which(compiler) is not None, compiler)
    source = tmp_path / f"unit{suffix}"
    source.write_bytes(b"int unit(void) { return 1; }\n")
    objects = []
    for salt in ("", "s1"):
        if salt:
            source.write_bytes(source.read_bytes() + appended_definition(source, "bump", salt))
        done = subprocess.run(
            [
                compiler,
                std,
                "-Wall",
                "-Wextra",
                "-Wpedantic",
                "-Werror",
                "-c",
                str(source),
                "-o",
                str(tmp_path / f"unit{salt}.o"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        objects.append((tmp_path / f"unit{salt}.o").read_bytes())
    assert objects[0] != objects[1]


# ------------------------------------------------------------ measuring primitives


def test_run_buildx_records_exit_and_stops_at_the_limit(tmp_path: Path) -> None:
    """The runner every build uses (the build stage, bench's other Dockerfiles): the whole log,
    the seconds, a one-line failure naming the log, and a stop at its time limit."""
    log = tmp_path / "log"
    seconds = run_buildx([sys.executable, "-c", "print('hi')"], log, "t", quiet=True)
    assert seconds >= 0 and "hi" in log.read_text()
    started = time.monotonic()
    with pytest.raises(BuildTimedOut, match="stopped at its time limit"):
        run_buildx(["sleep", "30"], log, "t", quiet=True, time_limit=0.5)
    assert time.monotonic() - started < 20
    with pytest.raises(BuildError) as failure:
        run_buildx([sys.executable, "-c", "raise SystemExit(3)"], log, "t", quiet=True)
    assert "buildx exited with 3" in failure.value.line() and str(log) in failure.value.line()


def test_loaded_files_of_a_live_process() -> None:
    files = loaded_files(os.getpid())
    exe = os.path.realpath(sys.executable)
    assert exe in files and files[exe] == os.stat(exe).st_size
    assert any(re.search(r"/libc\.so", path) for path in files)
    assert all(size > 0 for size in files.values())


def test_lab_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with lab_lock(lock, "test"):
        probe = subprocess.run(["flock", "-n", str(lock), "true"], check=False)
        assert probe.returncode != 0  # held: `flock -n` in another process is refused
    assert subprocess.run(["flock", "-n", str(lock), "true"], check=False).returncode == 0


def test_machine_info_reads_this_machine() -> None:
    info = machine_info()
    assert info["cpus"] == os.cpu_count()
    assert info["cpu_model"] and info["cpu_model"] != "unknown CPU"


# -------------------------------------------------------------- the real thing


@pytest.mark.docker
def test_bench_sync_and_size_for_real(
    cpu_amd64: SmokeImage,
    lab_project: Project,
    upstream_mirror: Path,
    repo_root: Path,
    tmp_path: Path,
) -> None:
    """`python -m pipeline bench --only sync,size` in the lab: the report files exist and hold
    sane figures. The size part measures the cpu image `nox -s build` left (build/reports of
    the project it runs in: the session's, where the build fixture built it)."""
    report = tmp_path / "bench"
    env = {**os.environ, "LLAMA_CPP_REMOTE": f"file://{upstream_mirror}"}
    env["PIPELINE_ROOT"] = str(lab_project.root)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pipeline", "bench", "--only", "sync,size"),
            *("--report", str(report), "--repeats", "2"),
            # Not the lab's build lock: other builds may hold it for many minutes.
            *("--lock", ""),
        ],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("report.json", "report.md", "report.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0
    data = json.loads((report / "report.json").read_text())
    parts = {p["name"]: p for p in data["parts"]}
    assert set(parts) == {"sync", "size"}
    metrics = {m["key"]: m for p in data["parts"] for m in p["metrics"]}
    noop = metrics["sync.noop"]["ours"]
    assert len(noop["values"]) == 2 and 0 < noop["median"] < 30
    kept = metrics["sync.kept"]
    assert 0 < kept["ours"]["median"] < kept["other"]["median"]  # pruned < whole tree
    size = metrics["size.uncompressed"]["ours"]["median"]
    floor = metrics["size.floor"]["ours"]["median"]
    compressed = metrics["size.compressed"]["ours"]["median"]
    assert 0 < floor <= size and 0 < compressed <= size
    files = parts["size"]["details"]["ours"]["floor_files"]
    assert any(path.endswith("/llama-server") for path in files)
    assert any("libggml-cpu" in path for path in files)  # the CPU variant it loaded
    assert "| sync: no-op re-sync |" in (report / "report.md").read_text()
    assert data["machine"]["cpus"] == os.cpu_count()
    assert parts["size"]["details"]["ours"]["image"] == cpu_amd64.ref
    # The GPU images' rows are there, measured or saying what is missing.
    assert {"size.cuda.compressed", "size.rocm.compressed", "size.vulkan.uncompressed"} <= set(
        metrics
    )


def test_progress_of_a_stopped_build_reads_the_last_run(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text(
        "### 2026-11-22T04:00:00Z $ docker buildx build a\n#13 1.0 [459/459] Linking\n"
        "### exit 0 after 10.0 s\n"
        "### 2026-11-22T04:10:00Z $ docker buildx build b\n#13 2.0 [12/459] Building\n"
        "#13 3.0 [37/459] Building\n### exit None after 300.0 s\n"
    )
    assert ninja_progress(log) == "37/459 compile steps"
    log.write_text("### 2026-11-22T04:10:00Z $ docker buildx build\n#13 [ 42%] Building CXX\n")
    assert ninja_progress(log) == "42% of the compile"
    log.write_text("### 2026-11-22T04:10:00Z $ docker buildx build\n#10 apt-get update\n")
    assert ninja_progress(log) == "before the compile"


@pytest.mark.docker
def test_reproducible_compares_two_cold_builds_down_to_the_first_differing_file(
    docker_engine: None, tmp_path: Path
) -> None:
    """Real BuildKit builds through the OCI exporter the release uses (rewrite-timestamp):
    a deterministic step twice gives one digest; a step writing the time names its file."""
    from fixtures.lab import build_lock, lab_env

    from pipeline.bench.parts.reproducible import compare_layouts

    base = lab_env().get("LAB_BASE_IMAGE", "debian:trixie")

    def cold_build(name: str, step: str, n: int) -> Path:
        context = tmp_path / name
        context.mkdir(exist_ok=True)
        (context / "Dockerfile").write_text(
            f"FROM {base}\nRUN mkdir -p /data && {step} && echo same > /data/fixed\n"
        )
        layout = tmp_path / f"{name}-{n}.tar"
        command = [
            "docker",
            "buildx",
            "build",
            "--no-cache",
            "--platform",
            "linux/amd64",
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
            "--output",
            f"type=oci,dest={layout},rewrite-timestamp=true",
            str(context),
        ]
        with build_lock():
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        return layout

    same = compare_layouts(
        cold_build("same", "echo fixed > /data/stamp", 1),
        cold_build("same", "echo fixed > /data/stamp", 2),
    )
    assert same.identical, same.describe()
    assert same.describe().startswith("identical: sha256:")
    stamped = compare_layouts(
        cold_build("stamped", "date +%s%N > /data/stamp", 1),
        cold_build("stamped", "date +%s%N > /data/stamp", 2),
    )
    assert not stamped.identical
    assert stamped.files == (("data/stamp", "content"),), stamped.files
    assert stamped.describe() == "first differing file: /data/stamp (content)"


def test_the_synthetic_pin_bump_is_a_real_commit_the_sync_stage_takes(
    upstream_mirror: Path, pinned_snapshot: Path, tmp_path: Path
) -> None:
    """fresh-runner's bump: about 5 % of the snapshot's C/C++ files, spread over ggml-cpu,
    src/ and tools/server, changed in a commit on a clone of the mirror; synced by the sync
    stage like any pin."""
    from dataclasses import replace

    from pipeline.bench.parts.freshrunner import AREAS, bump_choice, sources, synthetic_bump
    from pipeline.core.version import load_version, save_version
    from pipeline.sync import sync
    from pipeline.sync.options import SyncOptions

    files = sources(pinned_snapshot / "vendor")
    chosen = bump_choice(files)
    assert 0.05 * len(files) <= len(chosen) <= 0.05 * len(files) + len(AREAS)
    assert {next(a for a in AREAS if f.startswith(a + "/")) for f in chosen} == set(AREAS)
    pinned = load_version(REPO_ROOT / "version.json").llama_cpp.commit
    mirror = synthetic_bump(f"file://{upstream_mirror}", pinned, chosen, tmp_path, "t1")
    head = subprocess.run(
        ["git", "-C", str(mirror), "rev-parse", "HEAD", "HEAD^"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert head[1] == pinned and head[0] != pinned
    root = Path(copy_project(tmp_path / "bumped"))
    info = load_version(root / "version.json")
    save_version(
        root / "version.json",
        replace(info, llama_cpp=replace(info.llama_cpp, commit=head[0], ref=None)),
    )
    snapshot = sync(SyncOptions(Project(root), f"file://{mirror}"))
    assert snapshot.commit == head[0]
    vendor = Project(root).vendor_dir
    for name in chosen:
        assert "llama_bench_bump_t1" in (vendor / name).read_text(errors="replace"), name
    print(f"\nFIGURE synthetic bump: {len(chosen)} of {len(files)} C/C++ files")


def test_compile_time_is_charged_to_cmake_targets() -> None:
    from pipeline.bench.builds import compile_time_by_target

    log = "\n".join(
        [
            "#18 10.00 [1/4] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o",
            "#18 12.50 [2/4] Building CXX object ggml/src/CMakeFiles/ggml-cpu-haswell.dir/x.cpp.o",
            "#18 20.50 [3/4] Building CXX object ggml/src/CMakeFiles/ggml-cpu-haswell.dir/y.cpp.o",
            "#18 21.00 [4/4] Linking CXX executable bin/llama-server",
            "#18 30.00 done",
        ]
    )
    assert compile_time_by_target(log) == {"ggml-cpu-haswell": 8.5, "ggml-base": 2.5}
