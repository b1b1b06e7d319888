"""build: cold builds (no layer cache, empty cache mounts) of our cpu amd64 image (release
configuration: every CPU variant) and of upstream's `server` target, on the same base.
`--side` builds one of them and keeps the other's earlier figure."""

from __future__ import annotations

from typing import Any

from pipeline.bench import upstream as up
from pipeline.bench.builds import (
    build_other,
    build_record,
    compile_time_by_target,
    salted_dockerfile,
)
from pipeline.bench.core import Bench, BenchBuild, ColdBuild, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.core.process import utc_now

GOAL_BUILD_RATIO = 0.5


def measure(bench: Bench) -> Measured:
    details: dict[str, Any] = {}
    substitutions: list[str] = []
    if "ours" in bench.options.sides:
        project, snapshot = bench.sync("ours", refresh=True)
        salt = f"bench-{bench.run_id}-amd64"
        tag = bench.tag("ours", "cpu-amd64")
        request = BenchBuild(project, "linux/amd64", tag, salted_dockerfile(project, salt), True)
        seconds = build_record(bench, "build-ours-amd64-cold", request, snapshot).seconds
        details["ours"] = ColdBuild(tag, seconds, utc_now(), salt).to_json()
        log = (project.logs_dir / "build-cpu-amd64.log").read_text(errors="replace")
        details["ours_compile_by_target"] = compile_time_by_target(log)
    if "upstream" in bench.options.sides:
        theirs, _ = bench.sync("upstream")
        upstream = up.prepare(theirs.vendor_dir, bench.work)
        tag = bench.tag("upstream", "server")
        seconds = build_other(
            bench, "build-upstream-amd64-cold", up.build_command(upstream, tag, no_cache=True)
        )
        details["upstream"] = ColdBuild(tag, seconds, utc_now()).to_json()
        substitutions = upstream.substitutions()
    # The side not built now: its figure as report.json holds it at this moment.
    bench.reload()
    earlier = bench.previous.get("build")
    for side in ("ours", "upstream"):
        if side not in bench.options.sides and earlier and earlier.details.get(side):
            details[side] = earlier.details[side]
    if not substitutions and earlier:
        substitutions = list(earlier.details.get("upstream_substitutions", []))
    details["upstream_substitutions"] = substitutions

    def cold_figure(side: str) -> Figure:
        built = ColdBuild.from_json(details.get(side))
        return Figure.of(built.seconds) if built else Figure.missing("not built yet (--side)")

    metric = Metric(
        "build.cold",
        "cold build, cpu amd64 (all CPU variants)",
        "s",
        cold_figure("ours"),
        cold_figure("upstream"),
        goal=Goal("<=", GOAL_BUILD_RATIO, on="ratio"),
    )
    spent = details.get("ours_compile_by_target") or {}
    where = ", ".join(f"{target} {seconds:.0f} s" for target, seconds in list(spent.items())[:6])
    notes = (
        *(
            (f"our compile by CMake target (ninja's steps in the build log): {where}",)
            if where
            else ()
        ),
        "single cold runs (no layer cache, fresh cache-mount ids) under the build lock; ours "
        "through the build stage, llama-server and its 14 x86 CPU variant modules; upstream's "
        "`cmake --build` builds every tool and example besides",
        *substitutions,
    )
    return Measured((metric,), notes, details)
