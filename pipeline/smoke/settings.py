"""Smoke's own data (pipeline/smoke/smoke.yaml): timing bounds, what the server is asked, the local
Hub. What differs per backend (environment, timing scale, device log) is matrix.yaml's."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.config import load_yaml
from pipeline.core.errors import ConfigError
from pipeline.matrix import host_platform

SETTINGS_FILE = Path(__file__).with_name("smoke.yaml")


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

    def with_healthy(self, seconds: float | None) -> Timing:
        return self if seconds is None else replace(self, healthy=seconds)


@dataclass(frozen=True)
class Settings:
    timing: dict[str, Timing]
    server: dict[str, Any]
    requests: dict[str, Any]
    hub: dict[str, Any]
    real: dict[str, Any]

    def timing_for(self, platform: str) -> Timing:
        """`native` on this machine's platform, `emulated` (QEMU, ten times slower) else."""
        return self.timing["native" if platform == host_platform() else "emulated"]


def load_settings(path: Path = SETTINGS_FILE) -> Settings:
    data = load_yaml(path)
    try:
        timing = {name: Timing(**values) for name, values in data["timing"].items()}
        return Settings(timing, data["server"], data["requests"], data["hub"], data["real"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot load smoke settings {path.name}: {exc}") from None
