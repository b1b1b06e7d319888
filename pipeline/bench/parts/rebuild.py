"""rebuild: after appending a definition to the same upstream .cpp in both trees, the warm
rebuild (layer cache and cache mounts of the cold build) ÷ that cold build."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.bench import upstream as up
from pipeline.bench.builds import (
    appended_definition,
    build_other,
    build_record,
    ninja_progress,
    warm_again,
)
from pipeline.bench.core import Bench, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.core.errors import BuildTimedOut, ConfigError, UsageError

GOAL_REBUILD_RATIO = 0.10


@contextlib.contextmanager
def touched(path: Path, salt: str) -> Iterator[None]:
    """`path` with one line appended for the duration; its bytes restored afterwards."""
    if not path.is_file():
        raise ConfigError(f"{path} not found", "choose another --touch file (an upstream .cpp)")
    original = path.read_bytes()
    try:
        path.write_bytes(
            original + appended_definition(path, "llama_bench_touch", re.sub(r"\W", "_", salt))
        )
        yield
    finally:
        path.write_bytes(original)


def _upstream_warm(bench: Bench, salt: str) -> Figure:
    """Upstream's warm rebuild, bounded by --upstream-rebuild-minutes (0: not run)."""
    limit = bench.options.upstream_rebuild_minutes
    if limit == 0:
        return Figure.missing(
            "not run (--upstream-rebuild-minutes 0): its Dockerfile has no compiler cache, so "
            "the `COPY . .` change recompiles everything, like its cold build"
        )
    cold = bench.cold_build("upstream")
    assert cold is not None
    # Upstream's side only now: syncing its whole tree and preparing its contexts is not free.
    theirs, _ = bench.sync("upstream")
    upstream = up.prepare(theirs.vendor_dir, bench.work)
    name = "rebuild-upstream-amd64"
    with touched(theirs.vendor_dir / bench.options.touch, salt):
        try:
            command = up.build_command(upstream, cold.tag, no_cache=False)
            return Figure.of(
                build_other(bench, name, command, None if limit is None else limit * 60)
            )
        except BuildTimedOut:
            return Figure.missing(
                f"stopped at the {limit:g} min bound (reached {ninja_progress(bench.log(name))})"
            )


def measure(bench: Bench) -> Measured:
    ours_cold, upstream_cold = bench.cold_build("ours"), bench.cold_build("upstream")
    if not ours_cold or not upstream_cold or not ours_cold.salt:
        raise UsageError("rebuild compares with the cold builds: run `--only build,rebuild`")
    # The snapshot record is taken before the touch: it is what the build is told it builds.
    project, snapshot = bench.sync("ours")
    salt = f"{bench.run_id}{int(time.time())}"
    with touched(project.vendor_dir / bench.options.touch, salt):
        again = warm_again(ours_cold, project)
        ours_warm = build_record(bench, "rebuild-ours-amd64", again, snapshot).seconds
    upstream_warm = _upstream_warm(bench, salt)
    upstream_ratio = (
        Figure.of(upstream_warm.values[0] / upstream_cold.seconds)
        if upstream_warm.ok
        else upstream_warm
    )
    metrics = (
        Metric(
            "rebuild.warm",
            f"warm rebuild after touching {bench.options.touch}",
            "s",
            Figure.of(ours_warm),
            upstream_warm,
        ),
        Metric(
            "rebuild.ratio",
            "warm rebuild ÷ cold build",
            "x",
            Figure.of(ours_warm / ours_cold.seconds),
            upstream_ratio,
            goal=Goal("<=", GOAL_REBUILD_RATIO),
        ),
    )
    notes = (
        f"one line appended to {bench.options.touch} in both trees (a definition: a comment "
        "would be a ccache hit), restored afterwards; upstream's Dockerfile has no compiler "
        "cache, so its `COPY . .` change recompiles everything",
    )
    return Measured(
        metrics, notes, {"ours_warm_s": ours_warm, "upstream_warm_s": upstream_warm.value}
    )
