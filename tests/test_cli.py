"""The command line's boundary: every numeric option refuses what is not a number in range, in
one line with exit code 2, before any stage starts."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import COMMANDS, build_parser, main
from pipeline.core.arguments import port_number, positive_int, positive_minutes, positive_seconds

NUMBER_TYPES = (port_number, positive_int, positive_minutes, positive_seconds)


def numeric_options() -> list[tuple[str, str]]:
    """(command, option) for every option of every command that takes a number."""
    found = []
    parser = build_parser()
    for action in parser._actions:  # the subcommands
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, sub in action.choices.items():
            for option in sub._actions:
                if option.type in (int, float):
                    raise AssertionError(
                        f"{command} {option.option_strings}: a bare {option.type.__name__} "
                        "accepts negative values; use one of pipeline.core.arguments' number types"
                    )
                if option.type in NUMBER_TYPES:
                    found.append((command, option.option_strings[-1]))
    return found


def test_the_numeric_options_are_found() -> None:
    options = numeric_options()
    assert ("smoke", "--timeout") in options
    assert ("smoke", "--port") in options
    assert {command for command, _ in options} <= set(COMMANDS)


@pytest.mark.parametrize(("command", "option"), numeric_options())
@pytest.mark.parametrize("value", ["-5", "0", "x", "nan", "inf"])
def test_a_numeric_option_refuses_what_is_out_of_range(
    command: str, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, f"{option}={value}"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert option in lines[0] and value in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
