"""publish.json: what a publish planned for each backend (its index, sources and every tag's
decision and reason), what it pushed, whether it verified it, and how long each phase took."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.core.datafile import write_json_atomic
from pipeline.core.errors import RecordInvalidError, RecordMissingError
from pipeline.oci.image import DIGEST_RE
from pipeline.records.schema import SCHEMA, Record

PUBLISH_RECORD = "publish.json"
_HINT = "re-run `nox -s publish`"


@dataclass(frozen=True)
class PublishedSource(Record):
    KIND: ClassVar[str] = "publish source"
    HINT: ClassVar[str] = _HINT

    platform: str
    ref: str  # name@digest the index took it from
    report: str  # the build record's file name
    pushed: bool


@dataclass(frozen=True)
class PublishedTag(Record):
    KIND: ClassVar[str] = "publish tag"
    HINT: ClassVar[str] = _HINT

    tag: str
    kind: str  # immutable | floating
    action: str  # create | move | unchanged | leave | conflict | overwrite | unknown
    reason: str
    current: str | None  # the digest it pointed to before
    current_version: str | None
    target: str | None  # the index it points to now (None: unknown in a dry run)


@dataclass(frozen=True)
class PublishedBackend(Record):
    KIND: ClassVar[str] = "published backend"
    HINT: ClassVar[str] = _HINT

    backend: str
    index: str | None
    platforms: tuple[str, ...]
    sources: tuple[PublishedSource, ...]
    tags: tuple[PublishedTag, ...]


@dataclass(frozen=True)
class PublishRecord(Record):
    KIND: ClassVar[str] = "publish report"
    HINT: ClassVar[str] = _HINT

    backends: tuple[PublishedBackend, ...]
    version: str
    commit: str
    repository: str
    dry_run: bool
    force: bool
    verified: bool
    seconds: float
    notes: tuple[str, ...]
    phases: dict[str, float]
    pushed: tuple[str, ...]
    schema: int = SCHEMA

    def validate(self, where: str) -> None:
        for backend in self.backends:
            if backend.index is not None and not DIGEST_RE.match(backend.index):
                raise RecordInvalidError(f"{where}: malformed index of {backend.backend}", _HINT)


def write_publish_record(directory: Path, record: PublishRecord) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PUBLISH_RECORD
    write_json_atomic(path, record.to_json())
    return path


def load_publish_record(directory: Path) -> PublishRecord:
    path = directory / PUBLISH_RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordMissingError(
            f"no {PUBLISH_RECORD} in {directory}", "run `nox -s publish`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordInvalidError(f"cannot read {path}: {exc}", _HINT) from None
    return PublishRecord.from_json(data, str(path))
