"""One smoke run: one image on one platform in one tier, each check named, timed and recorded,
none raising on failure (only bad input and interrupts raise).

Every check registers the same way, `@smoke_check(name, runs)`, where `runs` says what it needs:
the image alone, the main server container while it serves (`Live`), or a short-lived container
of its own. Checks registered `named_only` run only where a tier names them (matrix.yaml's tier
`checks`, smoke.yaml's real `checks`); the others run in every structural tier, in the order
they were registered (checks.py, then router.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from pipeline.core.console import err
from pipeline.core.errors import ConfigError
from pipeline.matrix import Backend, TargetPlatform
from pipeline.modelfiles.gguf import GGUFInfo
from pipeline.oci.engine import ServerContainer, ServerExited
from pipeline.records import NO_GPU_TIER, CheckResult, Figure, SmokeRecord
from pipeline.smoke.settings import Settings


class SmokeTarget(NamedTuple):
    """An image reference to run on one platform, and what the build said about it."""

    image: str
    platform: TargetPlatform
    backend: Backend
    digest: str | None = None


class Outcome(NamedTuple):
    """What a passed check reports when it measured something besides its detail."""

    detail: str
    figures: tuple[Figure, ...] = ()


class CheckFailed(Exception):
    """A check's condition did not hold; the message is the detail shown and reported."""


@dataclass(frozen=True)
class ModelMount:
    host_path: Path
    info: GGUFInfo
    container_path: str
    label: str


def require(condition: bool, detail: str) -> None:
    if not condition:
        raise CheckFailed(detail)


def short(value: Any, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Live:
    """The main server container while it serves, and a client bound to it."""

    box: ServerContainer
    http: httpx.Client


class Runs(StrEnum):
    """What a check needs."""

    IMAGE = "image"  # the image itself (its files, its labels): no container
    SERVER = "server"  # the main server container, healthy: called with (run, Live)
    CONTAINER = "container"  # a short-lived container of its own: called with (run)


CheckResultOf = str | Outcome


@dataclass(frozen=True)
class SmokeCheck:
    name: str
    runs: Runs
    fn: Callable[..., CheckResultOf]
    named_only: bool  # runs only where a tier names it


CHECKS: dict[str, SmokeCheck] = {}


def smoke_check(
    name: str, runs: Runs, *, named_only: bool = False
) -> Callable[[Callable[..., CheckResultOf]], Callable[..., CheckResultOf]]:
    """Register a check under `name` (the name its result is reported under)."""

    def register(fn: Callable[..., CheckResultOf]) -> Callable[..., CheckResultOf]:
        if name in CHECKS:
            raise ValueError(f"smoke check {name!r} is registered twice")
        CHECKS[name] = SmokeCheck(name, runs, fn, named_only)
        return fn

    return register


def structural(runs: Runs) -> list[SmokeCheck]:
    """The checks every structural tier runs that need `runs`, in registration order."""
    return [c for c in CHECKS.values() if c.runs is runs and not c.named_only]


def named(names: tuple[str, ...], where: str, runs: Runs | None = None) -> list[SmokeCheck]:
    """The checks a tier names, in its order; a name that is not a registered check (of the
    kind the tier can run) is a data-file error naming `where`."""
    unknown = [n for n in names if n not in CHECKS or (runs and CHECKS[n].runs is not runs)]
    if unknown:
        known = sorted(
            n for n, c in CHECKS.items() if c.named_only and (not runs or c.runs is runs)
        )
        raise ConfigError(f"{where} names unknown checks {unknown}", f"known: {', '.join(known)}")
    return [CHECKS[n] for n in names]


class SmokeRun:
    """The plumbing of one run: its container factory, the check runner and the record. The
    structural tiers' run (`run`) lives here; the real tier's in pipeline/smoke/real.py."""

    def __init__(
        self,
        client: Any,
        target: SmokeTarget,
        model: ModelMount,
        settings: Settings,
        *,
        commit: str,
        tier: str = NO_GPU_TIER,
        host_port: int | None = None,
        healthy_timeout: float | None = None,
    ) -> None:
        backend = target.backend
        self.tier = backend.smoke.tier(backend.name, tier)
        self.client = client
        self.target = target
        self.backend = backend
        where = f"matrix.yaml: {backend.name}'s tier {tier}"
        self.tier_checks = named(self.tier.checks, where, Runs.CONTAINER)
        self.model = model
        self.settings = settings
        timing = settings.timing_for(target.platform.name).scaled(backend.smoke.timing_scale)
        self.timing = timing.with_healthy(healthy_timeout)
        self.host_port = host_port
        self.commit = commit
        self.checks: list[CheckResult] = []
        self.time_to_healthy: float | None = None

    # ------------------------------------------------------------------ plumbing

    def check(self, name: str, fn: Callable[[], CheckResultOf]) -> bool:
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        started = time.perf_counter()
        err.print(f"[dim]smoke {self.target.platform.arch}: {name}[/dim]")
        figures: tuple[Figure, ...] = ()
        try:
            outcome = fn()
            detail, figures = (outcome, ()) if isinstance(outcome, str) else outcome
            passed = True
        except CheckFailed as exc:
            detail, passed = str(exc), False
        except httpx.HTTPError as exc:
            detail, passed = f"{type(exc).__name__}: {short(exc)}", False
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            detail, passed = f"unexpected response ({type(exc).__name__}: {short(exc)})", False
        except (TimeoutError, ServerExited) as exc:
            detail, passed = str(exc), False
        except (DockerException, RequestException) as exc:
            # The engine refused a query mid-check (inspect, top, logs): the check failed.
            detail, passed = f"Docker: {type(exc).__name__}: {short(exc)}", False
        seconds = round(time.perf_counter() - started, 3)
        self.checks.append(CheckResult(name, passed, seconds, detail, figures=figures))
        return passed

    def skip(self, names: list[str], reason: str) -> None:
        self.checks += [
            CheckResult(n, False, 0.0, f"skipped: {reason}", skipped=True) for n in names
        ]

    def container(self, env: dict[str, str] | None = None, **kwargs: Any) -> ServerContainer:
        return ServerContainer(
            self.client,
            self.target.image,
            platform=self.target.platform.name,
            health_interval=self.timing.health_interval,
            env={**self.tier.env, **(env or {})},
            gpus=self.tier.gpus,
            devices=self.tier.devices,
            **kwargs,
        )

    def serve(
        self,
        checks: list[SmokeCheck],
        env: dict[str, str],
        mounts: dict[Path, str],
        command: list[str] | None = None,
    ) -> tuple[float, bool]:
        """Start the main server container, wait for health, run `checks` on it; (its start,
        whether it became healthy)."""
        port = self.settings.server.container_port
        with self.container(
            env=env,
            command=command,
            mounts=mounts,
            container_port=port,
            host_port=self.host_port,
        ) as box:
            started = box.started_at
            healthy = self.check("health", lambda: self.check_health(box))
            if healthy:
                with httpx.Client(base_url=box.base_url, timeout=self.timing.request) as http:
                    live = Live(box, http)
                    for check in checks:
                        self.check(check.name, partial(check.fn, self, live))
            else:
                self.skip([c.name for c in checks], "the server never became healthy")
                self.show_logs(box, "server never became healthy")
        return started, healthy

    # ------------------------------------------------------------------ the run

    def run(self) -> SmokeRecord:
        for check in structural(Runs.IMAGE):
            self.check(check.name, partial(check.fn, self))
        server = self.settings.server
        env = {
            "LLAMA_MODEL": self.model.container_path,
            "LLAMA_SERVER_PORT": str(server.container_port),
            "LLAMA_SERVER_EXTRA_ARGS": server.extra_args,
            **server.env,
        }
        started, healthy = self.serve(
            structural(Runs.SERVER),
            env,
            {self.model.host_path: self.model.container_path},
            list(server.run_args),
        )
        for check in [*structural(Runs.CONTAINER), *self.tier_checks]:
            if healthy:
                self.check(check.name, partial(check.fn, self))
            else:
                self.skip([check.name], "server never healthy")
        return self.record(started, self.tier.name)

    def record(self, started: float, tier: str) -> SmokeRecord:
        """The report of the checks run so far (`started`: the server container's start)."""
        return SmokeRecord(
            image=self.target.image,
            digest=self.target.digest,
            backend=self.backend.name,
            platform=self.target.platform.name,
            # What the loader requires: a pass is every check passed, and there is one.
            passed=bool(self.checks) and all(c.passed for c in self.checks),
            seconds=round(time.perf_counter() - started, 3),
            checks=tuple(self.checks),
            time_to_healthy=self.time_to_healthy,
            model=self.model.label,
            tier=tier,
        )

    def show_logs(self, box: ServerContainer, why: str) -> None:
        lines = box.log_tail()
        err.print(f"[red]{why}; last {len(lines)} log lines of the container:[/red]")
        for line in lines:
            err.print(f"  {line}", markup=False)

    def check_health(self, box: ServerContainer) -> str:
        try:
            url = box.base_url
            self.time_to_healthy = round(box.wait_healthy(url, self.timing.healthy), 3)
        except (ServerExited, TimeoutError) as exc:
            tail = box.log_tail(3)
            last = f"; last log line: {tail[-1]}" if tail else "; no log output"
            raise CheckFailed(f"{exc}{last}") from None
        return f"healthy {self.time_to_healthy:.2f} s after start"
