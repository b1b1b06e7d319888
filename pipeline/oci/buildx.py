"""The docker CLI's buildx: builders, and builds with their logs; a docker config of our own.

docker-py has no buildx, so these run the CLI. A build streams its whole log to a file and one
terminal line per step. Tools that read registry credentials from a docker config (cosign)
get one of our own in a temporary directory (0600 in 0700), never a command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import console
from pipeline.core.errors import (
    BuildError,
    BuildTimedOut,
    DockerUnavailableError,
    ToolMissingError,
    UsageError,
)
from pipeline.core.process import stop_group
from pipeline.oci.image import DOCKER_HUB
from pipeline.oci.registry import DOCKER_HUB_CONFIG_KEY, Credentials

# A log line worth a terminal line: a step starting, or (at most every 10%) ninja progress.
_STEP_RE = re.compile(r"^#\d+ \[(?P<step>[^\]]+)\] (?P<what>.+)$")
_NINJA_RE = re.compile(r"^#\d+ [\d.]+ \[(?P<done>\d+)/(?P<total>\d+)\] ")
# The first error of a failed step: one our scripts printed (`error: ...`), or the compiler's
# (`file.cpp:1:2: error: ...`), rather than BuildKit's echo of the whole RUN script.
_SCRIPT_ERROR_RE = re.compile(r"^#\d+ [\d.]+ (?P<msg>(?:\S+:\d+:(?:\d+:)? (?:fatal )?)?error: .+)$")


def docker_cli(
    *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker ARGS`, captured; ToolMissingError when there is no docker CLI."""
    try:
        return subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError:
        raise ToolMissingError(
            "the docker CLI is not installed", "install Docker (docker-ce-cli or docker.io)"
        ) from None


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def check_buildx() -> str:
    """buildx's version, or DockerUnavailableError saying how to install it."""
    result = docker_cli("buildx", "version")
    if result.returncode != 0:
        raise DockerUnavailableError(
            "docker buildx is not installed",
            "install the docker-buildx plugin (Debian: docker-buildx; or put the binary in "
            "~/.docker/cli-plugins/docker-buildx)",
        )
    return result.stdout.strip()


# ------------------------------------------------------------------------------ builders


@dataclass(frozen=True)
class BuilderInfo:
    name: str
    driver: str
    platforms: tuple[str, ...]

    def supports(self, platform: str) -> bool:
        # "linux/amd64/v2" counts as linux/amd64.
        return any(p == platform or p.startswith(f"{platform}/") for p in self.platforms)

    @property
    def loads_into_engine(self) -> bool:
        """Whether `--load` can hand its result to the local engine."""
        return self.driver in ("docker", "docker-container", "")


def inspect_builder(builder: str | None) -> BuilderInfo:
    args = ["buildx", "inspect", "--bootstrap"]
    if builder:
        args += ["--builder", builder]
    result = docker_cli(*args, timeout=300)
    if result.returncode != 0:
        detail = last_line(result) if result.stderr.strip() else "no output"
        if builder:
            raise UsageError(
                f"buildx builder {builder!r} is not usable: {detail}",
                "list builders with `docker buildx ls`; create one with `docker buildx create "
                f"--name {builder} ...`",
            )
        raise DockerUnavailableError(f"the default buildx builder is not usable: {detail}")
    name, driver, platforms = "", "", []
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Name" and not name:
            name = value
        elif key == "Driver" and not driver:
            driver = value
        elif key == "Platforms":
            platforms += [p.strip().rstrip("*") for p in value.split(",") if p.strip()]
    return BuilderInfo(name or builder or "default", driver, tuple(dict.fromkeys(platforms)))


# -------------------------------------------------------------------------------- builds


class _Progress:
    """Turns buildx's plain log into a few terminal lines: each step once, ninja by tenths."""

    def __init__(self, label: str, started: float) -> None:
        self.label = label
        self.started = started
        self.seen_steps: set[str] = set()
        # Per ninja total: nested builds (vulkan's shader generator) count on their own.
        self.last_tenth: dict[int, int] = {}

    def line(self, line: str) -> None:
        if (match := _STEP_RE.match(line)) and match.group("step") not in self.seen_steps:
            # Only the first line of a step; cache hits say CACHED on the next line.
            step = match.group("step")
            if step.startswith(("internal]", "internal ")) or "load " in step:
                return
            self.seen_steps.add(step)
            what = " ".join(match.group("what").split())
            self.say(f"[{step}] {what[:90]}")
        elif match := _NINJA_RE.match(line):
            done, total = int(match.group("done")), int(match.group("total"))
            tenth = done * 10 // max(total, 1)
            if tenth > self.last_tenth.get(total, -1):
                self.last_tenth[total] = tenth
                self.say(f"compiling {done}/{total} ({time.monotonic() - self.started:.0f} s)")

    def say(self, text: str) -> None:
        console.err.print(f"  {self.label} {text}", markup=False, soft_wrap=True)


def run_buildx(
    args: Sequence[str],
    log_path: Path,
    label: str,
    *,
    quiet: bool = False,
    time_limit: float | None = None,
) -> float:
    """Run a buildx command, the full log to `log_path`, one terminal line per step; returns
    the seconds it took.

    On failure: the log's last lines on stderr and a BuildError with the first error our own
    scripts printed (or buildx's), naming the log; past `time_limit`, BuildTimedOut.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    progress = _Progress(label, started)
    script_error: str | None = None
    tail: list[str] = []
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                list(args),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except FileNotFoundError:
            raise ToolMissingError("the docker CLI is not installed", "install Docker") from None
        timer = threading.Timer(time_limit, stop_group, (proc,)) if time_limit else None
        if timer is not None:
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                line = line.rstrip("\n")
                tail = [*tail[-39:], line]
                if (match := _SCRIPT_ERROR_RE.match(line)) and script_error is None:
                    script_error = match.group("msg")
                if not quiet:
                    progress.line(line)
            proc.wait()
        except BaseException:
            stop_group(proc)
            raise
        finally:
            if timer is not None:
                timer.cancel()
    seconds = time.monotonic() - started
    if time_limit and proc.returncode != 0 and seconds >= time_limit:
        raise BuildTimedOut(
            f"{label}: stopped at its time limit of {time_limit:.0f} s", f"full log: {log_path}"
        )
    if proc.returncode != 0:
        for line in tail[-25:]:
            console.err.print(f"  | {line}", markup=False, highlight=False, soft_wrap=True)
        buildx_error = next((ln for ln in reversed(tail) if ln.startswith("ERROR:")), None)
        message = script_error or (buildx_error or f"buildx exited with {proc.returncode}")
        raise BuildError(f"{label}: {message[:400]}", f"full log: {log_path}")
    return seconds


# --------------------------------------------------------------------------- docker config


@contextmanager
def docker_config(auths: Mapping[str, Credentials]) -> Iterator[Path]:
    """A docker config directory of our own holding only `auths`, removed afterwards.

    buildx reads registry credentials from $DOCKER_CONFIG/config.json; writing them there keeps
    them off command lines and out of the user's own config. CLI plugins, builders and contexts
    are linked from the user's config so buildx still works.
    """
    original = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    directory = Path(tempfile.mkdtemp(prefix="publish-docker-config-"))
    try:
        config: dict[str, Any] = {"auths": {}}
        for registry, creds in auths.items():
            key = DOCKER_HUB_CONFIG_KEY if registry == DOCKER_HUB else registry
            config["auths"][key] = {"auth": creds.token}
        try:
            user_config = json.loads((original / "config.json").read_text(encoding="utf-8"))
            if isinstance(user_config, dict) and "currentContext" in user_config:
                config["currentContext"] = user_config["currentContext"]
        except (OSError, ValueError, RecursionError):
            pass  # the user's config is only asked for its context
        fd = os.open(directory / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        for name in ("cli-plugins", "buildx", "contexts"):
            if (original / name).exists():
                (directory / name).symlink_to(original / name)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
