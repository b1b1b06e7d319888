"""The command-line boundary: `python -m pipeline <stage> [args]`.

Each stage registers a parser and one function here. Errors raised below become one line on
stderr and the error type's exit code; no traceback reaches the user. nox sessions call this,
and tests call `main([...])` directly.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from pipeline.errors import Interrupted, PipelineError, UsageError

Handler = Callable[[argparse.Namespace], int]
# Each stage module contributes: (name, help, add_arguments, handler).
Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError: one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


# Which module holds each command. Only the named stage's module is imported, so a quick
# command (a no-op sync) does not pay for importing docker, numpy and gguf.
STAGE_MODULES: dict[str, str] = {
    "sync": "pipeline.sync",
    "bump": "pipeline.sync",
    "render": "pipeline.render",
    "build": "pipeline.build",
    "smoke": "pipeline.smoke",
    "publish": "pipeline.publish",
    "bench": "pipeline.bench",
}


def _commands(names: Sequence[str]) -> list[Command]:
    commands: list[Command] = []
    for module_name in dict.fromkeys(STAGE_MODULES[name] for name in names):
        module = importlib.import_module(module_name)
        commands.extend(c for c in module.COMMANDS if c[0] in names)
    return commands


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A parser for the command named in argv, or for every command (help, usage errors)."""
    named = [argv[0]] if argv and argv[0] in STAGE_MODULES else list(STAGE_MODULES)
    parser = _Parser(
        prog="pipeline", description="Build, smoke-test and publish llama.cpp server images."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, add_arguments, handler in _commands(named):
        stage = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(stage)
        stage.set_defaults(handler=handler)
    return parser


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (docker stop, CI cancel, kill) unwinds like Ctrl-C so context managers clean up.
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser(argv).parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except KeyboardInterrupt:
        print("error: interrupted (nothing was left half-written)", file=sys.stderr)
        return Interrupted.exit_code
    except PipelineError as exc:
        print(exc.line(), file=sys.stderr)
        return exc.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    sys.exit(main())
