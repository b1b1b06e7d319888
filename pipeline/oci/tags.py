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
from pathlib import Path
from typing import Any

from pipeline.core.datafile import load_yaml
from pipeline.core.errors import ConfigError
from pipeline.core.fields import Fields
from pipeline.core.version import SemVer, build_number
from pipeline.oci.image import TAG_RE

TAG_RULES_FILE = Path(__file__).with_name("tags.yaml")


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


class Order(StrEnum):
    """What moves a floating tag forward: a newer release of this project (`version`), or a
    newer upstream build first and then a newer release (`llama_build`: the edge channel)."""

    VERSION = "version"
    LLAMA_BUILD = "llama_build"


STABLE = "stable"  # what a promotion moves: releases users pin by version
EDGE = "edge"  # every upstream release the train proved, newest first


@dataclass(frozen=True)
class TagRule:
    pattern: str
    kind: TagKind
    prerelease: bool = False
    requires: str | None = None
    other_backends: str | None = None
    order: Order = Order.VERSION


@dataclass(frozen=True)
class PlannedTag:
    """One tag a release gets for one backend, and the rule that made it."""

    name: str
    kind: TagKind
    rule: str
    order: Order = Order.VERSION


@dataclass(frozen=True)
class TagRules:
    backend_suffix: str
    channels: Mapping[str, tuple[TagRule, ...]]

    @property
    def rules(self) -> tuple[TagRule, ...]:
        """The stable channel's rules: what a release gets."""
        return self.channels[STABLE]

    def head(self, channel: str, suffix: str) -> str:
        """The tag that always names a channel's newest image of a backend (`latest`, `vulkan`,
        `edge`, `edge-vulkan`): its first floating rule that names no version or build."""
        for rule in self.channels[channel]:
            pattern = rule.other_backends if suffix and rule.other_backends else rule.pattern
            if suffix and not rule.other_backends:
                pattern += self.backend_suffix
            unversioned = set(_PLACEHOLDER_RE.findall(pattern)) <= {"suffix", "backend"}
            if rule.kind is TagKind.FLOATING and unversioned:
                return _substitute(pattern, {"suffix": suffix, "backend": suffix})
        raise ConfigError(f"{TAG_RULES_FILE.name}: channel {channel} has no unversioned tag")

    def tags_for(
        self,
        version: SemVer,
        backend: str,
        suffix: str,
        commit: str,
        llama_ref: str | None,
        channel: str = STABLE,
    ) -> list[PlannedTag]:
        """Every tag of `backend` (tag suffix `suffix`, "" for the default backend) for this
        release on `channel`, in rule order, without duplicates."""
        variables = {
            "version": str(version),
            "major": str(version.major),
            "minor": str(version.minor),
            "patch": str(version.patch),
            "backend": backend,
            "suffix": suffix,
            "llama_build": (llama_ref or "") if build_number(llama_ref) is not None else "",
            "llama_sha7": commit[:7],
        }
        tags: list[PlannedTag] = []
        for rule in self.channels[channel]:
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
                tags.append(PlannedTag(name, rule.kind, rule.pattern, rule.order))
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


def _rule(spec: Fields) -> TagRule:
    spec.no_unknown(("pattern", "kind", "prerelease", "requires", "other_backends", "order"))
    pattern = _pattern(spec, "pattern")
    kind = TagKind(spec.choice("kind", [k.value for k in TagKind]))
    prerelease = spec.boolean("prerelease", default=False)
    requires = spec.raw("requires", None)
    if requires is not None:
        requires = spec.choice("requires", _VARIABLES)
    other = _pattern(spec, "other_backends") if spec.raw("other_backends", None) else None
    order = Order(spec.choice("order", [o.value for o in Order], default=Order.VERSION))
    if kind is TagKind.FLOATING and prerelease:
        # A floating tag on a prerelease would move users onto an unreleased build.
        spec.fail("a floating tag cannot apply to prereleases")
    return TagRule(pattern, kind, prerelease, requires, other, order)


def parse_tag_rules(data: Any, where: str = TAG_RULES_FILE.name) -> TagRules:
    top = Fields(data, where, ("schema", "backend_suffix", "channels"))
    if top.raw("schema", None) != 2:
        top.fail("expected a mapping with schema: 2")
    suffix = _pattern(top, "backend_suffix")
    if "{{" not in suffix:
        top.fail("backend_suffix must be a pattern such as '-{{suffix}}'")
    channels = {
        name: tuple(_rule(spec) for spec in top.sub("channels").items(name, "rule"))
        for name in top.sub("channels", (STABLE, EDGE)).data
    }
    missing = {STABLE, EDGE} - set(channels)
    if missing:
        top.fail(f"channels: missing {', '.join(sorted(missing))}")
    return TagRules(suffix, channels)


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
    """What a tag points to in the registry now; version and upstream build from the image's
    labels (None where it has none)."""

    digest: str
    version: str | None
    llama_build: int | None = None


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
    llama_build: int | None = None,
) -> TagDecision:
    """What publishing `version` of upstream build `llama_build` (as index `target_digest`;
    None: not known yet, the sources are not pushed) does to one tag, and why. `readable`
    False: the registry could not be read, so what the tag points to now is unknown."""

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
    if tag.order is Order.LLAMA_BUILD and existing.llama_build != llama_build:
        if (existing.llama_build or 0) > (llama_build or 0):
            return decision(Action.LEAVE, f"stays on newer upstream b{existing.llama_build}")
        older = f"b{existing.llama_build}" if existing.llama_build else "no upstream build"
        return decision(Action.MOVE, f"forward from {older} to b{llama_build}")
    current = SemVer.parse_or_none(existing.version)
    if current is None:
        return decision(Action.MOVE, f"from {was}: no semantic version label, taken as older")
    if current > version:
        return decision(Action.LEAVE, f"stays on newer {current}")
    if current == version:
        return decision(Action.MOVE, f"from another build of {current}")
    return decision(Action.MOVE, f"forward from {current}")
