"""The command-line boundary: `python -m pipeline <stage> [args]`, and the composition root.

Each stage package contributes its commands (pipeline.core.arguments.Command). Errors raised below
become one line on stderr and the error type's exit code; no traceback reaches the user. nox
sessions call this, tests call `main([...])`. Only the named stage's module is imported, so a
quick command (a no-op sync) does not pay for importing docker, numpy and gguf.

Stages never import one another. bench, which drives other stages to measure them, is handed
their functions here.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from pipeline.core.arguments import Command
from pipeline.core.errors import Interrupted, PipelineError, UsageError
from pipeline.core.project import Project
from pipeline.records import BuildRecord, SmokeRecord
from pipeline.records.snapshot import Snapshot


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError: one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


def _stage_commands(module: str) -> Callable[[], Sequence[Command]]:
    return lambda: importlib.import_module(module).COMMANDS


def _bench_commands() -> Sequence[Command]:
    """bench drives sync, build and smoke to measure them: handed their functions here, in the
    requests bench speaks (a cpu image, amd64), resolved as the stages' own options."""
    from pipeline import bench, build, smoke, sync
    from pipeline.build.options import BuildOptions
    from pipeline.smoke.options import SmokeOptions
    from pipeline.sync.options import SyncOptions

    def run_sync(project: Project, remote: str, prune: bool) -> Snapshot:
        return sync.sync(SyncOptions(project, remote, prune))

    def run_build(request: bench.BenchBuild, snapshot: Snapshot) -> BuildRecord:
        options = BuildOptions.named(
            request.project,
            platforms=(request.platform,),
            backends="cpu",
            output="oci" if request.oci_path else "load",
            oci_path=request.oci_path,
            tags=(request.tag,),
            no_cache=request.no_cache,
            quiet=True,
            dockerfile=request.dockerfile,
            time_limit=request.time_limit,
            ccache_from=request.ccache_from,
            ccache_to=request.ccache_to,
        )
        (record,) = build.build(options, snapshot)
        return record

    def run_smoke(project: Project, image: str, tier: str | None) -> list[SmokeRecord]:
        options = SmokeOptions.named(
            project, platforms=("linux/amd64",), backend="cpu", image=image, tier=tier
        )
        return smoke.smoke(options, [])

    return bench.commands(bench.StageFunctions(run_sync, run_build, run_smoke))


# Which loader holds each command, in the order `--help` lists them.
COMMANDS: dict[str, Callable[[], Sequence[Command]]] = {
    "sync": _stage_commands("pipeline.sync"),
    "bump": _stage_commands("pipeline.sync"),
    "render": _stage_commands("pipeline.render"),
    "build": _stage_commands("pipeline.build"),
    "smoke": _stage_commands("pipeline.smoke"),
    "publish": _stage_commands("pipeline.publish"),
    "track": _stage_commands("pipeline.track"),
    "promote": _stage_commands("pipeline.publish"),
    "verify": _stage_commands("pipeline.verify"),
    "models": _stage_commands("pipeline.models"),
    "bench": _bench_commands,
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A parser for the command named in argv, or for every command (help, usage errors)."""
    named = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    parser = _Parser(
        prog="pipeline", description="Build, smoke-test and publish llama.cpp server images."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    loaded: dict[str, Command] = {}
    for loader in dict.fromkeys(COMMANDS[name] for name in named):
        loaded.update((command.name, command) for command in loader())
    for name in named:
        command = loaded[name]
        stage = sub.add_parser(name, help=command.summary, description=command.summary)
        command.add_arguments(stage)
        stage.set_defaults(run=command.run)
    return parser


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def guarded(work: Callable[[], int]) -> int:
    """Run `work` the way every command runs: SIGTERM unwinds like Ctrl-C (so context managers
    clean up), an expected failure is one line and its exit code, an interrupt exits 130."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return work()
    except KeyboardInterrupt:
        print("error: interrupted (nothing was left half-written)", file=sys.stderr)
        return Interrupted.exit_code
    except PipelineError as exc:
        print(exc.line(), file=sys.stderr)
        return exc.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)

    def work() -> int:
        args = build_parser(args_list).parse_args(args_list)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)

    return guarded(work)


def run() -> None:
    sys.exit(main())
