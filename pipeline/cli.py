"""The command-line boundary: `python -m pipeline <stage> [args]`.

Each stage registers a parser and one function here. Errors raised below become one line on
stderr and the error type's exit code; no traceback reaches the user. nox sessions call this,
and tests call `main([...])` directly.
"""

from __future__ import annotations

import argparse
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


def _commands() -> list[Command]:
    # Imported here so `--help` of one stage does not import every stage's dependencies.
    from pipeline import sync

    commands: list[Command] = [*sync.COMMANDS]
    for module_name in ("render", "build", "smoke", "publish", "bench"):
        try:
            module = __import__(f"pipeline.{module_name}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as exc:
            if exc.name == f"pipeline.{module_name}":
                continue
            raise
        commands.extend(module.COMMANDS)
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pipeline", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, add_arguments, handler in _commands():
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
        args = build_parser().parse_args(argv)
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
