"""What every stage's command line shares: the `Command` a stage contributes to the CLI, the
numeric argument types, on/off switches, and where the upstream remote comes from.

Each stage owns its options (pipeline/<stage>/options.py): its arguments and their resolution
into one frozen dataclass of typed values, made once, before any work starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline.core.errors import UsageError

REMOTE_ENV = "LLAMA_CPP_REMOTE"


@dataclass(frozen=True)
class Command:
    """One `python -m pipeline <name>`: its arguments and the function that runs it."""

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _number(
    kind: type[int] | type[float], minimum: float, what: str, maximum: float = float("inf")
) -> Callable[[str], float]:
    """An argparse type: a number of `kind` in [minimum, maximum]; else a usage error naming it."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


port_number = _number(int, 1, "a port number (1-65535)", 65535)
positive_int = _number(int, 1, "a whole number of at least 1")
positive_seconds = _number(float, 0.001, "a number of seconds (up to a day)", 86_400)
positive_minutes = _number(float, 0.001, "a number of minutes (up to a day)", 1_440)
positive_rate = _number(float, 0.001, "a positive number (at most a million)", 1_000_000)


def switch(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    """An on/off option, off unless given."""
    parser.add_argument(flag, action="store_true", help=help_text)


def remote_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--remote",
        metavar="URL",
        help=f"{what} (default: ${REMOTE_ENV}, then version.json's repository)",
    )


def resolve_remote(cli: str | None, repository: str, env: Mapping[str, str] = os.environ) -> str:
    """--remote, then $LLAMA_CPP_REMOTE, then version.json's repository."""
    for candidate in (cli, env.get(REMOTE_ENV, "")):
        if candidate and candidate.strip():
            remote = candidate.strip()
            break
    else:
        remote = repository
    if remote.startswith("-"):
        raise UsageError(f"remote {remote!r} looks like an option, not a URL")
    return remote
