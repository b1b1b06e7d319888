"""What every bench part shares: where it works, the stage functions it drives, the lock, the
images it measures, and what earlier parts (of this run or of report.json) handed on.

Each part runs in work roots of its own under the report directory (never the checkout's
third_party/ or build/reports/). Every Docker build and every timed measurement holds the lab's
build lock (one compile at a time on 2 cores); only the time inside the lock is counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as host
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench.lock import lab_lock
from pipeline.bench.options import BenchOptions
from pipeline.bench.report import Metric, PartResult, parse_report
from pipeline.core.errors import ConfigError, RecordInvalidError, SmokeError
from pipeline.core.project import Project
from pipeline.oci.buildx import docker_cli
from pipeline.oci.engine import ServerContainer, ServerExited, docker_client, local_image
from pipeline.records import BuildRecord, SmokeRecord, load_build_records
from pipeline.records.snapshot import Snapshot

TAG_PREFIX = "llama-bench"
MB = 1_000_000
SERVER_CTX = 2048
SERVER_READY_S = 300


@dataclass(frozen=True)
class BenchBuild:
    """One cpu image built through the build stage (`nox -s build -- <arch> --load --tag <tag>`
    in its release configuration: every CPU variant), on a Dockerfile of the bench's own."""

    project: Project
    platform: str
    tag: str
    dockerfile: Path
    no_cache: bool
    time_limit: float | None = None  # BuildTimedOut past it
    oci_path: Path | None = None  # an OCI layout tarball (`--oci PATH`) instead of a load
    ccache_from: Path | None = None
    ccache_to: Path | None = None


@dataclass(frozen=True)
class StageFunctions:
    """The stages bench drives, handed over by the CLI (stages never import one another)."""

    sync: Callable[[Project, str, bool], Snapshot]  # (project, remote, prune)
    build: Callable[[BenchBuild, Snapshot], BuildRecord]
    smoke: Callable[[Project, str, str | None], list[SmokeRecord]]  # (project, image, tier)


@dataclass(frozen=True)
class Measured:
    """What a part hands back: its table rows, the notes that qualify them, and details (JSON)
    that later parts and later runs read (`Bench.detail`)."""

    metrics: tuple[Metric, ...]
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ColdBuild:
    """A cold build one side made: the image it left, how long it took, when."""

    tag: str
    seconds: float
    at: str
    salt: str | None = None  # ours: the cache-mount ids, which the warm rebuild reuses

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "cold_s": self.seconds, "at": self.at, "salt": self.salt}

    @classmethod
    def from_json(cls, data: Any) -> ColdBuild | None:
        if not isinstance(data, dict) or "tag" not in data or "cold_s" not in data:
            return None
        return cls(
            str(data["tag"]), float(data["cold_s"]), str(data.get("at", "")), data.get("salt")
        )


@dataclass
class Bench:
    """One benchmark run: its options' facts, the stages it drives, what parts hand on."""

    options: BenchOptions
    commit: str
    stages: StageFunctions
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    previous: dict[str, PartResult] = field(default_factory=dict)
    done: dict[str, Measured] = field(default_factory=dict)
    _client: Any = None

    @property
    def short(self) -> str:
        return self.commit[:7]

    @property
    def work(self) -> Path:
        return self.options.report_dir / "work"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def log(self, name: str) -> Path:
        return self.options.report_dir / "logs" / f"{name}.log"

    def tag(self, side: str, what: str) -> str:
        return f"{TAG_PREFIX}/{side}:{what}-{self.short}"

    def locked(self, what: str) -> contextlib.AbstractContextManager[None]:
        return lab_lock(self.options.lock, what)

    def reload(self) -> None:
        """Re-read report.json: another bench run (one side of a part) may have written it."""
        self.previous = {
            p.name: p for p in load_previous(self.options.report_dir) if p.commit == self.commit
        }

    def detail(self, part: str, key: str) -> Any:
        """A value an earlier part handed on: from this run, else from report.json."""
        if part in self.done:
            return self.done[part].details.get(key)
        previous = self.previous.get(part)
        return None if previous is None else previous.details.get(key)

    def cold_build(self, side: str) -> ColdBuild | None:
        return ColdBuild.from_json(self.detail("build", side))

    def has_image(self, ref: str) -> bool:
        return local_image(self.client, ref) is not None

    @contextlib.contextmanager
    def server(
        self, image: str, model: Path, *, threads: int | None = None
    ) -> Iterator[ServerContainer]:
        """`image`'s llama-server on `model`, configured by llama-server's own LLAMA_ARG_*
        variables so every image (ours, upstream's, a native build) is started the same way."""
        env = {
            "LLAMA_ARG_MODEL": f"/models/{model.name}",
            "LLAMA_ARG_HOST": "0.0.0.0",
            "LLAMA_ARG_PORT": "8080",
            "LLAMA_ARG_CTX_SIZE": str(SERVER_CTX),
        }
        if threads:
            env["LLAMA_ARG_THREADS"] = str(threads)
        mounts = {model: f"/models/{model.name}"}
        with ServerContainer(
            self.client, image, env=env, mounts=mounts, container_port=8080
        ) as box:
            try:
                box.wait_healthy(box.base_url, SERVER_READY_S)
            except (ServerExited, TimeoutError) as exc:
                raise SmokeError(f"{image}: {exc}", f"last log lines: {box.log_tail(3)}") from None
            yield box

    # -------------------------------------------------------------- work roots

    def root(self, side: str, *, refresh: bool = False) -> Project:
        """A project root of our own (version.json, dockerfiles) for `side` (ours/upstream),
        so the checkout's snapshot and reports are never touched. Its dockerfiles/ is copied
        from the checkout by the cold build (`refresh`) and kept after: the rebuild and the
        arm64 build then use the templates the cold build used."""
        root = self.work / side
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.options.project.version_file, root / "version.json")
        target = root / "dockerfiles"
        if side == "ours" and (refresh or not target.is_dir()):
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(self.options.project.dockerfiles_dir, target)
        return Project(root)

    def sync(self, side: str, *, refresh: bool = False) -> tuple[Project, Snapshot]:
        """The work root of `side` with its snapshot (pruned for ours, whole for upstream)."""
        project = self.root(side, refresh=refresh)
        with self.locked(f"sync {side}"):
            snapshot = self.stages.sync(project, self.options.remote, side == "ours")
        return project, snapshot

    def image_for(self, side: str) -> tuple[str | None, str]:
        """The image of `side` to measure: the bench's own build if it exists, else (ours) the
        release build of build/reports; with a word on where it came from."""
        built = self.cold_build(side)
        if built and self.has_image(built.tag):
            return built.tag, "built by this benchmark's build part"
        if side == "ours":
            with contextlib.suppress(RecordInvalidError):  # an unreadable one names no image
                for record in reversed(load_build_records(self.options.project.reports_dir)):
                    if (record.backend, record.platform) == ("cpu", "linux/amd64") and (
                        self.has_image(record.ref)
                    ):
                        return record.ref, "from build/reports (nox -s build)"
        tag = self.tag(side, "cpu-amd64" if side == "ours" else "server")
        if self.has_image(tag):
            return tag, "left by an earlier benchmark run"
        return None, "no image: run the build part first"


def load_previous(report_dir: Path) -> list[PartResult]:
    path = report_dir / "report.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the previous report: {exc}") from None
    return parse_report(data, str(path))


def machine_info() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 / 1024)
    version = docker_cli("version", "-f", "{{.Server.Version}}", timeout=30)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": memory,
        "kernel": host.release(),
        "docker": version.stdout.strip() if version.returncode == 0 else None,
        "python": host.python_version(),
    }
