"""Shared fixtures. Lab-dependent parts (Docker engine, upstream mirror, registry) come from
.ci/provision; on CI (CI=true) their absence fails the run instead of skipping it, so a broken
provision can never turn into a green run of skips.

Areas append their own shared fixtures below in a marked section.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def lab_dir() -> Path:
    return Path(os.environ.get("LLAMA_LAB", "/opt/llama-lab"))


def lab_env() -> dict[str, str]:
    """KEY=value lines .ci/provision writes to $LLAMA_LAB/env."""
    env_file = lab_dir() / "env"
    values: dict[str, str] = {}
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip('"')
    return values


def require_lab(available: bool, what: str) -> None:
    """Skip with the reason when this machine lacks a lab part; on CI, fail instead."""
    if available:
        return
    message = f"{what} is not available (run .ci/provision)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


def docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def upstream_mirror() -> Path:
    """The real upstream llama.cpp git checkout at the pin (lab.md §5), fetched by provision."""
    remote = lab_env().get("LLAMA_CPP_REMOTE", "")
    path = Path(remote.removeprefix("file://")) if remote else lab_dir() / "upstream" / "llama.cpp"
    require_lab((path / ".git").exists(), f"upstream llama.cpp mirror at {path}")
    return path


@pytest.fixture(scope="session")
def docker_engine() -> None:
    require_lab(docker_engine_answers(), "a Docker engine")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests must not see the developer's remotes, tokens or roots."""
    for name in ("LLAMA_CPP_REMOTE", "PIPELINE_ROOT", "HF_TOKEN", "DOCKERHUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield
