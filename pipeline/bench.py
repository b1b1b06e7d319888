"""`nox -s bench`: our pipeline against upstream's own image build and the physical floor.

Parts (`--only`): sync, build, rebuild, arm64, size, smoke, throughput. Each measures both
sides the same way on the same snapshot and base image, in work roots of its own under the
report directory (never the checkout's third_party/ or build/reports/), and appends a
`PartResult` to report.json; parts not re-run keep their earlier figures (for the same commit),
so a benchmark too long for one sitting can be run part by part. Everything rendered (Markdown,
chart, README table) comes from report.json alone: pipeline/bench_report.py.

Every Docker build and every timed measurement holds the lab's build lock (one compile at a
time on 2 cores); only the time inside the lock is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform as host_platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipeline import bench_report as rep
from pipeline import bench_upstream as up
from pipeline.bench_report import Figure, Goal, Metric, PartResult
from pipeline.cli import Command
from pipeline.config import Project, load_version, write_json_atomic
from pipeline.console import err, out
from pipeline.errors import (
    BuildError,
    ConfigError,
    DockerUnavailableError,
    PipelineError,
    SmokeError,
    UsageError,
)

PARTS = ("sync", "build", "rebuild", "arm64", "size", "smoke", "throughput")
DEFAULT_LOCK = Path("/tmp/lab-docker-build.lock")
DEFAULT_TOUCH = "tools/server/server.cpp"
TAG_PREFIX = "llama-bench"
MB = 1_000_000
# Goals of issue 6: the figures the project is held against.
GOAL_SIZE_MB = 60.0
GOAL_ARM64_RATIO = 1.3
GOAL_REBUILD_RATIO = 0.10
GOAL_BUILD_RATIO = 0.5
GOAL_NOOP_SYNC_S = 1.0
GOAL_SMOKE_S = 15.0
GOAL_GENERATION_RATIO = 0.95
# Throughput: one prompt for both sides, long enough that prompt processing is measurable.
THROUGHPUT_PROMPT = " ".join(["hello world, the llama server answers every smoke test"] * 10)
THROUGHPUT_PREDICT = 64
# A smoke run past this is stopped: an image whose checks all wait for their timeouts.
SMOKE_LIMIT_S = 180.0
THROUGHPUT_CTX = 2048


# ------------------------------------------------------------------------------ plumbing


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def lab_lock(path: Path | None, what: str) -> Iterator[None]:
    """The lab's build lock (the same file `flock` takes in every engineer's shell): a build or
    a measurement never shares the 2 cores with another compile."""
    if path is None:
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err.print(f"[dim]bench: waiting for the build lock {path} ({what})[/dim]")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Timed:
    seconds: float
    returncode: int | None  # None: stopped at the time limit

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a command and everything it started (the buildx client ends its build with it)."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_timed(
    command: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    limit: float | None = None,
) -> Timed:
    """Run `command` with its output appended to `log`; wall seconds and exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        handle.write(f"\n### {_now()} $ {' '.join(command)}\n".encode())
        handle.flush()
        started = time.monotonic()
        proc = subprocess.Popen(
            list(command),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            code = None
        except BaseException:
            _stop_group(proc)
            raise
        seconds = time.monotonic() - started
        handle.write(f"### exit {code} after {seconds:.1f} s\n".encode())
    return Timed(seconds, code)


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def _capture(command: Sequence[str], what: str, timeout: float = 120) -> str:
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise DockerUnavailableError(f"{command[0]} is not installed ({what})") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: `{' '.join(command)}` took over {timeout:.0f} s") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BuildError(f"{what}: {detail[-1] if detail else f'exit {result.returncode}'}")
    return result.stdout


def _image_exists(ref: str) -> bool:
    result = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", ref],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


def machine_info() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 / 1024)
    docker = None
    with contextlib.suppress(PipelineError):
        docker = _capture(["docker", "version", "-f", "{{.Server.Version}}"], "docker", 30).strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory,
        "kernel": host_platform.release(),
        "docker": docker,
        "python": host_platform.python_version(),
    }


# ---------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    """One benchmark run: where it works and writes, and what its parts hand each other."""

    project: Project
    report_dir: Path
    lock: Path | None
    repeats: int
    qemu_minutes: float
    touch: str
    upstream_rebuild_minutes: float | None
    remote: str
    commit: str
    sides: tuple[str, ...] = ("ours", "upstream")
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    previous: dict[str, PartResult] = field(default_factory=dict)
    state: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.commit[:7]

    @property
    def work(self) -> Path:
        return self.report_dir / "work"

    def log(self, name: str) -> Path:
        return self.report_dir / "logs" / f"{name}.log"

    def tag(self, side: str, what: str) -> str:
        return f"{TAG_PREFIX}/{side}:{what}-{self.short}"

    def reload(self) -> None:
        """Re-read report.json: another bench run (one side of a part) may have written it."""
        self.previous = {
            p.name: p for p in load_previous(self.report_dir) if p.commit == self.commit
        }

    def detail(self, part: str, key: str) -> Any:
        """A value an earlier part handed on: from this run, else from report.json."""
        if (part, key) in self.state:
            return self.state[(part, key)]
        previous = self.previous.get(part)
        return None if previous is None else previous.details.get(key)

    def locked(self, what: str) -> contextlib.AbstractContextManager[None]:
        return lab_lock(self.lock, what)

    # -------------------------------------------------------------- work roots

    def root(self, side: str, *, refresh: bool = False) -> Project:
        """A project root of our own (version.json, dockerfiles) for `side` (ours/upstream),
        so the checkout's snapshot and reports are never touched. Its dockerfiles/ is copied
        from the checkout by the cold build (`refresh`) and kept after: the rebuild and the
        arm64 build then use the templates the cold build used."""
        root = self.work / side
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.project.version_file, root / "version.json")
        target = root / "dockerfiles"
        if side == "ours" and (refresh or not target.is_dir()):
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(self.project.dockerfiles_dir, target)
        return Project(root)

    def ensure_snapshot(self, side: str, *, refresh: bool = False) -> Project:
        """The work root of `side` with its snapshot (pruned for ours, whole for upstream)."""
        from pipeline.sync import sync

        project = self.root(side, refresh=refresh)
        with self.locked(f"sync {side}"):
            sync(project, self.remote, prune=side == "ours")
        return project


# ------------------------------------------------------------------------------- sync


def _sync_cli(bench: Bench, root: Path, *args: str, name: str) -> float:
    timed = run_timed(
        [sys.executable, "-m", "pipeline", "sync", *args],
        bench.log(name),
        env={"PIPELINE_ROOT": str(root), "LLAMA_CPP_REMOTE": bench.remote},
        cwd=root,
    )
    if not timed.ok:
        raise PipelineError(f"sync ({' '.join(args)}) failed: {_tail(bench.log(name))}")
    return timed.seconds


def part_sync(bench: Bench) -> PartResult:
    """`python -m pipeline sync` (what `nox -s sync` runs, without nox's own start-up) from the
    local mirror: cold into an empty root, no-op re-sync, --check. Upstream's side is the same
    command with --no-prune: the whole tree its Dockerfile needs as context."""
    figures: dict[str, dict[str, Figure]] = {}
    kept: dict[str, int] = {}
    for side, flags in (("ours", []), ("upstream", ["--no-prune"])):
        root = bench.root(side).root
        cold, noop, check = [], [], []
        with bench.locked(f"sync {side}"):
            for _ in range(max(1, min(bench.repeats, 3))):
                shutil.rmtree(root / "third_party", ignore_errors=True)
                cold.append(_sync_cli(bench, root, *flags, name=f"sync-{side}"))
            for _ in range(bench.repeats):
                noop.append(_sync_cli(bench, root, *flags, name=f"sync-{side}"))
            for _ in range(bench.repeats):
                check.append(_sync_cli(bench, root, "--check", name=f"sync-{side}"))
        snapshot = json.loads((root / "third_party/llama.cpp/snapshot.json").read_text())
        kept[side] = int(snapshot["total_bytes"])
        figures[side] = {
            "cold": Figure.of(*cold),
            "noop": Figure.of(*noop),
            "check": Figure.of(*check),
        }
    o, u = figures["ours"], figures["upstream"]
    metrics = (
        Metric("sync.cold", "sync: cold, from the local mirror", "s", o["cold"], u["cold"]),
        Metric(
            "sync.noop",
            "sync: no-op re-sync",
            "s",
            o["noop"],
            u["noop"],
            goal=Goal("<", GOAL_NOOP_SYNC_S),
        ),
        Metric("sync.check", "sync --check", "s", o["check"], u["check"]),
        Metric(
            "sync.kept",
            "snapshot kept (build context)",
            "MB",
            Figure.of(kept["ours"] / MB),
            Figure.of(kept["upstream"] / MB),
        ),
    )
    return _part(
        bench,
        "sync",
        metrics,
        notes=[
            "`python -m pipeline sync` as `nox -s sync` runs it, minus nox's start-up; "
            "upstream's side is `sync --no-prune` (the whole tree its Dockerfile takes)",
        ],
        details={"kept_bytes": kept},
    )


# ------------------------------------------------------------------------------ builds


_CACHE_MOUNT = re.compile(r"--mount=type=cache(?P<opts>[^\s]*)")


def salt_cache_mounts(dockerfile: str, salt: str) -> str:
    """Give every BuildKit cache mount an id of its own for this build.

    `--no-cache` disables layer reuse but not cache mounts: ccache and apt caches survive it.
    Fresh ids make a cold build really cold, without pruning the cache other builds rely on;
    the warm rebuild reuses the same ids, so it sees what the cold build left."""

    def salted(match: re.Match[str]) -> str:
        opts = match.group("opts")
        id_match = re.search(r",id=([^,\s]+)", opts)
        if id_match:
            return match.group(0).replace(
                f",id={id_match.group(1)}", f",id={id_match.group(1)}-{salt}", 1
            )
        target = re.search(r",target=([^,\s]+)", opts)
        name = target.group(1).strip("/").replace("/", "-") if target else "cache"
        return f"--mount=type=cache,id={name}-{salt}{opts}"

    return _CACHE_MOUNT.sub(salted, dockerfile)


def force_emulated_builder(dockerfile: str) -> str:
    """Our Dockerfile with its builder on the target platform (QEMU for arm64 on amd64):
    `--platform=$BUILDPLATFORM` stages run as the target, and the scripts' host architecture
    becomes the target's, so they take the native-compiler branch."""
    text = dockerfile.replace("--platform=$BUILDPLATFORM", "--platform=$TARGETPLATFORM")
    return re.sub(r"\$\{?BUILDARCH\}?", "$TARGETARCH", text)


@dataclass(frozen=True)
class OursBuild:
    project: Project
    dockerfile: Path


def ours_build_inputs(project: Project, salt: str, *, emulated: bool) -> OursBuild:
    """Our cpu Dockerfile as `nox -s render` writes it, its cache mounts salted (and, for the
    QEMU reference build, its builder moved onto the target platform)."""
    from pipeline.matrix import load_matrix
    from pipeline.render import render_backend

    matrix = load_matrix()
    version = load_version(project.version_file)
    text = render_backend(project, matrix, matrix.backend("cpu"), version)
    text = salt_cache_mounts(text, salt)
    if emulated:
        text = force_emulated_builder(text)
    path = project.build_dir / "bench" / f"cpu-{salt}.Dockerfile"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return OursBuild(project, path)


def ours_build_command(inputs: OursBuild, platform: str, tag: str, *, no_cache: bool) -> list[str]:
    """The buildx command line `nox -s build -- <arch> --load --tag <tag>` runs (pipeline.build
    writes it), on our salted copy of the rendered Dockerfile."""
    from pipeline.build import BuildRequest, build_arguments, plan_jobs
    from pipeline.matrix import load_matrix
    from pipeline.sync import check_snapshot

    project = inputs.project
    version = load_version(project.version_file)
    request = BuildRequest(platforms=(platform,), backends=("cpu",), output="load", tags=(tag,))
    (job,) = plan_jobs(request, load_matrix(), version)
    snapshot = check_snapshot(project)
    metadata = project.build_dir / "bench" / f"metadata-{job.key}.json"
    command = build_arguments(
        project,
        job,
        version,
        snapshot.source_date_epoch,
        snapshot.commit,
        snapshot.build_number,
        request,
        metadata,
    )
    command[command.index("--file") + 1] = str(inputs.dockerfile)
    if no_cache:
        command.insert(-1, "--no-cache")
    return command


def _build(bench: Bench, command: list[str], name: str, *, limit: float | None = None) -> Timed:
    with bench.locked(name):
        err.print(f"bench: {name} ({' '.join(command[:3])} ...), log {bench.log(name)}")
        timed = run_timed(command, bench.log(name), limit=limit)
    if timed.returncode is not None and not timed.ok:
        raise BuildError(f"{name} failed after {timed.seconds:.0f} s: {_tail(bench.log(name))}")
    return timed


def part_build(bench: Bench) -> PartResult:
    """Cold builds (no layer cache, empty cache mounts) of our cpu amd64 image (release
    configuration: every CPU variant) and of upstream's `server` target, on the same base.
    `--side` builds one of them and keeps the other's earlier figure."""
    details: dict[str, Any] = {}
    substitutions: list[str] = []
    if "ours" in bench.sides:
        ours = bench.ensure_snapshot("ours", refresh=True)
        salt = f"bench-{bench.run_id}-amd64"
        inputs = ours_build_inputs(ours, salt, emulated=False)
        tag = bench.tag("ours", "cpu-amd64")
        cold = _build(
            bench,
            ours_build_command(inputs, "linux/amd64", tag, no_cache=True),
            "build-ours-amd64-cold",
        )
        details["ours"] = {"tag": tag, "salt": salt, "cold_s": cold.seconds, "at": _now()}
    if "upstream" in bench.sides:
        theirs = bench.ensure_snapshot("upstream")
        upstream = up.prepare(theirs.vendor_dir, bench.work)
        tag = bench.tag("upstream", "server")
        cold = _build(
            bench,
            up.build_command(upstream, tag, no_cache=True),
            "build-upstream-amd64-cold",
        )
        details["upstream"] = {"tag": tag, "cold_s": cold.seconds, "at": _now()}
        substitutions = upstream.substitutions()
    # The side not built now: its figure as report.json holds it at this moment.
    bench.reload()
    for side in ("ours", "upstream"):
        earlier = (bench.previous.get("build") or _EMPTY).details.get(side)
        if side not in bench.sides and earlier:
            details[side] = earlier
    if not substitutions:
        substitutions = (bench.previous.get("build") or _EMPTY).details.get(
            "upstream_substitutions", []
        )
    details["upstream_substitutions"] = substitutions
    for key, value in details.items():
        bench.state[("build", key)] = value

    def cold_figure(side: str) -> Figure:
        if side in details:
            return Figure.of(details[side]["cold_s"])
        return Figure.missing("not built yet (--side)")

    metric = Metric(
        "build.cold",
        "cold build, cpu amd64 (all CPU variants)",
        "s",
        cold_figure("ours"),
        cold_figure("upstream"),
        goal=Goal("<=", GOAL_BUILD_RATIO, on="ratio"),
    )
    return _part(
        bench,
        "build",
        (metric,),
        notes=[
            "single cold runs (no layer cache, fresh cache-mount ids) under the build lock; "
            "ours builds llama-server and its 14 x86 CPU variant modules, upstream's `cmake "
            "--build` builds every tool and example besides",
            *substitutions,
        ],
        details=details,
    )


def _touch_line(salt: str) -> str:
    # A definition, not a comment: ccache's preprocessor mode strips comments, so a comment
    # would be a cache hit and measure no compile at all.
    return f'\n[[maybe_unused]] static const char llama_bench_touch_{salt}[] = "{salt}";\n'


@contextlib.contextmanager
def touched(path: Path, salt: str) -> Iterator[None]:
    """`path` with one line appended for the duration; its bytes restored afterwards."""
    if not path.is_file():
        raise ConfigError(f"{path} not found", "choose another --touch file (an upstream .cpp)")
    original = path.read_bytes()
    try:
        path.write_bytes(original + _touch_line(re.sub(r"\W", "_", salt)).encode())
        yield
    finally:
        path.write_bytes(original)


def part_rebuild(bench: Bench) -> PartResult:
    """After appending a definition to the same upstream .cpp in both trees: warm rebuild
    (layer cache and cache mounts of the cold build) ÷ that cold build."""
    ours_build = bench.detail("build", "ours")
    upstream_build = bench.detail("build", "upstream")
    if not ours_build or not upstream_build:
        raise UsageError("rebuild compares with the cold builds: run `--only build,rebuild`")
    ours = bench.ensure_snapshot("ours")
    # The very Dockerfile the cold build used, so only the touched file differs.
    cold_dockerfile = ours.build_dir / "bench" / f"cpu-{ours_build['salt']}.Dockerfile"
    if cold_dockerfile.is_file():
        inputs = OursBuild(ours, cold_dockerfile)
    else:
        inputs = ours_build_inputs(ours, ours_build["salt"], emulated=False)
    salt = f"{bench.run_id}{int(time.time())}"
    # Made before the touch: it verifies the snapshot, which the touch is about to change.
    command = ours_build_command(inputs, "linux/amd64", ours_build["tag"], no_cache=False)
    with touched(ours.vendor_dir / bench.touch, salt):
        ours_warm = _build(bench, command, "rebuild-ours-amd64")
    limit = bench.upstream_rebuild_minutes
    if limit == 0:
        skipped = Figure.missing(
            "not run (--upstream-rebuild-minutes 0): its Dockerfile has no compiler cache, so "
            "the `COPY . .` change recompiles everything, like its cold build"
        )
        return _rebuild_result(bench, ours_warm.seconds, ours_build["cold_s"], skipped, skipped)
    # Upstream's side only now: syncing its whole tree and preparing its contexts is not free.
    theirs = bench.ensure_snapshot("upstream")
    upstream = up.prepare(theirs.vendor_dir, bench.work)
    with touched(theirs.vendor_dir / bench.touch, salt):
        upstream_warm = _build(
            bench,
            up.build_command(upstream, upstream_build["tag"], no_cache=False),
            "rebuild-upstream-amd64",
            limit=None if limit is None else limit * 60,
        )
    if upstream_warm.returncode is None:
        reached = _ninja_progress(bench.log("rebuild-upstream-amd64"))
        stopped = f"stopped at the {limit:g} min bound (reached {reached})"
        return _rebuild_result(
            bench,
            ours_warm.seconds,
            ours_build["cold_s"],
            Figure.missing(stopped),
            Figure.missing(stopped),
        )
    return _rebuild_result(
        bench,
        ours_warm.seconds,
        ours_build["cold_s"],
        Figure.of(upstream_warm.seconds),
        Figure.of(upstream_warm.seconds / upstream_build["cold_s"]),
    )


def _rebuild_result(
    bench: Bench, ours_warm: float, ours_cold: float, upstream_warm: Figure, upstream_ratio: Figure
) -> PartResult:
    metrics = (
        Metric(
            "rebuild.warm",
            f"warm rebuild after touching {bench.touch}",
            "s",
            Figure.of(ours_warm),
            upstream_warm,
        ),
        Metric(
            "rebuild.ratio",
            "warm rebuild ÷ cold build",
            "x",
            Figure.of(ours_warm / ours_cold),
            upstream_ratio,
            goal=Goal("<=", GOAL_REBUILD_RATIO),
        ),
    )
    return _part(
        bench,
        "rebuild",
        metrics,
        notes=[
            f"one line appended to {bench.touch} in both trees (a definition: a comment would "
            "be a ccache hit), restored afterwards; upstream's Dockerfile has no compiler cache, "
            "so its `COPY . .` change recompiles everything",
        ],
        details={"ours_warm_s": ours_warm, "upstream_warm_s": upstream_warm.value},
    )


def _ninja_progress(log: Path) -> str:
    """How far a stopped build got: ninja's last `[n/N]` (or make's `[ n%]`) in its log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    # Logs are appended to: only the last command's output counts.
    starts = [m.start() for m in re.finditer(r"^### \S+ \$ ", text, re.MULTILINE)]
    text = text[starts[-1] :] if starts else text
    steps = re.findall(r"\[(\d+)/(\d+)\]", text)
    if steps:
        return f"{steps[-1][0]}/{steps[-1][1]} compile steps"
    percent = re.findall(r"\[\s*(\d+)%\]", text)  # make's progress (upstream's generator)
    return f"{percent[-1]}% of the compile" if percent else "before the compile"


def _has_platform(image: str, platform: str) -> bool:
    result = subprocess.run(
        ["docker", "buildx", "imagetools", "inspect", image],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and f"Platform:  {platform}" in result.stdout


def part_arm64(bench: Bench) -> PartResult:
    """Our arm64 cold build (cross-compiled) ÷ our amd64 cold build, and the same arm64 build
    forced through QEMU (builder on the target platform), bounded."""
    ours_build = bench.detail("build", "ours")
    if not ours_build:
        raise UsageError("arm64 compares with the amd64 cold build: run `--only build,arm64`")
    ours = bench.ensure_snapshot("ours")
    salt = f"bench-{bench.run_id}-arm64"
    inputs = ours_build_inputs(ours, salt, emulated=False)
    cross = _build(
        bench,
        ours_build_command(inputs, "linux/arm64", bench.tag("ours", "cpu-arm64"), no_cache=True),
        "build-ours-arm64-cold",
    )
    limit = bench.qemu_minutes * 60
    base = up.LAB_BASE
    if not _has_platform(base, "linux/arm64"):
        qemu = Figure.missing(f"not run: {base} has no linux/arm64 image")
        qemu_s: float | None = None
    else:
        salt_q = f"bench-{bench.run_id}-arm64-qemu"
        emulated = ours_build_inputs(ours, salt_q, emulated=True)
        timed = _build(
            bench,
            ours_build_command(
                emulated, "linux/arm64", bench.tag("ours", "cpu-arm64-qemu"), no_cache=True
            ),
            "build-ours-arm64-qemu",
            limit=limit,
        )
        if timed.returncode is None:
            reached = _ninja_progress(bench.log("build-ours-arm64-qemu"))
            qemu = Figure.missing(
                f"did not finish in {bench.qemu_minutes:g} min (reached {reached})"
            )
            qemu_s = None
        else:
            qemu = Figure.of(timed.seconds)
            qemu_s = timed.seconds
    metrics = (
        Metric(
            "arm64.cross",
            "cold build, cpu arm64 (cross-compiled)",
            "s",
            Figure.of(cross.seconds),
            Figure.of(ours_build["cold_s"]),
            other_label="ours amd64",
            goal=Goal("<=", GOAL_ARM64_RATIO, on="ratio"),
        ),
        Metric(
            "arm64.qemu",
            "cold build, cpu arm64 (builder under QEMU)",
            "s",
            qemu,
            Figure.of(cross.seconds),
            other_label="cross",
        ),
    )
    return _part(
        bench,
        "arm64",
        metrics,
        notes=[
            "the QEMU reference build is our Dockerfile with `--platform=$BUILDPLATFORM` "
            f"replaced by `$TARGETPLATFORM`, bounded at {bench.qemu_minutes:g} min"
        ],
        details={"cross_s": cross.seconds, "qemu_s": qemu_s, "qemu_limit_s": limit},
    )


# ------------------------------------------------------------------------------- images


def image_sizes(ref: str) -> tuple[int, int]:
    """(uncompressed, compressed) bytes: the layers' sum from `docker history`, and what the
    containerd image store reports (the compressed content, as pushed)."""
    history = _capture(
        ["docker", "history", "--human=false", "--format", "{{.Size}}", ref], f"history {ref}"
    )
    uncompressed = sum(int(line) for line in history.split() if line.strip().isdigit())
    compressed = int(_capture(["docker", "image", "inspect", "-f", "{{.Size}}", ref], ref))
    return uncompressed, compressed


@dataclass
class Server:
    container: str
    url: str
    pid: int


@contextlib.contextmanager
def running_server(
    image: str, model: Path, name: str, *, threads: int | None = None
) -> Iterator[Server]:
    """`image`'s llama-server on `model`, configured by llama-server's own LLAMA_ARG_*
    variables so every image (ours, upstream's, a native build) is started the same way."""
    env = {
        "LLAMA_ARG_MODEL": f"/models/{model.name}",
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_PORT": "8080",
        "LLAMA_ARG_CTX_SIZE": str(THROUGHPUT_CTX),
    }
    if threads:
        env["LLAMA_ARG_THREADS"] = str(threads)
    command = ["docker", "run", "-d", "--rm", "--name", name, "-p", "127.0.0.1::8080"]
    command += ["-v", f"{model.parent}:/models:ro"]
    for key, value in env.items():
        command += ["-e", f"{key}={value}"]
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    container = _capture([*command, image], f"start {image}").strip()
    try:
        port = _capture(["docker", "port", container, "8080/tcp"], "port").split(":")[-1].strip()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            state = _capture(["docker", "inspect", "-f", "{{.State.Running}}", container], "state")
            if state.strip() != "true":
                raise SmokeError(f"{image} exited before answering /health")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SmokeError(f"{image} did not answer /health within 300 s")
            time.sleep(0.5)
        pid = int(_capture(["docker", "inspect", "-f", "{{.State.Pid}}", container], "pid"))
        yield Server(container, url, pid)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def loaded_files(pid: int, exclude: Sequence[str] = ("/models/",)) -> dict[str, int]:
    """The files a running process has mapped (its executable and every shared library it
    loaded, dlopened backends included), with their sizes, read from the host's /proc."""
    files: dict[str, int] = {}
    exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5].strip()
        if path.endswith(" (deleted)") or path.startswith(("/dev/", "/proc/", "/sys/")):
            continue
        if any(path.startswith(prefix) for prefix in exclude) or path in files:
            continue
        # The executable and shared objects only: not locale archives or other data files.
        if path != exe and ".so" not in path.rsplit("/", 1)[-1]:
            continue
        with contextlib.suppress(OSError):
            files[path] = os.stat(f"/proc/{pid}/root{path}").st_size
    return files


def _image_for(bench: Bench, side: str) -> tuple[str | None, str]:
    """The image of `side` to measure: the bench's own build if it exists, else (ours) the
    release build of build/reports; with a word on where it came from."""
    built = bench.detail("build", side)
    if built and _image_exists(built["tag"]):
        return built["tag"], "built by this benchmark's build part"
    if side == "ours":
        with contextlib.suppress(ConfigError, ImportError):
            from pipeline.build import load_build_results

            for result in reversed(load_build_results(bench.project)):
                if (
                    result.backend == "cpu"
                    and result.platform == "linux/amd64"
                    and _image_exists(result.ref)
                ):
                    return result.ref, "from build/reports (nox -s build)"
    tag = bench.tag(side, "cpu-amd64" if side == "ours" else "server")
    if _image_exists(tag):
        return tag, "left by an earlier benchmark run"
    return None, "no image: run the build part first"


def _tiny_model(bench: Bench) -> Path:
    from pipeline.model import ensure_model

    return ensure_model(bench.project)


def part_size(bench: Bench) -> PartResult:
    """Image sizes, and the floor: llama-server plus the shared libraries it has loaded once
    serving (read from /proc/<pid>/maps of the running container)."""
    model = _tiny_model(bench)
    sizes: dict[str, dict[str, Figure]] = {}
    details: dict[str, Any] = {}
    for side in ("ours", "upstream"):
        image, origin = _image_for(bench, side)
        if image is None:
            missing = Figure.missing(origin)
            sizes[side] = {"raw": missing, "packed": missing, "floor": missing}
            continue
        raw, packed = image_sizes(image)
        # No lock: what a process maps does not depend on what else runs.
        with running_server(image, model, f"bench-size-{side}-{bench.run_id}") as server:
            files = loaded_files(server.pid)
        floor = sum(files.values())
        sizes[side] = {
            "raw": Figure.of(raw / MB),
            "packed": Figure.of(packed / MB),
            "floor": Figure.of(floor / MB),
        }
        details[side] = {
            "image": image,
            "origin": origin,
            "uncompressed_bytes": raw,
            "compressed_bytes": packed,
            "floor_bytes": floor,
            "floor_files": files,
        }
    o, u = sizes["ours"], sizes["upstream"]
    metrics = (
        Metric(
            "size.uncompressed",
            "image size, uncompressed",
            "MB",
            o["raw"],
            u["raw"],
            goal=Goal("<=", GOAL_SIZE_MB),
        ),
        Metric(
            "size.compressed", "image size, compressed (pushed)", "MB", o["packed"], u["packed"]
        ),
        Metric(
            "size.floor",
            "floor: llama-server + the libraries it loads",
            "MB",
            o["floor"],
            u["floor"],
        ),
        Metric("size.overhead", "our image ÷ its floor", "MB", o["raw"], o["floor"], "floor"),
    )
    return _part(
        bench,
        "size",
        metrics,
        notes=[
            "uncompressed: sum of `docker history` layer sizes; compressed: `docker image "
            "inspect` .Size with the containerd image store; floor: files mapped by the "
            "serving llama-server process (executable, shared libraries, the CPU variant it "
            "chose), model excluded",
        ],
        details=details,
    )


def part_smoke(bench: Bench) -> PartResult:
    """Wall time of `nox -s smoke -- IMAGE` on each image (after one untimed run that makes
    nox's venv and the test model), in a root of its own so no report of the checkout moves."""
    root = bench.root("smoke")
    env = {"PIPELINE_ROOT": str(root.root)}
    envdir = bench.work / "nox"
    nox = [
        sys.executable,
        "-m",
        "nox",
        "-f",
        str(bench.project.root / "noxfile.py"),
        "--envdir",
        str(envdir),
        "-s",
        "smoke",
        "--",
    ]
    # What the session costs before any check: nox start-up and its `pip install -e .`.
    with bench.locked("smoke-overhead"):
        run_timed([*nox, "--help"], bench.log("smoke-overhead"), env=env)  # creates the venv
        overhead = [
            run_timed([*nox, "--help"], bench.log("smoke-overhead"), env=env).seconds
            for _ in range(max(1, min(bench.repeats, 3)))
        ]
    figures: dict[str, Figure] = {}
    details: dict[str, Any] = {}
    for side in ("ours", "upstream"):
        image, origin = _image_for(bench, side)
        if image is None:
            figures[side] = Figure.missing(origin)
            continue
        command = [*nox, image]
        name = f"smoke-{side}"
        times, codes = [], []
        limit = SMOKE_LIMIT_S
        with bench.locked(name):
            first = run_timed(
                command, bench.log(name), env=env, cwd=bench.project.root, limit=limit
            )
            # A failing image (upstream's: none of our entrypoint knobs) is timed once, to its
            # verdict; repeating a minute of health timeouts would measure nothing more.
            repeats = max(1, min(bench.repeats, 3)) if first.ok else 0
            if not first.ok:
                times.append(first.seconds)
                codes.append(first.returncode)
            for _ in range(repeats):
                timed = run_timed(
                    command, bench.log(name), env=env, cwd=bench.project.root, limit=limit
                )
                times.append(timed.seconds)
                codes.append(timed.returncode)
        failed = sum(code != 0 for code in codes)
        note = f"failed {failed} of {len(codes)} runs" if failed else ""
        if not first.ok:
            note = "smoke failed: time to the verdict, one run"
        if None in codes:
            figures[side] = Figure.missing(f"did not finish in {limit / 60:g} min")
        else:
            figures[side] = Figure.of(*times, note=note)
        details[side] = {"image": image, "origin": origin, "exit_codes": codes}
    metrics = (
        Metric(
            "smoke.wall",
            "nox -s smoke (wall time)",
            "s",
            figures["ours"],
            figures["upstream"],
            goal=Goal("<=", GOAL_SMOKE_S),
        ),
        Metric(
            "smoke.overhead",
            "of which nox + pip install -e . (smoke --help)",
            "s",
            Figure.of(*overhead),
        ),
    )
    notes = ["timed after one untimed warm-up run (nox venv, generated model)"]
    if details.get("upstream", {}).get("exit_codes", [0])[0] != 0:
        notes.append(
            "smoke fails on upstream's image (its entrypoint has none of our knobs, "
            "e.g. LLAMA_MODEL); the figure is the time to that verdict"
        )
    return _part(bench, "smoke", metrics, notes=notes, details=details)


# -------------------------------------------------------------------------- throughput

NATIVE_DOCKERFILE = """\
# A native build of the same commit for the throughput reference: the host's own instruction
# set (GGML_NATIVE=ON, so no GGML_BACKEND_DL), otherwise our configure flags. Same base image.
FROM debian:trixie
RUN apt-get update \\
    && apt-get install -y --no-install-recommends gcc g++ cmake ninja-build pkgconf libssl-dev \\
    && rm -rf /var/lib/apt/lists/*
COPY vendor/ /src/
RUN cmake -S /src -B /build -G Ninja {flags} \\
    && cmake --build /build --target llama-server \\
    && mkdir -p /app && cp -P /build/bin/llama-server /build/bin/*.so* /app/ \\
    && rm -rf /build
ENTRYPOINT ["/app/llama-server"]
"""


def native_dockerfile() -> str:
    from pipeline.matrix import load_matrix

    flags = dict(load_matrix().common_cmake_flags)
    flags["GGML_NATIVE"] = "ON"
    # ggml refuses NATIVE with BACKEND_DL: the one native CPU backend is linked in instead.
    flags["GGML_BACKEND_DL"] = "OFF"
    return NATIVE_DOCKERFILE.format(flags=" ".join(f"-D{k}={v}" for k, v in flags.items()))


def _completion(url: str) -> dict[str, float]:
    response = httpx.post(
        f"{url}/completion",
        json={
            "prompt": THROUGHPUT_PROMPT,
            "n_predict": THROUGHPUT_PREDICT,
            "cache_prompt": False,
            "ignore_eos": True,
            "temperature": 0,
            "seed": 0,
        },
        timeout=600,
    )
    response.raise_for_status()
    timings = response.json()["timings"]
    return {
        "prompt_per_second": float(timings["prompt_per_second"]),
        "predicted_per_second": float(timings["predicted_per_second"]),
        "prompt_n": float(timings["prompt_n"]),
        "predicted_n": float(timings["predicted_n"]),
    }


def part_throughput(bench: Bench) -> PartResult:
    """Prompt and generation tokens/s of our image against a native build of the same commit:
    same model, prompt, threads and context, one warm-up request, then the repeats."""
    from pipeline.model import ensure_model, preset

    ours_image, origin = _image_for(bench, "ours")
    if ours_image is None:
        raise UsageError(f"throughput needs our image ({origin})")
    ours = bench.ensure_snapshot("ours")
    native_tag = bench.tag("native", "cpu")
    if not _image_exists(native_tag):
        context = bench.work / "native"
        context.mkdir(parents=True, exist_ok=True)
        (context / "Dockerfile").write_text(native_dockerfile(), encoding="utf-8")
        _build(
            bench,
            [
                "docker",
                "buildx",
                "build",
                "--progress",
                "plain",
                "-f",
                str(context / "Dockerfile"),
                "--load",
                "-t",
                native_tag,
                str(ours.third_party),
            ],
            "build-native",
        )
    err.print("bench: generating the bench model (once; a few minutes)")
    model = ensure_model(bench.project, preset("bench"))
    threads = os.cpu_count() or 2
    results: dict[str, list[dict[str, float]]] = {}
    for side, image in (("ours", ours_image), ("native", native_tag)):
        with (
            bench.locked(f"throughput {side}"),
            running_server(
                image, model, f"bench-tps-{side}-{bench.run_id}", threads=threads
            ) as server,
        ):
            _completion(server.url)  # warm-up: page the weights in, repack kernels
            results[side] = [_completion(server.url) for _ in range(max(1, min(bench.repeats, 3)))]

    def figure(side: str, key: str) -> Figure:
        return Figure.of(*(r[key] for r in results[side]))

    metrics = (
        Metric(
            "throughput.prompt",
            "prompt processing",
            "tok/s",
            figure("ours", "prompt_per_second"),
            figure("native", "prompt_per_second"),
            other_label="native",
        ),
        Metric(
            "throughput.generation",
            "generation",
            "tok/s",
            figure("ours", "predicted_per_second"),
            figure("native", "predicted_per_second"),
            other_label="native",
            goal=Goal(">=", GOAL_GENERATION_RATIO, on="ratio"),
        ),
    )
    size_mb = model.stat().st_size / MB
    return _part(
        bench,
        "throughput",
        metrics,
        notes=[
            f"model {model.name} ({size_mb:.0f} MB, generated), {threads} threads, "
            f"{int(results['ours'][0]['prompt_n'])}-token prompt, {THROUGHPUT_PREDICT} tokens "
            "generated (ignore_eos), timings from /completion; native = our configure flags with "
            "GGML_NATIVE=ON, built in a container on the same base",
        ],
        details={"ours_image": ours_image, "native_image": native_tag, "runs": results},
    )


# ------------------------------------------------------------------------------ report

_EMPTY = PartResult("", "", "", 0.0, ())

PART_FUNCTIONS: dict[str, Callable[[Bench], PartResult]] = {
    "sync": part_sync,
    "build": part_build,
    "rebuild": part_rebuild,
    "arm64": part_arm64,
    "size": part_size,
    "smoke": part_smoke,
    "throughput": part_throughput,
}


def _part(
    bench: Bench,
    name: str,
    metrics: Sequence[Metric],
    *,
    notes: Sequence[str] = (),
    details: Mapping[str, Any] | None = None,
) -> PartResult:
    started, clock = bench.state[("_started", name)]
    return PartResult(
        name=name,
        commit=bench.commit,
        started=started,
        seconds=time.monotonic() - clock,
        metrics=tuple(metrics),
        notes=tuple(notes),
        details=dict(details or {}),
    )


def load_previous(report_dir: Path) -> list[PartResult]:
    path = report_dir / "report.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the previous report: {exc}") from None
    return rep.parse_report(data, str(path))


def write_outputs(
    report_dir: Path, parts: Sequence[PartResult], machine: Mapping[str, Any]
) -> list[Path]:
    generated = _now()
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = report_dir / "report.json"
    write_json_atomic(json_path, rep.report_json(parts, machine, generated))
    md_path = report_dir / "report.md"
    md_path.write_text(rep.markdown_report(parts, machine, generated), encoding="utf-8")
    metrics = [m for p in parts for m in p.metrics]
    chart = rep.write_chart(
        metrics,
        report_dir / "report.png",
        f"llama-server images: ours ÷ reference\n{rep.machine_line(machine)}",
    )
    return [json_path, md_path, chart]


def update_readme(readme: Path, parts: Sequence[PartResult], machine: Mapping[str, Any]) -> None:
    text = readme.read_text(encoding="utf-8")
    body = rep.markdown_report(parts, machine, _now(), heading="##")
    body += (
        "\nRegenerated by `nox -s bench` (report.json, report.md and a chart in build/bench/); "
        "not edited by hand.\n"
    )
    new = rep.replace_readme_section(text, body)
    if new != text:
        readme.write_text(new, encoding="utf-8")


def print_table(parts: Sequence[PartResult]) -> None:
    from rich.table import Table

    table = Table(title="benchmark", show_lines=False)
    for i, header in enumerate(rep.TABLE_HEADER):
        table.add_column(header, justify="right" if 0 < i < 4 else "left")
    for row in rep.table_rows(m for p in parts for m in p.metrics):
        table.add_row(*row)
    out.print(table)


# --------------------------------------------------------------------------------- CLI


def _parse_only(text: str | None) -> list[str]:
    if not text:
        return list(PARTS)
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise UsageError(
            f"unknown part(s) {', '.join(unknown) or text!r}", f"choose from {', '.join(PARTS)}"
        )
    return [p for p in PARTS if p in chosen]


def _lab_remote() -> str | None:
    env_file = Path(os.environ.get("LLAMA_LAB", "/opt/llama-lab")) / "env"
    with contextlib.suppress(OSError):
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "LLAMA_CPP_REMOTE" and value.strip():
                return value.strip().strip('"')
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", metavar="PARTS", help=f"comma-separated parts (default: all): {','.join(PARTS)}"
    )
    parser.add_argument(
        "--report", metavar="DIR", type=Path, help="report directory (default: build/bench)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats of short measurements (default: 5)"
    )
    parser.add_argument(
        "--qemu-minutes",
        type=float,
        default=15,
        help="bound of the arm64 build under QEMU (default: 15)",
    )
    parser.add_argument(
        "--side",
        choices=("ours", "upstream", "both"),
        default="both",
        help="build part: build one side only, keeping the other's earlier figure",
    )
    parser.add_argument(
        "--upstream-rebuild-minutes",
        type=float,
        help="bound of upstream's warm rebuild, a full recompile (default: none)",
    )
    parser.add_argument(
        "--touch",
        default=DEFAULT_TOUCH,
        help=f"upstream file the rebuild part changes (default: {DEFAULT_TOUCH})",
    )
    parser.add_argument(
        "--remote",
        metavar="URL",
        help="llama.cpp mirror to sync from (default: $LLAMA_CPP_REMOTE, then the lab's)",
    )
    parser.add_argument(
        "--lock",
        default=str(DEFAULT_LOCK),
        help="build lock file ('' when the caller already holds it; default: %(default)s)",
    )
    parser.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regenerate README.md's table (default: only with the default report directory)",
    )


def run_bench(args: argparse.Namespace) -> int:
    project = Project.discover()
    parts = _parse_only(args.only)
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if shutil.which("docker") is None:
        raise DockerUnavailableError("docker is not installed", "run .ci/provision")
    remote = args.remote or os.environ.get("LLAMA_CPP_REMOTE") or _lab_remote()
    if not remote:
        raise ConfigError(
            "no llama.cpp mirror to sync from", "pass --remote or set LLAMA_CPP_REMOTE"
        )
    report_dir = (args.report or project.build_dir / "bench").resolve()
    default_dir = report_dir == (project.build_dir / "bench").resolve()
    commit = load_version(project.version_file).llama_cpp.commit
    previous = load_previous(report_dir)
    bench = Bench(
        project=project,
        report_dir=report_dir,
        lock=Path(args.lock) if args.lock else None,
        repeats=args.repeats,
        qemu_minutes=args.qemu_minutes,
        touch=args.touch,
        upstream_rebuild_minutes=args.upstream_rebuild_minutes,
        sides=("ours", "upstream") if args.side == "both" else (args.side,),
        remote=remote,
        commit=commit,
        previous={p.name: p for p in previous if p.commit == commit},
    )
    machine = machine_info()
    done: list[PartResult] = []
    try:
        for name in parts:
            err.print(f"[bold]bench: {name}[/bold]")
            bench.state[("_started", name)] = (_now(), time.monotonic())
            result = PART_FUNCTIONS[name](bench)
            done.append(result)
            # Written after every part: a later failure or Ctrl-C keeps what was measured.
            merged = rep.merge_parts(load_previous(report_dir), done, commit, PARTS)
            write_outputs(report_dir, merged, machine)
    finally:
        # Merged with report.json as it is now: other bench runs may have added parts.
        merged = rep.merge_parts(load_previous(report_dir), done, commit, PARTS)
        if done:
            paths = write_outputs(report_dir, merged, machine)
            if args.readme or (args.readme is None and default_dir):
                update_readme(project.root / "README.md", merged, machine)
                paths.append(project.root / "README.md")
            err.print(f"bench: wrote {', '.join(str(p) for p in paths)}")
    print_table(merged)
    return 0


COMMANDS: list[Command] = [
    (
        "bench",
        "Measure sync, builds, size, smoke and throughput against upstream's own Dockerfile.",
        add_arguments,
        run_bench,
    )
]
