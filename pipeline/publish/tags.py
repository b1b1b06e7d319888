"""Tag rules as data (tags.yaml, in docker/metadata-action's style) and the decision
what publishing a release does to each tag. Pure: no registry, no I/O but reading the rules.

`TagRules.tags_for` turns a release (version, backend, llama.cpp pin) into its tags; `decide`
takes one tag, the index it would point to and what the registry holds now, and says what
happens (create, move, unchanged, leave, conflict, overwrite) and why. Floating tags only move
forward (by the version label of what they point to); immutable tags are never rewritten with
another digest unless forced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import total_ordering
from pathlib import Path
from typing import Any

from pipeline.core.datafile import load_yaml
from pipeline.core.errors import ConfigError
from pipeline.core.fields import Fields
from pipeline.core.version import SEMVER_RE
from pipeline.oci.image import TAG_RE

TAG_RULES_FILE = Path(__file__).with_name("tags.yaml")
LLAMA_BUILD_RE = re.compile(r"^b\d+$")


# ---------------------------------------------------------------------------- versions
@total_ordering
@dataclass(frozen=True)
class SemVer:
    """A semantic version, ordered by SemVer 2.0.0 §11 (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SemVer:
        match = SEMVER_RE.match(text.strip())
        if not match:
            raise ConfigError(f"{text!r} is not a semantic version such as 1.2.3 or 1.3.0-rc.1")
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre)

    @classmethod
    def parse_or_none(cls, text: str | None) -> SemVer | None:
        if text is None:
            return None
        try:
            return cls.parse(text)
        except ConfigError:
            return None

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after its prereleases; numeric identifiers before alphanumeric ones.
        ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, ids)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{'.'.join(self.prerelease)}" if self.prerelease else base


# ---------------------------------------------------------------------------- tag rules
class TagKind(StrEnum):
    IMMUTABLE = "immutable"
    FLOATING = "floating"


_VARIABLES = (
    "version",
    "major",
    "minor",
    "patch",
    "backend",
    "suffix",
    "llama_build",
    "llama_sha7",
)
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([a-z0-9_]+)\s*\}\}")


@dataclass(frozen=True)
class TagRule:
    pattern: str
    kind: TagKind
    prerelease: bool = False
    requires: str | None = None
    other_backends: str | None = None


@dataclass(frozen=True)
class PlannedTag:
    """One tag a release gets for one backend, and the rule that made it."""

    name: str
    kind: TagKind
    rule: str


@dataclass(frozen=True)
class TagRules:
    backend_suffix: str
    rules: tuple[TagRule, ...]

    def tags_for(
        self,
        version: SemVer,
        backend: str,
        suffix: str,
        commit: str,
        llama_ref: str | None,
    ) -> list[PlannedTag]:
        """Every tag of `backend` (tag suffix `suffix`, "" for the default backend) for this
        release, in rule order, without duplicates."""
        variables = {
            "version": str(version),
            "major": str(version.major),
            "minor": str(version.minor),
            "patch": str(version.patch),
            "backend": backend,
            "suffix": suffix,
            "llama_build": llama_ref if llama_ref and LLAMA_BUILD_RE.match(llama_ref) else "",
            "llama_sha7": commit[:7],
        }
        tags: list[PlannedTag] = []
        for rule in self.rules:
            if version.is_prerelease and not rule.prerelease:
                continue
            if rule.requires and not variables[rule.requires]:
                continue
            if not suffix:
                pattern = rule.pattern
            elif rule.other_backends is not None:
                pattern = rule.other_backends
            else:
                pattern = rule.pattern + self.backend_suffix
            name = _substitute(pattern, variables)
            if not TAG_RE.match(name):
                raise ConfigError(
                    f"{TAG_RULES_FILE.name}: rule {rule.pattern!r} makes {name!r} for backend "
                    f"{backend}, which is not a valid tag",
                    "tags are 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                )
            if name not in {t.name for t in tags}:
                tags.append(PlannedTag(name, rule.kind, rule.pattern))
        return tags

    def check_backends(
        self,
        backends: Iterable[tuple[str, str]],
        version: SemVer,
        commit: str,
        llama_ref: str | None,
        where: str = "matrix.yaml",
    ) -> None:
        """Refuse (ConfigError) two backends, given as (name, tag suffix), that this release
        would give one tag: the second would overwrite the first's tags, immutable ones too."""
        owners: dict[str, str] = {}
        for backend, suffix in backends:
            for tag in self.tags_for(version, backend, suffix, commit, llama_ref):
                if tag.name in owners:
                    raise ConfigError(
                        f"{TAG_RULES_FILE.name} and {where}: backends {owners[tag.name]} and "
                        f"{backend} would both get the tag {tag.name!r} (release {version}): "
                        "the second would overwrite the first's",
                        "give the backend a tag_suffix no other backend's tags are made of",
                    )
                owners[tag.name] = backend


def _substitute(pattern: str, variables: Mapping[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        return variables[match.group(1)]

    return _PLACEHOLDER_RE.sub(value, pattern)


def _pattern(spec: Fields, key: str) -> str:
    pattern: str = spec.text(key, expected="a non-empty pattern")
    for name in _PLACEHOLDER_RE.findall(pattern):
        if name not in _VARIABLES:
            spec.fail(f"unknown variable {{{{{name}}}}}", f"known: {', '.join(_VARIABLES)}")
    return pattern


def parse_tag_rules(data: Any, where: str = TAG_RULES_FILE.name) -> TagRules:
    top = Fields(data, where, ("schema", "backend_suffix", "rules"))
    if top.raw("schema", None) != 1:
        top.fail("expected a mapping with schema: 1")
    suffix = _pattern(top, "backend_suffix")
    if "{{" not in suffix:
        top.fail("backend_suffix must be a pattern such as '-{{suffix}}'")
    rules = []
    known = ("pattern", "kind", "prerelease", "requires", "other_backends")
    for spec in top.items("rules", "rule"):
        spec.no_unknown(known)
        pattern = _pattern(spec, "pattern")
        kind = TagKind(spec.choice("kind", [k.value for k in TagKind]))
        prerelease = spec.boolean("prerelease", default=False)
        requires = spec.raw("requires", None)
        if requires is not None:
            requires = spec.choice("requires", _VARIABLES)
        other = _pattern(spec, "other_backends") if spec.raw("other_backends", None) else None
        if kind is TagKind.FLOATING and prerelease:
            # A floating tag on a prerelease would move users onto an unreleased build.
            spec.fail("a floating tag cannot apply to prereleases")
        rules.append(TagRule(pattern, kind, prerelease, requires, other))
    return TagRules(suffix, tuple(rules))


def load_tag_rules(path: Path = TAG_RULES_FILE) -> TagRules:
    return parse_tag_rules(load_yaml(path), path.name)


# ---------------------------------------------------------------------------- decisions
class Action(StrEnum):
    CREATE = "create"
    MOVE = "move"
    UNCHANGED = "unchanged"
    LEAVE = "leave"
    CONFLICT = "conflict"
    OVERWRITE = "overwrite"
    # A dry run that cannot know: the registry could not be read, or the sources are not
    # pushed yet (so the index digest is not known).
    UNKNOWN = "unknown"


PUSHING = frozenset({Action.CREATE, Action.MOVE, Action.OVERWRITE})


@dataclass(frozen=True)
class ExistingTag:
    """What a tag points to in the registry now; version from the image's version label."""

    digest: str
    version: str | None


@dataclass(frozen=True)
class TagDecision:
    tag: str
    kind: TagKind
    action: Action
    reason: str
    current: ExistingTag | None = None

    @property
    def pushes(self) -> bool:
        return self.action in PUSHING


def decide(
    tag: PlannedTag,
    version: SemVer,
    target_digest: str | None,
    existing: ExistingTag | None,
    force: bool = False,
    *,
    readable: bool = True,
) -> TagDecision:
    """What publishing `version` (as index `target_digest`; None: not known yet, the sources
    are not pushed) does to one tag, and why. `readable` False: the registry could not be
    read, so what the tag points to now is unknown."""

    def decision(action: Action, reason: str) -> TagDecision:
        return TagDecision(tag.name, tag.kind, action, reason, existing)

    if not readable:
        return decision(Action.UNKNOWN, "the registry could not be read: its state is unknown")
    if existing is None:
        return decision(Action.CREATE, "new tag")
    if existing.digest == target_digest:
        return decision(Action.UNCHANGED, "already points to this index")
    was = f"{existing.digest[:19]}… (version {existing.version or 'unknown'})"
    if tag.kind is TagKind.IMMUTABLE:
        if force:
            return decision(Action.OVERWRITE, f"--force: replaces {was}")
        if target_digest is None:
            return decision(
                Action.UNKNOWN,
                f"immutable, already {was}: unchanged if the pushed index is that one, "
                "else a conflict",
            )
        return decision(Action.CONFLICT, f"immutable, already {was}")
    current = SemVer.parse_or_none(existing.version)
    if current is None:
        return decision(Action.MOVE, f"from {was}: no semantic version label, taken as older")
    if current > version:
        return decision(Action.LEAVE, f"stays on newer {current}")
    if current == version:
        return decision(Action.MOVE, f"from another build of {current}")
    return decision(Action.MOVE, f"forward from {current}")
