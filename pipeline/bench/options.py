"""`nox -s bench`'s options: which parts to measure, where the report goes, and how hard to
try, resolved once like every stage's."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.lock import LAB_LOCK
from pipeline.core.arguments import positive_int, positive_minutes, remote_argument, resolve_remote
from pipeline.core.errors import UsageError
from pipeline.core.project import Project
from pipeline.core.version import load_version

BENCH_PARTS = (
    "sync",
    "build",
    "rebuild",
    "fresh-runner",
    "arm64",
    "size",
    "smoke",
    "throughput",
    "reproducible",
)
DEFAULT_TOUCH = "tools/server/server.cpp"


@dataclass(frozen=True)
class BenchOptions:
    """Which parts to measure, where the report goes, and how hard to try."""

    project: Project
    parts: tuple[str, ...]
    report_dir: Path
    remote: str
    lock: Path | None
    repeats: int = 5
    qemu_minutes: float = 15
    sides: tuple[str, ...] = ("ours", "upstream")
    upstream_rebuild_minutes: float | None = None
    touch: str = DEFAULT_TOUCH
    readme: bool = False  # regenerate README.md's table

    @property
    def commit(self) -> str:
        return load_version(self.project.version_file).llama_cpp.commit


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        metavar="PARTS",
        help=f"comma-separated parts (default: all): {','.join(BENCH_PARTS)}",
    )
    parser.add_argument(
        "--report", metavar="DIR", type=Path, help="report directory (default: build/bench)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="repeats of short measurements (default: 5)"
    )
    parser.add_argument(
        "--qemu-minutes",
        type=positive_minutes,
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
        type=positive_minutes,
        help="bound of upstream's warm rebuild, a full recompile (default: none)",
    )
    parser.add_argument(
        "--touch",
        default=DEFAULT_TOUCH,
        help=f"upstream file the rebuild part changes (default: {DEFAULT_TOUCH})",
    )
    remote_argument(parser, "llama.cpp mirror to sync from")
    parser.add_argument(
        "--lock",
        default=str(LAB_LOCK),
        help="build lock file ('' when the caller already holds it; default: %(default)s)",
    )
    parser.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="regenerate README.md's table (default: only with the default report directory)",
    )


def parse_parts(text: str | None) -> tuple[str, ...]:
    """`--only size,sync` -> ("sync", "size"): the parts asked for, in their own order."""
    if not text:
        return BENCH_PARTS
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in BENCH_PARTS]
    if unknown or not chosen:
        raise UsageError(
            f"unknown part(s) {', '.join(unknown) or text!r}",
            f"choose from {', '.join(BENCH_PARTS)}",
        )
    return tuple(p for p in BENCH_PARTS if p in chosen)


def resolve_bench(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> BenchOptions:
    project = Project.discover()
    default_dir = (project.build_dir / "bench").resolve()
    report_dir = (args.report or default_dir).resolve()
    repository = load_version(project.version_file).llama_cpp.repository
    return BenchOptions(
        project=project,
        parts=parse_parts(args.only),
        report_dir=report_dir,
        remote=resolve_remote(args.remote, repository, env),
        lock=Path(args.lock) if args.lock else None,
        repeats=args.repeats,
        qemu_minutes=args.qemu_minutes,
        sides=("ours", "upstream") if args.side == "both" else (args.side,),
        upstream_rebuild_minutes=args.upstream_rebuild_minutes,
        touch=args.touch,
        readme=args.readme if args.readme is not None else report_dir == default_dir,
    )
