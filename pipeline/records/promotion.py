"""The promotion record: the gates a candidate was held to against the stable release, each with
both figures, and what moved. `nox -s promote` writes it (build/reports/promotion.json), attests
it on every promoted image, and `nox -s verify` shows it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.core.datafile import write_json_atomic
from pipeline.records.schema import SCHEMA, Record

PROMOTION_RECORD = "promotion.json"
_HINT = "re-run `nox -s promote`"


@dataclass(frozen=True)
class Gate(Record):
    """One gate: the candidate's figure, the stable release's, the limit, and the verdict."""

    KIND: ClassVar[str] = "gate"
    HINT: ClassVar[str] = _HINT

    name: str  # tiers | size cpu | generation | prompt | healthy
    passed: bool
    candidate: float | None  # the candidate's figure (None: none to compare)
    stable: float | None
    ratio: float | None  # candidate / stable, the figure the limit applies to
    limit: str  # ">= 0.95", "<= 1.10"...
    unit: str
    detail: str = ""  # how it was measured: rounds, spread, what failed

    def line(self) -> str:
        """One line: the verdict and both figures (what a refusal prints per failed gate)."""
        candidate, stable = _shown(self.candidate, self.unit), _shown(self.stable, self.unit)
        ratio = "" if self.ratio is None else f", ratio {self.ratio:.3f} (must be {self.limit})"
        detail = f"; {self.detail}" if self.detail else ""
        verdict = "passed" if self.passed else "FAILED"
        return f"gate {self.name}: {verdict}: candidate {candidate}, stable {stable}{ratio}{detail}"


def _shown(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.4g} {unit}".strip()


@dataclass(frozen=True)
class PromotionRecord(Record):
    KIND: ClassVar[str] = "promotion record"
    HINT: ClassVar[str] = _HINT

    candidate: str  # the candidate record's ref and version
    version: str
    commit: str
    repository: str
    stable_version: str | None  # what stable was (None: the first release)
    promoted: bool
    gates: tuple[Gate, ...]
    tags: tuple[str, ...] = ()  # the stable tags it moved
    seconds: float = 0.0
    schema: int = SCHEMA

    @property
    def failed(self) -> list[Gate]:
        return [gate for gate in self.gates if not gate.passed]


def write_promotion(directory: Path, record: PromotionRecord) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PROMOTION_RECORD
    write_json_atomic(path, record.to_json())
    return path
