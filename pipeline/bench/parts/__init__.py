"""One module per measured part of `nox -s bench`, each with `measure(bench) -> Measured`.

The names are the parts' (`--only sync,size`), not the stages': no part imports a stage; each
drives the stages through `Bench.stages`.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.bench.core import Bench, Measured
from pipeline.bench.parts import (
    arm64,
    build,
    freshrunner,
    rebuild,
    reproducible,
    size,
    smoke,
    sync,
    throughput,
)

MEASURES: dict[str, Callable[[Bench], Measured]] = {
    "sync": sync.measure,
    "build": build.measure,
    "rebuild": rebuild.measure,
    "fresh-runner": freshrunner.measure,
    "arm64": arm64.measure,
    "size": size.measure,
    "smoke": smoke.measure,
    "throughput": throughput.measure,
    "reproducible": reproducible.measure,
}
