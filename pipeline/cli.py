"""The command-line boundary: `python -m pipeline <stage> [args]`, and the composition root.

Each stage module contributes its commands (pipeline.core.options.Command). Errors raised below
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

from pipeline.core.errors import Interrupted, PipelineError, UsageError
from pipeline.core.options import Command


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError: one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


def _stage_commands(module: str) -> Callable[[], Sequence[Command]]:
    return lambda: importlib.import_module(module).COMMANDS


def _bench_commands() -> Sequence[Command]:
    from pipeline import bench, build, smoke, sync

    return bench.commands(
        bench.StageFunctions(sync=sync.sync, build=build.build, smoke=smoke.smoke)
    )


# Which loader holds each command, in the order `--help` lists them.
COMMANDS: dict[str, Callable[[], Sequence[Command]]] = {
    "sync": _stage_commands("pipeline.sync"),
    "bump": _stage_commands("pipeline.sync"),
    "render": _stage_commands("pipeline.render"),
    "build": _stage_commands("pipeline.build"),
    "smoke": _stage_commands("pipeline.smoke"),
    "publish": _stage_commands("pipeline.publish"),
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
