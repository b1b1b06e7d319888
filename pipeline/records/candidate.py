"""The candidate record: what `nox -s track` made of one upstream release (or one packaging
update of the current pin) and what `nox -s promote` reads: the pin, the version its images
carry, each image's digest, size and tiers, the edge indexes, every stage's time, and, when
the train stopped, the stage that failed and the last lines of its log.

    build/track/<ref>/candidate.json   (and build/track/candidate.json: the newest one)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.core.datafile import write_json_atomic
from pipeline.core.errors import RecordInvalidError, RecordMissingError
from pipeline.core.version import COMMIT_RE
from pipeline.oci.image import DIGEST_RE
from pipeline.records.schema import SCHEMA, Record

CANDIDATE_RECORD = "candidate.json"
_HINT = "re-run `nox -s track`"
STATUSES = ("published", "failed")


@dataclass(frozen=True)
class StageRun(Record):
    """One command of the chain, as the train ran it."""

    KIND: ClassVar[str] = "train stage"
    HINT: ClassVar[str] = _HINT

    stage: str  # "build cpu linux/arm64", "smoke cpu linux/amd64 real", "publish edge"...
    seconds: float
    exit_code: int
    log: str  # its whole output, a file beside the record
    tail: tuple[str, ...] = ()  # the log's last lines when it failed


@dataclass(frozen=True)
class TierResult(Record):
    KIND: ClassVar[str] = "tier result"
    HINT: ClassVar[str] = _HINT

    tier: str
    passed: bool
    seconds: float
    failed: tuple[str, ...] = ()  # the checks that failed


@dataclass(frozen=True)
class CandidateImage(Record):
    """One (backend, platform) image of the candidate, pushed by digest and smoke-tested."""

    KIND: ClassVar[str] = "candidate image"
    HINT: ClassVar[str] = _HINT

    backend: str
    platform: str
    digest: str
    tiers: tuple[TierResult, ...]
    compressed_bytes: int | None = None
    size_bytes: int | None = None
    # The CPU variant set it was built with (its build record's; None: not known, as for
    # images read back from edge, whose tiers are what their attestations say).
    cpu_variants: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.tiers) and all(t.passed for t in self.tiers)


@dataclass(frozen=True)
class CandidateRecord(Record):
    KIND: ClassVar[str] = "candidate record"
    HINT: ClassVar[str] = _HINT

    ref: str | None  # the upstream ref (a release tag b<N>), as version.json would pin it
    commit: str
    version: str  # this project's version the images carry (the release a promotion makes)
    repository: str  # where its edge tags and digests are
    reason: str  # why the train ran: a newer upstream release, or which packages changed
    status: str  # published (on edge) | failed
    seconds: float
    stages: tuple[StageRun, ...] = ()
    images: tuple[CandidateImage, ...] = ()
    indexes: dict[str, str] | None = None  # backend -> the index digest edge tags point to
    failed_stage: str | None = None
    # Whether a second build of the cpu image (this machine's platform) gave the pushed digest:
    # `identical: <digest>`, `differs: ...` or `not checked: why`; None: not asked for.
    reproducible: str | None = None
    schema: int = SCHEMA

    @property
    def name(self) -> str:
        """The ref, or the commit's short sha where the pin is not a release tag."""
        return self.ref or self.commit[:7]

    @property
    def published(self) -> bool:
        return self.status == "published"

    def validate(self, where: str) -> None:
        if self.status not in STATUSES or not COMMIT_RE.match(self.commit):
            raise RecordInvalidError(f"{where}: malformed status or commit", _HINT)
        digests = [i.digest for i in self.images] + list((self.indexes or {}).values())
        if not all(DIGEST_RE.match(d) for d in digests):
            raise RecordInvalidError(f"{where}: malformed digest", _HINT)
        if self.published and not self.indexes:
            raise RecordInvalidError(f"{where}: published, but names no index", _HINT)


def write_candidate(path: Path, record: CandidateRecord) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record.to_json())
    return path


def load_candidate(path: Path) -> CandidateRecord:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordMissingError(f"no candidate record {path}", "run `nox -s track`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordInvalidError(f"cannot read {path}: {exc}", _HINT) from None
    return CandidateRecord.from_json(data, str(path))
