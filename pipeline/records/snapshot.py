"""The vendor snapshot (sync's record): snapshot.json, the content manifest and its digest.

Everything here is offline and git-free, so the build stage can verify a snapshot cheaply:
`load_snapshot` reads snapshot.json, `check_snapshot` also re-hashes the files against it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.core.datafile import parse_json
from pipeline.core.errors import SnapshotError
from pipeline.core.fields import Fields
from pipeline.core.project import Project
from pipeline.core.version import COMMIT_RE, build_number, load_version
from pipeline.records.prune import PruneRules, load_prune_rules

SCHEMA = 1
SYNC_HINT = "run nox -s sync"
# How the content digest is made, recorded in snapshot.json so a reader can recompute it.
DIGEST_ALGORITHM = (
    "sha256 over '<kind> <sha256 of bytes> <path>\\n' per file, sorted by relative POSIX path; "
    "kind is file, exec (owner-executable) or link (sha256 of the link target)"
)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class TreeEntry:
    relpath: str
    path: str  # absolute; a str, not a Path: building thousands of Paths costs a tenth of a second
    kind: str  # file | exec | link | other
    size: int


def walk_tree(root: Path) -> list[TreeEntry]:
    """Every non-directory under `root`, sorted by relative POSIX path; symlinks not followed."""
    entries: list[TreeEntry] = []
    stack = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            for item in it:
                rel = prefix + item.name
                st = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((item.path, rel + "/"))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    kind = "link"
                elif stat.S_ISREG(st.st_mode):
                    kind = "exec" if st.st_mode & stat.S_IXUSR else "file"
                else:
                    kind = "other"
                entries.append(TreeEntry(rel, item.path, kind, st.st_size))
    entries.sort(key=lambda e: e.relpath)
    return entries


def _entry_hash(entry: TreeEntry) -> str:
    if entry.kind == "link":
        return hashlib.sha256(os.fsencode(os.readlink(entry.path))).hexdigest()
    if entry.kind == "other":
        return hashlib.sha256(b"").hexdigest()
    with open(entry.path, "rb", buffering=0) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def manifest(
    entries: list[TreeEntry], advance: Callable[[int], None] | None = None
) -> dict[str, str]:
    """`{relpath: "<kind> <sha256>"}`. Files are hashed in size-balanced chunks on a few
    threads: hashlib releases the GIL, so a 176 MB tree takes a fraction of a second."""
    workers = max(1, min(8, os.cpu_count() or 1))
    chunks: list[list[TreeEntry]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for entry in sorted(entries, key=lambda e: -e.size):
        lightest = loads.index(min(loads))
        chunks[lightest].append(entry)
        loads[lightest] += entry.size + 4096  # per-file overhead counts too

    def run(chunk: list[TreeEntry]) -> dict[str, str]:
        result: dict[str, str] = {}
        for entry in chunk:
            result[entry.relpath] = f"{entry.kind} {_entry_hash(entry)}"
            if advance is not None:
                advance(entry.size)
        return result

    merged: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(run, chunks):
            merged.update(part)
    return {rel: merged[rel] for rel in sorted(merged)}


def content_digest(files: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{files[rel]} {rel}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class TreeDiff:
    modified: tuple[str, ...]
    added: tuple[str, ...]
    deleted: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.modified or self.added or self.deleted)

    def summary(self, limit: int = 8) -> str:
        parts = []
        for label, paths in (
            ("modified", self.modified),
            ("added", self.added),
            ("deleted", self.deleted),
        ):
            if paths:
                shown = ", ".join(paths[:limit])
                more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
                parts.append(f"{label}: {shown}{more}")
        return "; ".join(parts)


def diff_files(recorded: Mapping[str, str], actual: Mapping[str, str]) -> TreeDiff:
    return TreeDiff(
        modified=tuple(
            sorted(p for p in recorded.keys() & actual.keys() if recorded[p] != actual[p])
        ),
        added=tuple(sorted(actual.keys() - recorded.keys())),
        deleted=tuple(sorted(recorded.keys() - actual.keys())),
    )


# --------------------------------------------------------------------------- snapshot.json


@dataclass(frozen=True)
class Snapshot:
    """third_party/llama.cpp/snapshot.json: what the vendor directory holds and where from."""

    repository: str  # upstream URL from version.json
    commit: str
    commit_date: str  # committer date, ISO 8601 with offset
    author: str  # "Name <email>"
    ref: str | None
    pruned: bool
    prune_rules_digest: str | None  # sha256 of pipeline/records/prune.yaml, None when not pruned
    removed_count: int
    removed_bytes: int
    file_count: int
    total_bytes: int
    content_digest: str
    fetched_from: str  # the remote actually used (a mirror, or the repository), no credentials
    files: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)

    @property
    def short(self) -> str:
        return self.commit[:7]

    @property
    def source_date_epoch(self) -> int:
        """The commit date as Unix seconds: SOURCE_DATE_EPOCH for reproducible builds."""
        return int(datetime.fromisoformat(self.commit_date).timestamp())

    @property
    def build_number(self) -> int | None:
        """Upstream's build number when the ref is a release tag `b<number>` (upstream's
        CMake derives it from git history, which the vendor copy does not carry)."""
        return build_number(self.ref)

    @property
    def upstream_bytes(self) -> int:
        return self.total_bytes + self.removed_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "repository": self.repository,
            "commit": self.commit,
            "commit_date": self.commit_date,
            "author": self.author,
            "ref": self.ref,
            "pruned": self.pruned,
            "prune_rules_digest": self.prune_rules_digest,
            "removed_count": self.removed_count,
            "removed_bytes": self.removed_bytes,
            "file_count": self.file_count,
            "total_bytes": self.total_bytes,
            "content_digest": self.content_digest,
            "content_digest_algorithm": DIGEST_ALGORITHM,
            "fetched_from": self.fetched_from,
            "files": dict(self.files),
        }


def parse_snapshot(data: Any, where: str) -> Snapshot:
    def bad(message: str, hint: str | None = None) -> SnapshotError:
        return SnapshotError(message.replace(f"{where}: ", f"{where} is malformed: ", 1), hint)

    spec = Fields(data, where, expected="an object", error=bad, hint=SYNC_HINT)
    if spec.raw("schema", None) != SCHEMA:
        spec.fail(f"schema is {spec.raw('schema', None)!r}, expected {SCHEMA}")
    values: dict[str, Any] = {
        "repository": spec.text("repository"),
        "commit": spec.text("commit", COMMIT_RE, expected="a 40-hex sha"),
        "commit_date": spec.text("commit_date"),
        "author": spec.text("author", allow_empty=True),
        "ref": spec.optional_text("ref"),
        "pruned": spec.boolean("pruned"),
        "prune_rules_digest": spec.optional_text("prune_rules_digest"),
        "removed_count": spec.integer("removed_count", minimum=0),
        "removed_bytes": spec.integer("removed_bytes", minimum=0),
        "file_count": spec.integer("file_count", minimum=0),
        "total_bytes": spec.integer("total_bytes", minimum=0),
        "content_digest": spec.text("content_digest"),
        "fetched_from": spec.text("fetched_from"),
    }
    try:
        datetime.fromisoformat(values["commit_date"])
    except ValueError:
        spec.fail("key 'commit_date' is not an ISO 8601 date")
    files = spec.string_map("files")
    if len(files) != values["file_count"] or content_digest(files) != values["content_digest"]:
        spec.fail("its file list does not match its file_count/content_digest")
    return Snapshot(**values, files=files)


def read_snapshot_file(path: Path) -> Snapshot:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotError(f"no llama.cpp snapshot: {path} is missing", SYNC_HINT) from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror}", SYNC_HINT) from None
    except UnicodeDecodeError:
        raise SnapshotError(f"{path} is not UTF-8 text", SYNC_HINT) from None
    return parse_snapshot(parse_json(text, str(path), SnapshotError, SYNC_HINT), str(path))


def _display(project: Project, path: Path) -> str:
    try:
        return str(path.relative_to(project.root))
    except ValueError:
        return str(path)


def load_snapshot(project: Project) -> Snapshot:
    """snapshot.json, validated (not the files: see `check_snapshot`)."""
    snapshot = read_snapshot_file(project.snapshot_file)
    if not project.vendor_dir.is_dir():
        raise SnapshotError(
            f"{_display(project, project.vendor_dir)} is missing although snapshot.json exists",
            SYNC_HINT,
        )
    return snapshot


def verify_tree(
    root: Path, snapshot: Snapshot, advance: Callable[[int], None] | None = None
) -> TreeDiff:
    return diff_files(snapshot.files, manifest(walk_tree(root), advance))


def check_snapshot(
    project: Project,
    advance: Callable[[int], None] | None = None,
    rules: PruneRules | None = None,
) -> Snapshot:
    """The snapshot, verified offline: at the pin of version.json, made by the current prune
    rules, and every file as recorded. Raises SnapshotError naming what differs."""
    snapshot = load_snapshot(project)
    pin = load_version(project.version_file).llama_cpp
    if snapshot.commit != pin.commit:
        raise SnapshotError(
            f"the snapshot is at {snapshot.short} but version.json pins {pin.short}", SYNC_HINT
        )
    if snapshot.pruned:
        current = (rules or load_prune_rules()).digest
        if snapshot.prune_rules_digest != current:
            raise SnapshotError(
                "pipeline/records/prune.yaml changed since the snapshot was made", SYNC_HINT
            )
    try:
        diff = verify_tree(project.vendor_dir, snapshot, advance)
    except OSError as exc:
        raise SnapshotError(
            f"cannot read {exc.filename or project.vendor_dir}: {exc.strerror}", SYNC_HINT
        ) from None
    if diff:
        raise SnapshotError(
            f"{_display(project, project.vendor_dir)} differs from snapshot.json: {diff.summary()}",
            f"move your changes away and delete the directory, then {SYNC_HINT}",
        )
    return snapshot
