"""The command line's boundary: every numeric option refuses what is not a number in range, in
one line with exit code 2, before any stage starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, build_parser, main
from pipeline.core.arguments import (
    port_number,
    positive_int,
    positive_minutes,
    positive_rate,
    positive_seconds,
)

NUMBER_TYPES = (port_number, positive_int, positive_minutes, positive_rate, positive_seconds)


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


# ------------------------------------------------------------------ checked before any work
# (argv, exit code, words of the one line). {file} is an existing file, {dir} a directory.
# Docker's socket leads nowhere in these runs: a stage that reached the engine (to build,
# push or start a container) would end with exit 13 instead.
BAD_COMMAND_LINES = {
    "ccache-to-a-file": (["build", "--ccache-to", "{file}"], 2, "--ccache-to {file}: not a dir"),
    "ccache-from-a-file": (["build", "--ccache-from", "{file}"], 2, "not a directory"),
    "ccache-several-platforms": (
        ["build", "amd64", "arm64", "--push", "--tag", "127.0.0.1:9/x:1", "--ccache-to", "{dir}"],
        2,
        "one architecture's compiler cache per build",
    ),
    "host-variants-pushed": (
        ["build", "--push", "--cpu-variants", "host", "--tag", "127.0.0.1:9/x:1"],
        2,
        "never pushed (--push)",
    ),
    "tag-not-a-reference": (["build", "--tag", "Not A Tag"], 2, "--tag 'Not A Tag'"),
    "oci-a-file": (["build", "--oci", "{file}"], 2, "neither a .tar file name nor a directory"),
    "report-a-file": (["smoke", "x:1", "--report", "{file}"], 2, "--report {file}: not a dir"),
    "unknown-tier": (["smoke", "x:1", "--tier", "nope"], 2, "no smoke tier 'nope'"),
    "image-not-a-reference": (["smoke", "Not An Image"], 2, "not a repository name"),
    "revision-without-repo": (["smoke", "x:1", "--hf-revision", "abc"], 2, "--hf-revision goes"),
    "verify-not-a-reference": (["verify", "x@sha256:short"], 2, "malformed digest"),
    "identity-not-a-regex": (["verify", "x:1", "--identity", "(unclosed"], 2, "not a regular"),
    "publish-image-with-tag": (["publish", "--image", "ghcr.io/a/b:1"], 2, "--image: image name"),
    "publish-registry-path": (["publish", "--registry", "ghcr.io/acme"], 2, "--registry"),
}


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_a_bad_command_line_is_refused_before_any_work(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, code, words = BAD_COMMAND_LINES[case]
    a_file, a_dir = tmp_path / "a-file", tmp_path / "a-dir"
    a_file.write_text("")
    a_dir.mkdir()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    given = [arg.format(file=a_file, dir=a_dir) for arg in argv]
    assert main(given) == code, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err and out == "", err
    assert words.format(file=a_file) in err, err
    assert not any(a_dir.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("variable", "value"),
    [("REGISTRY_HOST", "ghcr.io/acme"), ("REGISTRY_TOKEN_HOSTS", "auth.example,bad host")],
)
def test_a_registry_variable_that_names_no_host_is_one_line(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["publish", "--dry-run", "--no-sign"]) == 2
    err = capsys.readouterr().err
    assert variable in err and err.count("\n") == 1, err
