"""fresh-runner: a release after a pin bump, built the way GitHub runs it. The previous release's
cpu amd64 build (the build part's cold build) exports its compiler cache (`--ccache-to`, what
release.yml saves); a synthetic pin bump, a second commit on a local mirror changing about 5 %
of the C/C++ sources where upstream's weekly changes fall (ggml-cpu, src/, tools/server), is
then built on a builder with nothing of its own (a fresh compiler-cache mount), given only what the
previous build exported: its layers (the registry cache, `--cache-to ...,mode=max` in
release.yml; here the local layer cache of that build stands in for importing it) and its
compiler cache (`--ccache-from`, what release.yml restores). ÷ upstream's cold build."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from pipeline.bench.builds import appended_definition, build_record, salted_dockerfile, warm_again
from pipeline.bench.core import MB, Bench, BenchBuild, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.core.errors import RemoteError, UsageError
from pipeline.core.project import Project
from pipeline.core.version import load_version, save_version
from pipeline.oci.ccache import ccache_bytes, ccache_hits

GOAL_FRESH_RUNNER_RATIO = 0.25
SHARE = 0.05
AREAS = ("ggml/src/ggml-cpu", "src", "tools/server")


def _git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())[:300]
        raise RemoteError(f"git {args[0]} for the synthetic pin bump failed: {detail}")
    return done.stdout.strip()


def sources(vendor: Path) -> list[str]:
    """The C/C++ files of the snapshot the image compiles from, relative to it."""
    return sorted(
        str(p.relative_to(vendor)) for p in vendor.rglob("*") if p.suffix in (".c", ".cpp")
    )


def bump_choice(files: list[str], share: float = SHARE) -> list[str]:
    """`share` of `files`, taken evenly from each of AREAS in turn (sorted, every n-th)."""
    wanted = max(len(AREAS), math.ceil(len(files) * share))
    pools = [[f for f in files if f.startswith(f"{area}/")] for area in AREAS]
    if not all(pools):
        missing = [a for a, pool in zip(AREAS, pools, strict=True) if not pool]
        raise UsageError(f"no C/C++ sources under {', '.join(missing)} in the snapshot")
    chosen: list[str] = []
    per_area = [wanted // len(AREAS) + (i < wanted % len(AREAS)) for i in range(len(AREAS))]
    for pool, count in zip(pools, per_area, strict=True):
        step = max(1, len(pool) // max(count, 1))
        chosen += pool[::step][:count]
    return chosen


def synthetic_bump(remote: str, commit: str, files: list[str], work: Path, salt: str) -> Path:
    """A clone of `remote` with one commit on top of `commit` appending a definition to each
    of `files`, on the branch bench-bump; the clone's path."""
    mirror = work / "bump-mirror"
    shutil.rmtree(mirror, ignore_errors=True)
    source = remote.removeprefix("file://")
    _git("clone", "--quiet", "--shared", "--no-checkout", source, str(mirror))
    _git("checkout", "--quiet", "-b", "bench-bump", commit, cwd=mirror)
    for name in files:
        path = mirror / name
        path.write_bytes(path.read_bytes() + appended_definition(path, "llama_bench_bump", salt))
    _git("add", "--", *files, cwd=mirror)
    identity = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    _git(
        *identity,
        "commit",
        "--quiet",
        "-m",
        f"bench: synthetic pin bump ({len(files)} files)",
        cwd=mirror,
    )
    return mirror


def bumped_project(bench: Bench, base: Project, commit: str) -> Project:
    """A work root of its own whose version.json pins `commit`, with base's templates."""
    root = bench.work / "ours-bumped"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(base.dockerfiles_dir, root / "dockerfiles")
    info = load_version(base.version_file)
    pin = replace(info.llama_cpp, commit=commit, ref=None)
    save_version(root / "version.json", replace(info, llama_cpp=pin))
    return Project(root)


def measure(bench: Bench) -> Measured:
    ours_cold, upstream_cold = bench.cold_build("ours"), bench.cold_build("upstream")
    if not ours_cold or not upstream_cold or not ours_cold.salt:
        raise UsageError(
            "fresh-runner starts from the build part's cold builds: run `--only build,fresh-runner`"
        )
    project, snapshot = bench.sync("ours")
    carried = bench.work / "ccache"
    shutil.rmtree(carried, ignore_errors=True)
    # The previous release's runner: its build, then what release.yml saves.
    build_record(
        bench, "fresh-runner-export", warm_again(ours_cold, project, ccache_to=carried), snapshot
    )
    carried_bytes = ccache_bytes(carried / "cpu-amd64")
    files = sources(project.vendor_dir)
    chosen = bump_choice(files)
    salt = f"{bench.run_id}{int(time.time())}"
    mirror = synthetic_bump(bench.options.remote, snapshot.commit, chosen, bench.work, salt)
    bumped_commit = _git("rev-parse", "HEAD", cwd=mirror)
    bumped = bumped_project(bench, project, bumped_commit)
    with bench.locked("sync bumped"):
        bumped_snapshot = bench.stages.sync(bumped, f"file://{mirror}", True)
    # The next release's runner: nothing of its own, but what the previous one exported: the
    # layers its registry cache holds (mode=max: every stage; the lab's local layer cache of
    # that build stands in for importing them) and the compiler cache. A fresh compiler-cache
    # mount; every other instruction as the previous build had it, so its layers are the ones
    # a registry cache would give (salting them all would rebuild stages a runner imports).
    fresh = salted_dockerfile(bumped, ours_cold.salt, fresh_ccache=f"fresh-{salt}")
    request = BenchBuild(
        bumped,
        "linux/amd64",
        bench.tag("ours", "cpu-amd64-bumped"),
        fresh,
        no_cache=False,
        ccache_from=carried,
    )
    record = build_record(bench, "fresh-runner-bump", request, bumped_snapshot)
    log = (bumped.logs_dir / "build-cpu-amd64.log").read_text(errors="replace")
    hits = ccache_hits(log)
    rate = Figure.of(hits[0] / hits[1]) if hits and hits[1] else Figure.missing("no ccache stats")
    metrics = (
        Metric(
            "fresh_runner.rebuild",
            f"fresh runner after a pin bump ({len(chosen)} of {len(files)} C/C++ files changed)",
            "s",
            Figure.of(record.seconds),
            Figure.of(upstream_cold.seconds),
            goal=Goal("<=", GOAL_FRESH_RUNNER_RATIO, on="ratio"),
        ),
        Metric("fresh_runner.hit_rate", "ccache hit rate on that runner", "x", rate),
        Metric(
            "fresh_runner.carried",
            "compiler cache carried (ccache export, cpu amd64)",
            "MB",
            Figure.of(carried_bytes / MB),
        ),
    )
    notes = (
        "the previous release: the build part's cold build (every CPU variant), its cache "
        "mount exported with --ccache-to; the bump: a commit on a clone of the mirror appending "
        f"a definition to {len(chosen)} files spread over {', '.join(AREAS)}; the bumped build: "
        "a fresh compiler-cache mount, the previous build's layers (what its registry cache holds; "
        "the local layer cache stands in for the import), --ccache-from the export; upstream: "
        "its cold build "
        "(its Dockerfile has no compiler cache, so a bump recompiles everything)",
    )
    details = {
        "seconds": record.seconds,
        "files_changed": chosen,
        "carried_bytes": carried_bytes,
        "hits": list(hits) if hits else None,
        "commit": bumped_commit,
    }
    return Measured(metrics, notes, details)
