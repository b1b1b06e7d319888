"""Prune rules (prune.yaml, beside this file): globs of upstream paths no image build needs,
with exceptions. sync prunes by them; their digest goes into snapshot.json, and a snapshot made
by other rules than the current ones is refused wherever it is checked (build included)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.datafile import parse_yaml, read_data_file
from pipeline.core.fields import REQUIRED, Fields

PRUNE_RULES_FILE = Path(__file__).with_name("prune.yaml")


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`*` stays in one path segment, `**` spans segments, `?` is one character.

    A match also covers everything beneath the matched path; a trailing `/` restricts the
    pattern to directories (so `docs/` removes the tree, never a file named `docs`).
    """
    directory_only = pattern.endswith("/")
    body = pattern.rstrip("/")
    out: list[str] = []
    i = 0
    while i < len(body):
        if body.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    tail = "/.+" if directory_only else "(?:/.+)?"
    return re.compile("^" + "".join(out) + tail + "$")


@dataclass(frozen=True)
class PruneRules:
    """Globs of paths no image build needs (`remove`), with exceptions (`keep`)."""

    remove: tuple[str, ...]
    keep: tuple[str, ...]
    digest: str  # sha256 of the YAML file's bytes: snapshot.json records which rules made it
    # All patterns of a list as one alternation: one regex call per path, not sixty.
    _remove_any: re.Pattern[str] | None = field(repr=False, compare=False, default=None)
    _keep_any: re.Pattern[str] | None = field(repr=False, compare=False, default=None)

    @classmethod
    def from_patterns(cls, remove: Iterable[str], keep: Iterable[str], digest: str) -> PruneRules:
        remove, keep = tuple(remove), tuple(keep)

        def any_of(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
            if not patterns:
                return None
            return re.compile("|".join(f"(?:{glob_to_regex(p).pattern})" for p in patterns))

        return cls(remove, keep, digest, any_of(remove), any_of(keep))

    def removes(self, relpath: str) -> bool:
        if self._remove_any is None or not self._remove_any.match(relpath):
            return False
        return self._keep_any is None or not self._keep_any.match(relpath)


def _globs(spec: Fields, key: str, default: object) -> tuple[str, ...]:
    patterns: tuple[str, ...] = spec.strings(key, default=default)
    for pattern in patterns:
        if not pattern.strip("/ "):
            spec.fail(f"{key}: {pattern!r} is not a glob (expected a string like 'docs/')")
        if pattern.startswith("/") or "\\" in pattern or ".." in pattern.split("/"):
            spec.fail(f"{key}: {pattern!r} must be a relative POSIX path glob without '..' or '\\'")
    return patterns


def parse_prune_rules(data: object, digest: str, where: str = "prune.yaml") -> PruneRules:
    spec = Fields(data, where, ("remove", "keep"))
    return PruneRules.from_patterns(
        _globs(spec, "remove", REQUIRED), _globs(spec, "keep", ()), digest
    )


def load_prune_rules(path: Path = PRUNE_RULES_FILE) -> PruneRules:
    text = read_data_file(path, "restore it from the repository")
    digest = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return parse_prune_rules(parse_yaml(text, path.name), digest, path.name)
