"""Smoke tests against a live llama-server container: `python -m pipeline smoke`.

One context manager (`ServerContainer`) owns each container's lifetime: it is removed on
success, failure, timeout, Ctrl-C and SIGTERM (the CLI turns SIGTERM into an exception). Each
check is named, timed and recorded; the report (JSON, and JUnit with --report) is what publish
reads before it lets a digest out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import socket
import string
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import httpx
import yaml

from pipeline.cli import Command
from pipeline.config import Project, load_version, write_json_atomic
from pipeline.console import err, out
from pipeline.errors import (
    BuildError,
    ConfigError,
    DockerUnavailableError,
    ModelError,
    SmokeError,
    UsageError,
)
from pipeline.matrix import host_platform, load_matrix
from pipeline.model import GGUFInfo, download_hf_model, ensure_model, validate_gguf

SCHEMA = 1
SETTINGS_FILE = Path(__file__).with_name("smoke.yaml")
# Every container smoke starts carries these labels: the run id finds what one run started,
# the pid lets tests (and people) find what a given process left behind.
LABEL = "io.llama-server-images.smoke"
LABEL_PID = "io.llama-server-images.smoke.pid"
REVISION_LABEL = "org.opencontainers.image.revision"
LOG_TAIL = 15


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Timing:
    healthy: float
    request: float
    exit: float
    docker_health: float
    health_interval: float

    def scaled(self, factor: float) -> Timing:
        """Every bound times `factor`; the HEALTHCHECK interval asked of Docker stays."""
        return Timing(
            self.healthy * factor,
            self.request * factor,
            self.exit * factor,
            self.docker_health * factor,
            self.health_interval,
        )


@dataclass(frozen=True)
class BackendSettings:
    """What every container of one backend gets, and what its server log must show."""

    env: dict[str, str]
    device_log: tuple[re.Pattern[str], ...]
    timing_scale: float = 1.0


@dataclass(frozen=True)
class Settings:
    timing: dict[str, Timing]
    server: dict[str, Any]
    requests: dict[str, Any]
    hub: dict[str, Any]
    backends: dict[str, BackendSettings]

    def timing_for(self, platform: str) -> Timing:
        return self.timing["native" if platform == host_platform() else "emulated"]

    def backend(self, name: str) -> BackendSettings:
        if name not in self.backends:
            raise ConfigError(
                f"{SETTINGS_FILE.name} has no settings for backend {name!r} "
                f"(it has: {', '.join(self.backends)})",
                f"add backends.{name} to pipeline/{SETTINGS_FILE.name}",
            )
        return self.backends[name]


def load_settings(path: Path = SETTINGS_FILE) -> Settings:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        timing = {name: Timing(**values) for name, values in data["timing"].items()}
        backends = {
            name: BackendSettings(
                {str(k): str(v) for k, v in (values.get("env") or {}).items()},
                tuple(re.compile(p, re.MULTILINE) for p in values["device_log"]),
                float(values.get("timing_scale", 1.0)),
            )
            for name, values in data["backends"].items()
        }
        return Settings(timing, data["server"], data["requests"], data["hub"], backends)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, re.error) as exc:
        raise ConfigError(f"cannot load smoke settings {path.name}: {exc}") from None


def arch_of(platform: str) -> str:
    return platform.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------- reports


@dataclass
class CheckResult:
    name: str
    passed: bool
    seconds: float
    detail: str = ""
    skipped: bool = False


@dataclass
class SmokeReport:
    """One image on one platform. Written to build/reports/smoke-<backend>-<arch>.json."""

    image: str
    digest: str | None
    backend: str
    platform: str
    passed: bool
    seconds: float
    checks: list[CheckResult] = field(default_factory=list)
    time_to_healthy: float | None = None
    model: str | None = None
    schema: int = SCHEMA

    @property
    def arch(self) -> str:
        return arch_of(self.platform)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed and not c.skipped]

    @property
    def filename(self) -> str:
        return f"smoke-{self.backend}-{self.arch}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        order = ["schema", "image", "digest", "backend", "platform", "passed", "seconds"]
        return {key: data[key] for key in order} | {
            key: value for key, value in data.items() if key not in order
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> SmokeReport:
        try:
            if data.get("schema") != SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA}")
            checks = [CheckResult(**c) for c in data["checks"]]
            # Unknown keys are ignored: a newer smoke may add some; publish needs these.
            known = set(cls.__dataclass_fields__) - {"checks", "schema"}
            fields = {k: v for k, v in data.items() if k in known}
            report = cls(**fields, checks=checks)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{where}: not a smoke report: {exc}", "re-run `nox -s smoke`"
            ) from None
        if not isinstance(report.passed, bool) or not isinstance(report.image, str):
            raise ConfigError(
                f"{where}: 'passed' or 'image' has the wrong type", "re-run `nox -s smoke`"
            )
        return report


def load_smoke_reports(project: Project) -> list[SmokeReport]:
    """Every smoke report under build/reports/ (publish refuses digests without a passed one)."""
    reports = []
    for path in sorted(project.reports_dir.glob("smoke-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"cannot read smoke report {path}: {exc}", "re-run `nox -s smoke`"
            ) from None
        reports.append(SmokeReport.from_json(data, str(path)))
    return reports


def junit_xml(reports: list[SmokeReport]) -> str:
    """JUnit XML (one testsuite per image and platform) for CI test-report viewers."""
    root = ET.Element("testsuites", name="smoke")
    totals = {"tests": 0, "failures": 0, "skipped": 0, "time": 0.0}
    for report in reports:
        failures = len(report.failed)
        skipped = sum(c.skipped for c in report.checks)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"smoke {report.backend} {report.platform}",
            tests=str(len(report.checks)),
            failures=str(failures),
            errors="0",
            skipped=str(skipped),
            time=f"{report.seconds:.3f}",
        )
        props = ET.SubElement(suite, "properties")
        for key in ("image", "digest", "backend", "platform", "model"):
            ET.SubElement(props, "property", name=key, value=str(getattr(report, key) or ""))
        for check in report.checks:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"smoke.{report.backend}.{report.arch}",
                name=check.name,
                time=f"{check.seconds:.3f}",
            )
            if check.skipped:
                ET.SubElement(case, "skipped", message=check.detail)
            elif not check.passed:
                failure = ET.SubElement(case, "failure", message=check.detail[:200])
                failure.text = check.detail
            elif check.detail:
                ET.SubElement(case, "system-out").text = check.detail
        totals["tests"] += len(report.checks)
        totals["failures"] += failures
        totals["skipped"] += skipped
        totals["time"] += report.seconds
    for key, value in totals.items():
        root.set(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(report: SmokeReport, project: Project, report_dir: Path | None) -> list[Path]:
    """build/reports/smoke-<backend>-<arch>.json always; JSON + JUnit into `report_dir` too."""
    written = []
    for directory in (project.reports_dir, report_dir):
        if directory is None:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{report.filename}.json"
        write_json_atomic(path, report.to_json())
        written.append(path)
        if directory == report_dir:
            xml_path = directory / f"{report.filename}.xml"
            xml_path.write_text(junit_xml([report]), encoding="utf-8")
            written.append(xml_path)
    return written


# ---------------------------------------------------------------------------- docker


def docker_client() -> Any:
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        detail = " ".join(str(exc).split())[:160]
        raise DockerUnavailableError(
            f"no Docker engine answers ({detail})", "start dockerd, e.g. with .ci/provision"
        ) from None
    return client


def remove_containers(client: Any, **labels: str) -> int:
    """Force-remove every container (running or not) carrying all of `labels`."""
    from docker.errors import APIError, NotFound

    filters = [f"{key}={value}" for key, value in labels.items()]
    removed = 0
    for container in client.containers.list(all=True, filters={"label": filters}):
        try:
            container.remove(force=True)
            removed += 1
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise
    return removed


def free_port() -> int:
    """A port free on loopback now (the kernel picks; another process could take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise SmokeError(
                f"port {port} on 127.0.0.1 is in use",
                "choose another --port, or omit --port to use a free one",
            ) from None


class ServerExited(Exception):
    """The container stopped before the condition we were waiting for."""


class ServerContainer:
    """A container from `image`, started on enter and force-removed on exit, whatever happens.

    The port is published on 127.0.0.1 only (a free one unless `host_port` is given); with
    `network_host` the container shares the host's network (for reaching a loopback server)
    and must itself listen on loopback.
    """

    def __init__(
        self,
        client: Any,
        image: str,
        *,
        platform: str | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        mounts: dict[Path, str] | None = None,
        container_port: int | None = None,
        host_port: int | None = None,
        network_host: bool = False,
        health_interval: float | None = None,
    ) -> None:
        self.client = client
        self.image = image
        self.platform = platform
        self.env = env or {}
        self.command = command or []
        self.mounts = mounts or {}
        self.container_port = container_port
        self.host_port = host_port
        self.network_host = network_host
        self.health_interval = health_interval
        self.run_id = secrets.token_hex(8)
        self.container: Any = None
        self.started_at = 0.0

    def __enter__(self) -> ServerContainer:
        from docker.errors import APIError, ImageNotFound

        options: dict[str, Any] = {
            "environment": self.env,
            "labels": {LABEL: self.run_id, LABEL_PID: str(os.getpid())},
            "volumes": {str(src): {"bind": dst, "mode": "ro"} for src, dst in self.mounts.items()},
            "detach": True,
        }
        if self.platform:
            options["platform"] = self.platform
        if self.network_host:
            options["network_mode"] = "host"
        elif self.container_port:
            options["ports"] = {f"{self.container_port}/tcp": ("127.0.0.1", self.host_port)}
        if self.health_interval:
            # Only the timing: the test itself stays the image's HEALTHCHECK (empty test = inherit).
            ns = int(self.health_interval * 1e9)
            options["healthcheck"] = {"test": [], "interval": ns, "start_period": 0}
        try:
            self.started_at = time.perf_counter()
            self.container = self.client.containers.create(self.image, self.command, **options)
            self.container.start()
        except BaseException as exc:
            # Created but not started (or interrupted mid-call): nothing of ours may remain.
            remove_containers(self.client, **{LABEL: self.run_id})
            if isinstance(exc, ImageNotFound):
                raise SmokeError(f"image {self.image} not found locally", BUILD_HINT) from None
            if isinstance(exc, APIError):
                text = " ".join(str(exc.explanation or exc).split())
                if "already allocated" in text or "address already in use" in text:
                    raise SmokeError(
                        f"cannot publish port {self.host_port}: {text}",
                        "choose another --port, or omit --port to use a free one",
                    ) from None
                raise SmokeError(f"cannot start a container from {self.image}: {text}") from None
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        remove_containers(self.client, **{LABEL: self.run_id})

    @property
    def base_url(self) -> str:
        """Where the server answers; ServerExited if it stopped before Docker mapped a port."""
        if self.network_host:
            return f"http://127.0.0.1:{self.container_port}"
        for _ in range(100):
            self.container.reload()
            ports = self.container.attrs["NetworkSettings"].get("Ports") or {}
            binding = ports.get(f"{self.container_port}/tcp")
            if binding:
                return f"http://127.0.0.1:{binding[0]['HostPort']}"
            # A container that exits at once loses its port mapping before we can read it.
            state, code = self.status()
            if state in ("exited", "dead"):
                raise ServerExited(f"server exited with code {code} before /health answered")
            time.sleep(0.05)
        raise SmokeError(f"Docker published no port for {self.container_port}/tcp of {self.image}")

    def status(self) -> tuple[str, int | None]:
        self.container.reload()
        state = self.container.attrs["State"]
        return state["Status"], state.get("ExitCode")

    def logs(self, tail: int | str = "all") -> str:
        raw: bytes = self.container.logs(stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", "replace")

    def log_tail(self, lines: int = LOG_TAIL) -> list[str]:
        return [line for line in self.logs(tail=lines).splitlines() if line.strip()]

    def wait_healthy(self, url: str, timeout: float) -> float:
        """Poll `url`/health until 200; seconds since start. ServerExited / TimeoutError."""
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        return time.perf_counter() - self.started_at
                except httpx.HTTPError:
                    pass  # not listening yet, or reset while loading
                state, code = self.status()
                if state in ("exited", "dead"):
                    raise ServerExited(f"server exited with code {code} before /health answered")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"/health did not answer 200 within {timeout:.0f} s")
                time.sleep(0.1)

    def wait_exit(self, timeout: float) -> int:
        try:
            result = self.container.wait(timeout=timeout)
        except Exception as exc:  # requests' ReadTimeout/ConnectionError, by docker-py version
            raise TimeoutError(f"container still running after {timeout:.0f} s") from exc
        return int(result.get("StatusCode", -1))


BUILD_HINT = "build it with `nox -s build -- --load`, or pass an image present locally"


# ---------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class SmokeTarget:
    """An image reference to run on one platform, and what the build said about it."""

    image: str
    platform: str
    backend: str
    digest: str | None = None


def targets_from_build_reports(
    project: Project, backend: str, platforms: list[str]
) -> list[SmokeTarget]:
    from pipeline.build import load_build_results

    results = load_build_results(project)
    targets = []
    for plat in platforms:
        match = [r for r in results if r.backend == backend and r.platform == plat]
        if not match:
            raise SmokeError(
                f"no build report for {backend} {plat} in {project.reports_dir}",
                f"run `nox -s build -- {arch_of(plat)} --load` first, or pass an IMAGE",
            )
        result = match[-1]
        targets.append(SmokeTarget(result.ref, plat, backend, result.digest))
    return targets


def image_digest(image: Any) -> str | None:
    for ref in image.attrs.get("RepoDigests") or []:
        return str(ref).rsplit("@", 1)[-1]
    return str(image.id) if image.id else None


# ---------------------------------------------------------------------------- checks


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


def _short(value: Any, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hf_token() -> str:
    # llama-server only sends tokens shaped like the Hub's (hf_ + at least 34 alphanumerics).
    alphabet = string.ascii_letters + string.digits
    return "hf_" + "".join(secrets.choice(alphabet) for _ in range(36))


class SmokeRun:
    """All checks of one image on one platform; `run()` returns the report (never raises on a
    failed check, only on bad input and interrupts)."""

    def __init__(
        self,
        client: Any,
        project: Project,
        target: SmokeTarget,
        model: ModelMount,
        settings: Settings,
        *,
        host_port: int | None = None,
        healthy_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.project = project
        self.target = target
        self.model = model
        self.settings = settings
        self.backend = settings.backend(target.backend)
        self.timing = settings.timing_for(target.platform).scaled(self.backend.timing_scale)
        if healthy_timeout is not None:
            self.timing = Timing(**{**asdict(self.timing), "healthy": healthy_timeout})
        self.host_port = host_port
        self.checks: list[CheckResult] = []
        self.time_to_healthy: float | None = None
        self.commit = load_version(project.version_file).llama_cpp.commit

    # ------------------------------------------------------------------ plumbing

    def check(self, name: str, fn: Callable[[], str]) -> bool:
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        started = time.perf_counter()
        err.print(f"[dim]smoke {arch_of(self.target.platform)}: {name}[/dim]")
        try:
            detail, passed = fn(), True
        except CheckFailed as exc:
            detail, passed = str(exc), False
        except httpx.HTTPError as exc:
            detail, passed = f"{type(exc).__name__}: {_short(exc)}", False
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            detail, passed = f"unexpected response ({type(exc).__name__}: {_short(exc)})", False
        except TimeoutError as exc:
            detail, passed = str(exc), False
        except (DockerException, RequestException) as exc:
            # The engine refused a query mid-check (inspect, top, logs): the check failed.
            detail, passed = f"Docker: {type(exc).__name__}: {_short(exc)}", False
        self.checks.append(
            CheckResult(name, passed, round(time.perf_counter() - started, 3), detail)
        )
        return passed

    def skip(self, names: list[str], reason: str) -> None:
        self.checks += [
            CheckResult(n, False, 0.0, f"skipped: {reason}", skipped=True) for n in names
        ]

    def container(self, env: dict[str, str] | None = None, **kwargs: Any) -> ServerContainer:
        return ServerContainer(
            self.client,
            self.target.image,
            platform=self.target.platform,
            health_interval=self.timing.health_interval,
            env={**self.backend.env, **(env or {})},
            **kwargs,
        )

    # ------------------------------------------------------------------ the run

    SERVER_CHECKS: ClassVar[list[str]] = [
        "backend-device",
        "models",
        "completion",
        "chat",
        "chat-stream",
        "embeddings",
        "tokenize-roundtrip",
        "metrics",
        "entrypoint-model",
        "entrypoint-port",
        "entrypoint-extra-args",
        "non-root",
        "docker-healthcheck",
    ]

    def run(self) -> SmokeReport:
        self.check("revision-label", self.check_revision_label)
        server = self.settings.server
        cport = int(server["container_port"])
        env = {
            "LLAMA_MODEL": self.model.container_path,
            "LLAMA_SERVER_PORT": str(cport),
            "LLAMA_SERVER_EXTRA_ARGS": server["extra_args"],
        }
        with self.container(
            env=env,
            command=list(server["run_args"]),
            mounts={self.model.host_path: self.model.container_path},
            container_port=cport,
            host_port=self.host_port,
        ) as box:
            started = box.started_at
            healthy = self.check("health", lambda: self.check_health(box))
            if healthy:
                self.run_server_checks(box, box.base_url)
            else:
                self.skip(self.SERVER_CHECKS, "the server never became healthy")
                self.show_logs(box, "server never became healthy")
        if healthy:
            self.check("entrypoint-no-model", self.check_no_model)
            self.check("entrypoint-version", self.check_version)
            self.check("entrypoint-hf-repo", self.check_hf_repo)
        else:
            self.skip(
                ["entrypoint-no-model", "entrypoint-version", "entrypoint-hf-repo"],
                "server never healthy",
            )
        seconds = round(time.perf_counter() - started, 3)
        return SmokeReport(
            image=self.target.image,
            digest=self.target.digest,
            backend=self.target.backend,
            platform=self.target.platform,
            passed=all(c.passed for c in self.checks),
            seconds=seconds,
            checks=self.checks,
            time_to_healthy=self.time_to_healthy,
            model=self.model.label,
        )

    def run_server_checks(self, box: ServerContainer, url: str) -> None:
        self.check("backend-device", lambda: self.check_backend_device(box))
        with httpx.Client(base_url=url, timeout=self.timing.request) as http:
            self.check("models", lambda: self.check_models(http))
            self.check("completion", lambda: self.check_completion(http))
            self.check("chat", lambda: self.check_chat(http))
            self.check("chat-stream", lambda: self.check_chat_stream(http))
            self.check("embeddings", lambda: self.check_embeddings(http))
            self.check("tokenize-roundtrip", lambda: self.check_tokenize(http))
            self.check("metrics", lambda: self.check_metrics(http))
            self.check("entrypoint-model", lambda: self.check_entrypoint_model(http))
            self.check("entrypoint-port", lambda: self.check_entrypoint_port(http))
            self.check("entrypoint-extra-args", lambda: self.check_extra_args(http))
        self.check("non-root", lambda: self.check_non_root(box))
        self.check("docker-healthcheck", lambda: self.check_docker_health(box))

    def show_logs(self, box: ServerContainer, why: str) -> None:
        lines = box.log_tail()
        err.print(f"[red]{why}; last {len(lines)} log lines of the container:[/red]")
        for line in lines:
            err.print(f"  {line}", markup=False)

    # ------------------------------------------------------------------ server checks

    def check_health(self, box: ServerContainer) -> str:
        try:
            url = box.base_url
            self.time_to_healthy = round(box.wait_healthy(url, self.timing.healthy), 3)
        except (ServerExited, TimeoutError) as exc:
            tail = box.log_tail(3)
            last = f"; last log line: {tail[-1]}" if tail else "; no log output"
            raise CheckFailed(f"{exc}{last}") from None
        return f"healthy {self.time_to_healthy:.2f} s after start"

    def check_backend_device(self, box: ServerContainer) -> str:
        # A GPU image that quietly falls back to its CPU kernels still answers every request:
        # only the server's own log says where the model went.
        log = box.logs()
        shown = []
        for pattern in self.backend.device_log:
            match = pattern.search(log)
            if match is None:
                backend = self.target.backend
                raise CheckFailed(f"the {backend} server's log never shows /{pattern.pattern}/")
            shown.append(match.group(0).strip())
        return "; ".join(shown)

    def check_models(self, http: httpx.Client) -> str:
        data = http.get("/v1/models").raise_for_status().json()
        ids = [m["id"] for m in data["data"]]
        require(len(ids) == 1, f"/v1/models lists {ids}, expected one model")
        require(isinstance(ids[0], str) and bool(ids[0]), f"model id {ids[0]!r}")
        return f"lists {ids[0]}"

    def check_completion(self, http: httpx.Client) -> str:
        n = int(self.settings.requests["n_predict"])
        body = {
            "prompt": self.settings.requests["prompt"],
            "n_predict": n,
            # A random-weight model may sample end-of-text at once; the count is what we test.
            "ignore_eos": True,
            "seed": 42,
            "cache_prompt": False,
        }
        data = http.post("/completion", json=body).raise_for_status().json()
        got = data["tokens_predicted"]
        require(isinstance(data["content"], str), f"content is {type(data['content']).__name__}")
        require(got == n, f"tokens_predicted is {got}, requested {n}")
        return f"{got} tokens predicted, as requested"

    def check_chat(self, http: httpx.Client) -> str:
        n = int(self.settings.requests["n_predict"])
        data = http.post("/v1/chat/completions", json=self.chat_body(n, stream=False))
        data = data.raise_for_status().json()
        choice = data["choices"][0]
        require(choice["message"]["role"] == "assistant", f"role {choice['message']['role']!r}")
        require(isinstance(choice["message"]["content"], str), "message content is not a string")
        usage = data["usage"]
        require(usage["prompt_tokens"] > 0, f"usage.prompt_tokens is {usage['prompt_tokens']}")
        require(
            usage["completion_tokens"] == n,
            f"usage.completion_tokens is {usage['completion_tokens']}, requested {n}",
        )
        tokens = f"{usage['prompt_tokens']}+{usage['completion_tokens']}"
        return f"choices[0] from the assistant, usage {tokens} tokens"

    def check_chat_stream(self, http: httpx.Client) -> str:
        n = int(self.settings.requests["n_predict"])
        deltas = 0
        events: list[str] = []
        body = self.chat_body(n, stream=True)
        # llama-server drops a kept-alive connection after a stream (while announcing
        # keep-alive): ask for a close so the pool never hands that socket to the next check.
        close = {"Connection": "close"}
        with http.stream("POST", "/v1/chat/completions", json=body, headers=close) as resp:
            resp.raise_for_status()
            ctype = resp.headers.get("content-type", "")
            require(ctype.startswith("text/event-stream"), f"content-type {ctype!r}")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line.removeprefix("data:").strip()
                events.append(payload)
                if payload == "[DONE]":
                    continue
                chunk = json.loads(payload)
                if chunk.get("choices") and "delta" in chunk["choices"][0]:
                    deltas += 1
        require(deltas > 0, f"no chunk with choices[0].delta in {len(events)} events")
        require(bool(events) and events[-1] == "[DONE]", f"stream ended with {_short(events[-1:])}")
        return f"{deltas} delta chunks, terminated by [DONE]"

    def chat_body(self, n: int, *, stream: bool) -> dict[str, Any]:
        return {
            "model": self.settings.server["alias"],
            "messages": [{"role": "user", "content": self.settings.requests["chat_message"]}],
            "max_tokens": n,
            "ignore_eos": True,
            "seed": 42,
            "stream": stream,
        }

    def check_embeddings(self, http: httpx.Client) -> str:
        body = {
            "input": self.settings.requests["embed_input"],
            "model": self.settings.server["alias"],
        }
        data = http.post("/v1/embeddings", json=body).raise_for_status().json()
        vectors = data["data"]
        require(len(vectors) == 1, f"{len(vectors)} vectors for one input")
        width = len(vectors[0]["embedding"])
        require(
            width == self.model.info.n_embd,
            f"vector width {width}, model n_embd {self.model.info.n_embd}",
        )
        require(all(isinstance(x, float) for x in vectors[0]["embedding"]), "non-float values")
        return f"one vector of width {width} (n_embd)"

    def check_tokenize(self, http: httpx.Client) -> str:
        text = self.settings.requests["roundtrip"]
        tokens = http.post("/tokenize", json={"content": text}).raise_for_status().json()["tokens"]
        require(
            bool(tokens) and all(isinstance(t, int) for t in tokens), f"tokens {_short(tokens)}"
        )
        back = (
            http.post("/detokenize", json={"tokens": tokens}).raise_for_status().json()["content"]
        )
        # SPM adds a leading space marker to the first word; detokenizing keeps it.
        require(back.removeprefix(" ") == text, f"{text!r} came back as {back!r}")
        return f"{len(tokens)} tokens, round-trip exact"

    def check_metrics(self, http: httpx.Client) -> str:
        resp = http.get("/metrics")
        require(
            resp.status_code == 200,
            f"/metrics answered {resp.status_code} (--metrics given as docker run args)",
        )
        require("llamacpp:" in resp.text, "no llamacpp: metrics in the body")
        return "enabled by `docker run IMAGE --metrics` (args appended)"

    def check_entrypoint_model(self, http: httpx.Client) -> str:
        props = http.get("/props").raise_for_status().json()
        path = props.get("model_path")
        require(
            path == self.model.container_path,
            f"model_path {path!r}, LLAMA_MODEL was {self.model.container_path!r}",
        )
        return f"LLAMA_MODEL={path} loaded"

    def check_entrypoint_port(self, http: httpx.Client) -> str:
        port = self.settings.server["container_port"]
        require(
            http.get("/health").status_code == 200, "no answer on the LLAMA_SERVER_PORT mapping"
        )
        return f"listens on LLAMA_SERVER_PORT={port} (not the default 8080)"

    def check_extra_args(self, http: httpx.Client) -> str:
        alias = self.settings.server["alias"]
        props = http.get("/props").raise_for_status().json()
        require(
            props.get("model_alias") == alias,
            f"model_alias {props.get('model_alias')!r}, expected {alias!r}",
        )
        ids = [m["id"] for m in http.get("/v1/models").raise_for_status().json()["data"]]
        require(ids == [alias], f"/v1/models lists {ids}, expected [{alias!r}]")
        return f"applied: {self.settings.server['extra_args']}"

    def check_non_root(self, box: ServerContainer) -> str:
        # `docker top` runs ps on the host: the uid the kernel sees, not what the image claims.
        top = box.container.top(ps_args="-eo pid,uid,comm")
        titles = [t.upper() for t in top["Titles"]]
        uid_col, comm_col = titles.index("UID"), titles.index("COMMAND")
        procs = [(int(p[uid_col]), p[comm_col]) for p in top["Processes"]]
        require(bool(procs), "no process in the container")
        root = [comm for uid, comm in procs if uid == 0]
        require(not root, f"running as root: {root}")
        return ", ".join(f"{comm} uid {uid}" for uid, comm in procs)

    def check_docker_health(self, box: ServerContainer) -> str:
        deadline = time.perf_counter() + self.timing.docker_health
        status = "unknown"
        while time.perf_counter() < deadline:
            box.container.reload()
            health = box.container.attrs["State"].get("Health")
            require(health is not None, "the image has no HEALTHCHECK")
            status = health["Status"]
            if status == "healthy":
                after = time.perf_counter() - box.started_at
                return f"Docker reports healthy {after:.1f} s after start"
            if status == "unhealthy":
                log = health.get("Log") or [{}]
                raise CheckFailed(f"Docker reports unhealthy: {_short(log[-1].get('Output', ''))}")
            time.sleep(0.2)
        raise CheckFailed(f"HEALTHCHECK still {status!r} after {self.timing.docker_health:.0f} s")

    # ------------------------------------------------------------------ image checks

    def check_revision_label(self) -> str:
        image = self.client.images.get(self.target.image)
        label = (image.labels or {}).get(REVISION_LABEL)
        require(
            label == self.commit, f"{REVISION_LABEL} is {label!r}, version.json pins {self.commit}"
        )
        return f"{REVISION_LABEL} = {self.commit[:12]}"

    def check_no_model(self) -> str:
        with self.container() as box:
            code = box.wait_exit(self.timing.exit)
            lines = [line for line in box.logs().splitlines() if line.strip()]
        require(code != 0, f"exit code {code} without a model, expected non-zero")
        require(len(lines) == 1, f"{len(lines)} lines of output, expected one: {_short(lines)}")
        require(
            "LLAMA_MODEL" in lines[0], f"message does not say how to give a model: {lines[0]!r}"
        )
        return f"exit {code}: {_short(lines[0])}"

    def check_version(self) -> str:
        with self.container(command=["--version"]) as box:
            code = box.wait_exit(self.timing.exit)
            output = box.logs()
        require(code == 0, f"--version exited {code}: {_short(output)}")
        require(
            self.commit[:7] in output,
            f"--version does not report {self.commit[:7]}: {_short(output)}",
        )
        version = next((line for line in output.splitlines() if "version" in line), output)
        return f"passes through: {_short(version)}"

    def check_hf_repo(self) -> str:
        from pipeline.hubserver import HubServer

        repo = self.settings.hub["repo"]
        token = _hf_token()
        filename = self.model.host_path.name
        port = free_port()
        with HubServer(token=token) as hub:
            hub.add_file(repo, filename, self.model.host_path, private=True)
            env = {
                "LLAMA_HF_REPO": repo,
                "LLAMA_HF_FILE": filename,
                "LLAMA_HF_TOKEN": token,
                # llama-server reads MODEL_ENDPOINT (HF_ENDPOINT only as a fallback).
                "MODEL_ENDPOINT": f"{hub.url}/",
                "LLAMA_SERVER_HOST": "127.0.0.1",
                "LLAMA_SERVER_PORT": str(port),
            }
            with self.container(env=env, network_host=True, container_port=port) as box:
                url = box.base_url
                try:
                    box.wait_healthy(url, self.timing.healthy)
                except (ServerExited, TimeoutError) as exc:
                    tail = box.log_tail(3)
                    seen = ", ".join(f"{r.method} {r.path} {r.status}" for r in hub.requests[-4:])
                    raise CheckFailed(
                        f"{exc}; hub saw: {seen or 'nothing'}; log: {_short(tail)}"
                    ) from None
                top = json.dumps(box.container.top())
                require(token not in top, "the HF token is visible in the process list")
                models = httpx.get(f"{url}/v1/models", timeout=self.timing.request).json()
            downloads = [
                r for r in hub.requests if r.method == "GET" and r.path.endswith(f"/{filename}")
            ]
        require(
            bool(downloads) and downloads[-1].status == 200,
            "the model was not downloaded from the hub",
        )
        require(all(r.sent_token for r in hub.requests), "a hub request went without the token")
        require(bool(models.get("data")), f"/v1/models: {_short(models)}")
        return f"downloaded {repo}/{filename} from the local hub (private, token by env)"


# ---------------------------------------------------------------------------- model choice


def resolve_model(project: Project, args: argparse.Namespace, settings: Settings) -> ModelMount:
    """Validate the model before any container starts; refuse anything that is not GGUF."""
    if args.hf_repo or args.hf_file:
        if not (args.hf_repo and args.hf_file):
            raise UsageError("--hf-repo and --hf-file go together", "give both, or --model PATH")
        hub_model = download_hf_model(args.hf_repo, args.hf_file, args.hf_revision)
        path, label = (
            hub_model.path,
            f"hf:{args.hf_repo}/{args.hf_file}@{hub_model.commit or hub_model.revision}",
        )
    elif args.model:
        path = Path(args.model).expanduser().resolve()
        label = str(path)
    else:
        path = ensure_model(project)
        label = f"generated:{path.name}"
    info = validate_gguf(path)
    if not path.stat().st_mode & 0o004:
        raise ModelError(
            f"model file {path} is not readable by others (mode {path.stat().st_mode & 0o777:o}); "
            "the container's non-root user could not open it",
            f"chmod a+r {shlex.quote(str(path))}",
        )
    # Keep the model's own file name inside the container: llama-server names it in /props.
    name = path.name if path.name.endswith(".gguf") else f"{path.name}.gguf"
    container_path = f"{settings.server['model_dir']}/{name}"
    return ModelMount(path, info, container_path, label)


# ---------------------------------------------------------------------------- CLI


def print_report(report: SmokeReport) -> None:
    from rich.table import Table

    table = Table(title=f"smoke {report.backend} {report.platform}: {report.image}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        result = (
            "[yellow]SKIP[/yellow]"
            if c.skipped
            else "[green]PASS[/green]"
            if c.passed
            else "[red]FAIL[/red]"
        )
        table.add_row(c.name, result, f"{c.seconds:.2f}", c.detail)
    out.print(table)
    healthy = f"{report.time_to_healthy:.2f} s" if report.time_to_healthy is not None else "never"
    verdict = "[green]passed[/green]" if report.passed else "[red]FAILED[/red]"
    out.print(
        f"{verdict}: {report.seconds:.1f} s from docker run to the last check; "
        f"healthy after {healthy}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", nargs="?", help="image reference (default: the cpu build for each platform)"
    )
    parser.add_argument(
        "--platform",
        action="append",
        help="linux/amd64 or linux/arm64 (amd64, arm64); repeat or comma-separate; default: host's",
    )
    parser.add_argument(
        "--backend", default="cpu", help="backend of the build report to take (default: cpu)"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model", metavar="PATH", help="a local GGUF model (default: a generated tiny model)"
    )
    model.add_argument("--hf-repo", metavar="R", help="download the model from this Hub repository")
    parser.add_argument("--hf-file", metavar="F", help="the GGUF file in --hf-repo")
    parser.add_argument(
        "--hf-revision", metavar="REV", help="branch, tag or commit of --hf-repo (default: main)"
    )
    parser.add_argument(
        "--report", metavar="DIR", type=Path, help="also write JSON and JUnit XML here"
    )
    parser.add_argument(
        "--port", type=int, help="host port on 127.0.0.1 to publish (default: a free one)"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds to wait for /health (default: smoke.yaml)"
    )


def run_smoke(args: argparse.Namespace) -> int:
    project = Project.discover()
    settings = load_settings()
    matrix = load_matrix()
    platforms = [
        matrix.platform(p).name
        for value in (args.platform or [host_platform()])
        for p in value.split(",")
        if p
    ]
    # Validate the model first: a file that is not GGUF never reaches a container.
    model = resolve_model(project, args, settings)
    if args.port is not None:
        ensure_port_free(args.port)
    client = docker_client()
    if args.image:
        targets = [explicit_target(client, project, args.image, p, args.backend) for p in platforms]
    else:
        targets = targets_from_build_reports(project, args.backend, platforms)
    for target in targets:
        ensure_image_present(client, target.image)
    failures = []
    for target in targets:
        err.print(f"smoke: {target.image} on {target.platform} with {model.label}")
        report = SmokeRun(
            client,
            project,
            target,
            model,
            settings,
            host_port=args.port,
            healthy_timeout=args.timeout,
        ).run()
        write_reports(report, project, args.report)
        print_report(report)
        if not report.passed:
            failures.append(f"{target.platform}: {', '.join(report.failed)}")
    if failures:
        raise SmokeError(
            f"smoke failed ({'; '.join(failures)})", "see the table and log lines above"
        )
    return 0


def explicit_target(
    client: Any, project: Project, ref: str, platform: str, backend: str
) -> SmokeTarget:
    """An IMAGE given by name: take backend and digest from a build report naming it, if any."""
    try:
        from pipeline.build import load_build_results

        for result in load_build_results(project):
            if result.ref == ref and result.platform == platform:
                return SmokeTarget(ref, platform, result.backend, result.digest)
    except (ConfigError, BuildError):
        pass  # no usable build reports: the image speaks for itself
    image = ensure_image_present(client, ref)
    return SmokeTarget(ref, platform, backend, image_digest(image))


def ensure_image_present(client: Any, ref: str) -> Any:
    from docker.errors import ImageNotFound

    try:
        return client.images.get(ref)
    except ImageNotFound:
        raise SmokeError(f"image {ref} not found locally", BUILD_HINT) from None


COMMANDS: list[Command] = [
    (
        "smoke",
        "Run an image and check its live server (health, completions, embeddings, entrypoint).",
        add_arguments,
        run_smoke,
    ),
]
