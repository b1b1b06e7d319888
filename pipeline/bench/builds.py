"""How the build parts build: ours through the build stage's own function (on a copy of the
rendered Dockerfile whose cache mounts are salted), upstream's with its own Dockerfile, both
under the lab's build lock, each with its log under the report directory."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from pipeline.bench.core import Bench, BenchBuild, ColdBuild
from pipeline.core.console import err
from pipeline.core.project import Project
from pipeline.oci.buildx import run_buildx
from pipeline.records import BuildRecord
from pipeline.records.snapshot import Snapshot

_CACHE_MOUNT = re.compile(r"--mount=type=cache(?P<opts>[^\s]*)")


def salt_cache_mounts(dockerfile: str, salt: str, *, only: str = "") -> str:
    """Give every BuildKit cache mount (or only those whose id starts with `only`) an id of its
    own for this build.

    `--no-cache` disables layer reuse but not cache mounts: ccache and apt caches survive it.
    Fresh ids make a cold build really cold, without pruning the cache other builds rely on;
    the warm rebuild reuses the same ids, so it sees what the cold build left."""

    def salted(match: re.Match[str]) -> str:
        opts = match.group("opts")
        id_match = re.search(r",id=([^,\s]+)", opts)
        if only and not (id_match and id_match.group(1).startswith(only)):
            return match.group(0)
        if id_match:
            return match.group(0).replace(
                f",id={id_match.group(1)}", f",id={id_match.group(1)}-{salt}", 1
            )
        target = re.search(r",target=([^,\s]+)", opts)
        name = target.group(1).strip("/").replace("/", "-") if target else "cache"
        return f"--mount=type=cache,id={name}-{salt}{opts}"

    return _CACHE_MOUNT.sub(salted, dockerfile)


def appended_definition(path: Path, name: str, salt: str) -> bytes:
    """A line for the end of the C or C++ file `path` that changes what it compiles to: a
    definition, not a comment (ccache's preprocessor mode strips comments, so a comment would
    be a cache hit and measure no compile at all). C before C23 has no [[maybe_unused]]."""
    unused = "__attribute__((unused))" if path.suffix == ".c" else "[[maybe_unused]]"
    return f'\n{unused} static const char {name}_{salt}[] = "{salt}";\n'.encode()


def force_emulated_builder(dockerfile: str) -> str:
    """Our Dockerfile with its builder on the target platform (QEMU for arm64 on amd64):
    `--platform=$BUILDPLATFORM` stages run as the target, and the scripts' host architecture
    becomes the target's, so they take the native-compiler branch."""
    text = dockerfile.replace("--platform=$BUILDPLATFORM", "--platform=$TARGETPLATFORM")
    return re.sub(r"\$\{?BUILDARCH\}?", "$TARGETARCH", text)


def salted_dockerfile(
    project: Project, salt: str, *, emulated: bool = False, fresh_ccache: str = ""
) -> Path:
    """Our cpu Dockerfile as `nox -s render` wrote it (render's record in the work root), its
    cache mounts salted (and, for the QEMU reference build, its builder on the target). With
    `fresh_ccache`, the compiler-cache mounts alone are salted once more: a fresh runner's empty
    cache mount, every other instruction as the salted build had it (so its layers match)."""
    name = f"cpu-{salt}-{fresh_ccache}" if fresh_ccache else f"cpu-{salt}"
    path = project.build_dir / "bench" / f"{name}.Dockerfile"
    if path.is_file():  # the very file an earlier part built: only the touched source differs
        return path
    text = salt_cache_mounts(project.rendered_dockerfile("cpu").read_text(encoding="utf-8"), salt)
    if fresh_ccache:
        text = salt_cache_mounts(text, fresh_ccache, only="ccache-")
    if emulated:
        text = force_emulated_builder(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def build_record(bench: Bench, name: str, request: BenchBuild, snapshot: Snapshot) -> BuildRecord:
    """Our cpu image through the build stage (`nox -s build -- <arch> --load --tag <tag>`, in
    its release configuration: every CPU variant) and its record (`.seconds`: buildx's);
    BuildTimedOut past the request's time limit. With an `oci_path`, written there as an OCI
    layout tarball (`--oci PATH`: the release's exporter, timestamps rewritten) instead."""
    with bench.locked(name):
        logs = request.project.logs_dir
        err.print(f"bench: {name} (the build stage, {request.dockerfile.name}), log {logs}")
        return bench.stages.build(request, snapshot)


def warm_again(cold: ColdBuild, project: Project, **extra: Any) -> BenchBuild:
    """The build part's cold cpu amd64 build, again: its tag and its salted Dockerfile (so its
    cache mounts, which the cold build filled), the layer cache allowed."""
    assert cold.salt is not None
    dockerfile = salted_dockerfile(project, cold.salt)
    return BenchBuild(project, "linux/amd64", cold.tag, dockerfile, no_cache=False, **extra)


def build_other(bench: Bench, name: str, command: list[str], limit: float | None = None) -> float:
    """Another Dockerfile's build (upstream's, the native reference); its seconds."""
    with bench.locked(name):
        err.print(f"bench: {name} ({' '.join(command[:3])} ...), log {bench.log(name)}")
        return run_buildx(command, bench.log(name), name, quiet=True, time_limit=limit)


def ninja_progress(log: Path) -> str:
    """How far a stopped build got: ninja's last `[n/N]` (or make's `[ n%]`) in its log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    # Logs appended to by several runs: only the last command's output counts.
    starts = [m.start() for m in re.finditer(r"^### \S+ \$ ", text, re.MULTILINE)]
    text = text[starts[-1] :] if starts else text
    steps = re.findall(r"\[(\d+)/(\d+)\]", text)
    if steps:
        return f"{steps[-1][0]}/{steps[-1][1]} compile steps"
    percent = re.findall(r"\[\s*(\d+)%\]", text)  # make's progress (upstream's generator)
    return f"{percent[-1]}% of the compile" if percent else "before the compile"


_NINJA_STEP = re.compile(
    r"^#\d+ (?P<t>\d+(?:\.\d+)?) \[(?P<n>\d+)/(?P<total>\d+)\] (?P<what>.*)$", re.MULTILINE
)
_TARGET = re.compile(r"CMakeFiles/(?P<target>[^/\s]+)\.dir/|Linking \S+ (?:\S+/)?(?P<out>\S+)$")


def compile_time_by_target(log_text: str) -> dict[str, float]:
    """Where a build's compile went: seconds per CMake target, from the timestamps BuildKit
    puts on ninja's `[n/N]` lines (each step is charged the time until the next one starts,
    so with N jobs in parallel each figure is a share of wall time). Largest first."""
    steps = list(_NINJA_STEP.finditer(log_text))
    spent: dict[str, float] = {}
    for step, following in itertools.pairwise(steps):
        found = _TARGET.search(step["what"])
        target = (found["target"] or found["out"]) if found else "other"
        seconds = max(0.0, float(following["t"]) - float(step["t"]))
        spent[target] = spent.get(target, 0.0) + seconds
    return dict(sorted(spent.items(), key=lambda item: -item[1]))
