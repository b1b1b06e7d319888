"""sync: the sync stage (what `nox -s sync` runs) from the local mirror, cold into an empty
root, as a no-op re-sync, and `--check`. Upstream's side is the same stage with prune off: the
whole tree its Dockerfile takes as context."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

from pipeline.bench.core import MB, Bench, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.records.snapshot import check_snapshot

GOAL_NOOP_SYNC_S = 1.0


def _timed(work: Callable[..., object], *args: object) -> float:
    started = time.monotonic()
    work(*args)
    return time.monotonic() - started


def measure(bench: Bench) -> Measured:
    figures: dict[str, dict[str, Figure]] = {}
    kept: dict[str, int] = {}
    for side in ("ours", "upstream"):
        project = bench.root(side)
        prune = side == "ours"
        cold, noop, check = [], [], []
        with bench.locked(f"sync {side}"):
            for _ in range(max(1, min(bench.options.repeats, 3))):
                shutil.rmtree(project.root / "third_party", ignore_errors=True)
                cold.append(_timed(bench.stages.sync, project, bench.options.remote, prune))
            for _ in range(bench.options.repeats):
                noop.append(_timed(bench.stages.sync, project, bench.options.remote, prune))
            for _ in range(bench.options.repeats):
                check.append(_timed(check_snapshot, project))
        kept[side] = check_snapshot(project).total_bytes
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
    return Measured(
        metrics,
        notes=(
            "the sync stage's function as `nox -s sync` calls it, in-process (no interpreter "
            "start-up); upstream's side is the same with prune off (the whole tree its "
            "Dockerfile takes)",
        ),
        details={"kept_bytes": kept},
    )
