"""`python -m pipeline publish`: join smoke-tested per-platform digests into one index per
backend, tag it by the rules in tags.yaml, push, and verify through the registry API.

The plan is computed before anything is written: every tag of every backend gets an action
(create, move, unchanged, leave, conflict, overwrite) and a reason, from what the registry holds
now. Floating tags only move forward (by the version label of the image they point to);
immutable tags are never rewritten with another digest unless --force. `--dry-run` prints the
plan and stops. Pushing: `docker buildx imagetools create` joins the digests into an index and
pushes it under the first tag (immutable tags first), the other tags get the same index bytes
through the registry API; credentials reach buildx through a docker config of our own in a
temporary directory, never through a command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import total_ordering
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from pipeline import console
from pipeline.cli import Command
from pipeline.config import SEMVER_RE, Project, VersionInfo, load_version, write_json_atomic
from pipeline.errors import (
    ConfigError,
    CredentialsError,
    DockerUnavailableError,
    PipelineError,
    PublishError,
    ToolMissingError,
    UsageError,
)
from pipeline.registry import (
    DIGEST_RE,
    DOCKER_HUB,
    DOCKER_HUB_CONFIG_KEY,
    LABEL_REVISION,
    LABEL_VERSION,
    TAG_RE,
    Credentials,
    ImageName,
    Manifest,
    RegistryClient,
    RetryPolicy,
    credentials_from_env,
)

TAG_RULES_FILE = Path(__file__).with_name("tags.yaml")
REPORT_NAME = "publish.json"
LLAMA_BUILD_RE = re.compile(r"^b\d+$")
PUSHED_OUTPUTS = frozenset({"push", "push-by-digest"})


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


def _substitute(pattern: str, variables: Mapping[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        return variables[match.group(1)]

    return _PLACEHOLDER_RE.sub(value, pattern)


def _check_placeholders(text: str, where: str) -> None:
    for name in _PLACEHOLDER_RE.findall(text):
        if name not in _VARIABLES:
            raise ConfigError(
                f"{where}: unknown variable {{{{{name}}}}}", f"known: {', '.join(_VARIABLES)}"
            )


def parse_tag_rules(data: Any, where: str = TAG_RULES_FILE.name) -> TagRules:
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise ConfigError(f"{where}: expected a mapping with schema: 1")
    unknown_top = set(data) - {"schema", "backend_suffix", "rules"}
    if unknown_top:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown_top)}")
    suffix = data.get("backend_suffix")
    raw_rules = data.get("rules")
    if not isinstance(suffix, str) or "{{" not in suffix:
        raise ConfigError(f"{where}: backend_suffix must be a pattern such as '-{{{{suffix}}}}'")
    _check_placeholders(suffix, f"{where}: backend_suffix")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError(f"{where}: rules must be a non-empty list")
    rules = []
    known = {"pattern", "kind", "prerelease", "requires", "other_backends"}
    for index, raw in enumerate(raw_rules, 1):
        at = f"{where}: rule {index}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{at} is not a mapping")
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {sorted(unknown)}", f"known: {sorted(known)}")
        pattern = raw.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{at}: pattern must be a non-empty string")
        _check_placeholders(pattern, at)
        try:
            kind = TagKind(str(raw.get("kind")))
        except ValueError:
            raise ConfigError(f"{at}: kind must be immutable or floating") from None
        prerelease = raw.get("prerelease", False)
        if not isinstance(prerelease, bool):
            raise ConfigError(f"{at}: prerelease must be true or false")
        requires = raw.get("requires")
        if requires is not None and requires not in _VARIABLES:
            raise ConfigError(f"{at}: requires must name a variable", f"known: {_VARIABLES}")
        other = raw.get("other_backends")
        if other is not None:
            if not isinstance(other, str) or not other:
                raise ConfigError(f"{at}: other_backends must be a non-empty pattern")
            _check_placeholders(other, at)
        if kind is TagKind.FLOATING and prerelease:
            # A floating tag on a prerelease would move users onto an unreleased build.
            raise ConfigError(f"{at}: a floating tag cannot apply to prereleases")
        rules.append(TagRule(pattern, kind, prerelease, requires, other))
    return TagRules(suffix, tuple(rules))


def load_tag_rules(path: Path = TAG_RULES_FILE) -> TagRules:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name} is not valid YAML: {exc}") from None
    return parse_tag_rules(data, path.name)


# ---------------------------------------------------------------------------- decisions
class Action(StrEnum):
    CREATE = "create"
    MOVE = "move"
    UNCHANGED = "unchanged"
    LEAVE = "leave"
    CONFLICT = "conflict"
    OVERWRITE = "overwrite"


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
    target_digest: str,
    existing: ExistingTag | None,
    force: bool = False,
) -> TagDecision:
    """What publishing `version` (as index `target_digest`) does to one tag, and why."""

    def decision(action: Action, reason: str) -> TagDecision:
        return TagDecision(tag.name, tag.kind, action, reason, existing)

    if existing is None:
        return decision(Action.CREATE, "new tag")
    if existing.digest == target_digest:
        return decision(Action.UNCHANGED, "already points to this index")
    was = f"{existing.digest[:19]}… (version {existing.version or 'unknown'})"
    if tag.kind is TagKind.IMMUTABLE:
        if force:
            return decision(Action.OVERWRITE, f"--force: replaces {was}")
        return decision(Action.CONFLICT, f"immutable, already {was}")
    current = SemVer.parse_or_none(existing.version)
    if current is None:
        return decision(Action.MOVE, f"from {was}: no semantic version label, taken as older")
    if current > version:
        return decision(Action.LEAVE, f"stays on newer {current}")
    if current == version:
        return decision(Action.MOVE, f"from another build of {current}")
    return decision(Action.MOVE, f"forward from {current}")


# ---------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class BuildRecord:
    """One per-platform image from build/reports/build-<backend>-<arch>.json."""

    path: Path
    backend: str
    platform: str
    image: str
    digest: str
    output: str
    commit: str
    version: str
    # The per-platform index buildx pushed when attestations are on (image + SBOM/provenance
    # manifests); joining it instead of the bare image keeps the attestations in the release.
    index_digest: str | None = None

    @property
    def source(self) -> str:
        return f"{self.image}@{self.index_digest or self.digest}"


@dataclass(frozen=True)
class SmokeRecord:
    path: Path
    backend: str
    platform: str
    digest: str
    passed: bool
    failed_checks: tuple[str, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read report {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise ConfigError(f"report {path} is not a schema 1 report")
    return data


def _field(data: Mapping[str, Any], key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"report {path}: key {key!r} missing or not a string")
    return value


def load_build_records(directory: Path) -> list[BuildRecord]:
    # Reads the agreed schema directly; pipeline.build owns the dataclass the build side uses.
    records = []
    for path in sorted(directory.glob("build-*.json")):
        data = _read_json(path)
        records.append(
            BuildRecord(
                path=path,
                backend=_field(data, "backend", path),
                platform=_field(data, "platform", path),
                image=_field(data, "image", path),
                digest=_field(data, "digest", path),
                output=_field(data, "output", path),
                commit=_field(data, "commit", path),
                version=_field(data, "version", path),
                index_digest=_optional_digest(data, "index_digest", path),
            )
        )
    return records


def _optional_digest(data: Mapping[str, Any], key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ConfigError(f"report {path}: key {key!r} is not a sha256 digest")
    return value


def load_smoke_records(directory: Path) -> list[SmokeRecord]:
    records = []
    for path in sorted(directory.glob("smoke-*.json")):
        data = _read_json(path)
        failed = []
        for check in data.get("checks") or []:
            if isinstance(check, dict) and check.get("passed") is False:
                failed.append(str(check.get("name", "?")))
        records.append(
            SmokeRecord(
                path=path,
                backend=_field(data, "backend", path),
                platform=_field(data, "platform", path),
                digest=_field(data, "digest", path),
                passed=data.get("passed") is True,
                failed_checks=tuple(failed),
            )
        )
    return records


def check_reports(
    builds: Sequence[BuildRecord], smokes: Sequence[SmokeRecord], info: VersionInfo
) -> None:
    """Refuse what must not be published: unpushed, stale or not smoke-tested images."""
    seen: dict[tuple[str, str], Path] = {}
    for build in builds:
        key = (build.backend, build.platform)
        if key in seen:
            raise PublishError(
                f"two build reports for {build.backend} {build.platform}: "
                f"{seen[key].name} and {build.path.name}"
            )
        seen[key] = build.path
        if build.output not in PUSHED_OUTPUTS:
            raise PublishError(
                f"{build.path.name}: {build.backend} {build.platform} was built with output "
                f"{build.output!r}, so no registry holds it",
                f"build it with `nox -s build -- {build.platform} --backend {build.backend} "
                "--push-by-digest`",
            )
        if build.version != info.version or build.commit != info.llama_cpp.commit:
            raise PublishError(
                f"{build.path.name} is version {build.version} of llama.cpp {build.commit[:7]}, "
                f"but version.json says {info.version} of {info.llama_cpp.short}",
                "rebuild, or publish from the commit that built it",
            )
    smoke_by_key = {(s.backend, s.platform): s for s in smokes}
    problems = []
    for build in builds:
        smoke = smoke_by_key.get((build.backend, build.platform))
        where = f"{build.backend} {build.platform} ({build.digest[:19]}…)"
        if smoke is None:
            problems.append(f"{where} has no smoke report")
        elif smoke.digest != build.digest:
            problems.append(f"{where}: its smoke report tested another digest {smoke.digest[:19]}…")
        elif not smoke.passed:
            checks = ", ".join(smoke.failed_checks) or "see the report"
            problems.append(f"{where} failed its smoke test ({checks})")
    if problems:
        raise PublishError(
            "refusing to publish: " + "; ".join(problems),
            "run `nox -s smoke` on these digests; only smoke-tested images are published",
        )


# ---------------------------------------------------------------------------- buildx
@contextmanager
def docker_config(auths: Mapping[str, Credentials]) -> Iterator[Path]:
    """A docker config directory of our own holding only `auths`, removed afterwards.

    buildx reads registry credentials from $DOCKER_CONFIG/config.json; writing them there (0600
    in a 0700 directory) keeps them off command lines and out of the user's own config. CLI
    plugins, builders and contexts are linked from the user's config so buildx still works.
    """
    original = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    directory = Path(tempfile.mkdtemp(prefix="publish-docker-config-"))
    try:
        config: dict[str, Any] = {"auths": {}}
        for registry, creds in auths.items():
            key = DOCKER_HUB_CONFIG_KEY if registry == DOCKER_HUB else registry
            config["auths"][key] = {"auth": creds.token}
        try:
            user_config = json.loads((original / "config.json").read_text(encoding="utf-8"))
            if isinstance(user_config, dict) and "currentContext" in user_config:
                config["currentContext"] = user_config["currentContext"]
        except (OSError, json.JSONDecodeError):
            pass
        fd = os.open(directory / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        for name in ("cli-plugins", "buildx", "contexts"):
            if (original / name).exists():
                (directory / name).symlink_to(original / name)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_AUTH_FAILURES = ("401 unauthorized", "403 forbidden", "unauthorized", "denied", "authentication")
_NOT_FOUND = ("not found", "manifest unknown", "name unknown")
_SECRET_VARS = ("DOCKERHUB_TOKEN", "REGISTRY_PASSWORD")


def imagetools(
    args: Sequence[str], config_dir: Path, retry: RetryPolicy, what: str, hint_vars: str
) -> str:
    """Run `docker buildx imagetools ARGS` with our docker config; retry transient failures."""
    docker = shutil.which("docker")
    if docker is None:
        raise ToolMissingError("docker CLI not found", "install Docker (see .ci/provision)")
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_VARS}
    env["DOCKER_CONFIG"] = str(config_dir)
    last = ""
    started = time.monotonic()
    for attempt in range(1, retry.attempts + 1):
        try:
            proc = subprocess.run(
                [docker, "buildx", "imagetools", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except subprocess.TimeoutExpired:
            last = "timed out after 600 s"
        else:
            if proc.returncode == 0:
                return proc.stdout
            text = proc.stderr.strip()
            lines = [line for line in text.splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            lowered = text.lower()
            if "is not a docker command" in lowered or "unknown command" in lowered:
                raise DockerUnavailableError(
                    "docker buildx is not installed", "install the buildx plugin"
                )
            if any(pattern in lowered for pattern in _AUTH_FAILURES):
                raise CredentialsError(
                    f"{what}: the registry refused access: {last}", f"check {hint_vars}"
                )
            if any(pattern in lowered for pattern in _NOT_FOUND):
                raise PublishError(
                    f"{what}: {last}",
                    "were the digests pushed with `nox -s build -- … --push-by-digest`?",
                )
        if attempt < retry.attempts:
            delay = retry.delay(attempt)
            console.err.print(
                f"{what}: {last}; retrying in {delay:.1f} s (attempt {attempt + 1}/"
                f"{retry.attempts})"
            )
            time.sleep(delay)
    raise PublishError(
        f"{what} failed: {last} ({retry.attempts} attempts over "
        f"{time.monotonic() - started:.0f} s)",
        "check that the registry is up, then re-run: publishing is idempotent",
    )


# ---------------------------------------------------------------------------- plan
@dataclass
class BackendPlan:
    backend: str
    target: ImageName
    sources: list[BuildRecord]
    index: Manifest
    decisions: list[TagDecision] = field(default_factory=list)

    @property
    def platforms(self) -> list[str]:
        return [source.platform for source in self.sources]

    def push_order(self) -> list[TagDecision]:
        """Immutable tags first: a failure part-way never leaves a floating tag ahead."""
        pushing = [d for d in self.decisions if d.pushes]
        return sorted(pushing, key=lambda d: d.kind is TagKind.FLOATING)


@dataclass
class PublishPlan:
    version: SemVer
    commit: str
    target: ImageName
    dry_run: bool
    force: bool
    backends: list[BackendPlan]

    @property
    def conflicts(self) -> list[tuple[str, TagDecision]]:
        return [
            (plan.backend, d)
            for plan in self.backends
            for d in plan.decisions
            if d.action is Action.CONFLICT
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "commit": self.commit,
            "repository": str(self.target),
            "dry_run": self.dry_run,
            "force": self.force,
            "backends": [
                {
                    "backend": plan.backend,
                    "index": plan.index.digest,
                    "platforms": plan.platforms,
                    "sources": [
                        {"platform": s.platform, "ref": s.source, "report": s.path.name}
                        for s in plan.sources
                    ],
                    "tags": [
                        {
                            "tag": d.tag,
                            "kind": str(d.kind),
                            "action": str(d.action),
                            "reason": d.reason,
                            "current": d.current.digest if d.current else None,
                            "current_version": d.current.version if d.current else None,
                            "target": plan.index.digest,
                        }
                        for d in plan.decisions
                    ],
                }
                for plan in self.backends
            ],
        }


@dataclass(frozen=True)
class PublishOptions:
    dry_run: bool = False
    force: bool = False
    backends: tuple[str, ...] = ()
    registry: str | None = None
    image: str | None = None
    reports: Path | None = None
    release_tag: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class PublishOutcome:
    plan: PublishPlan
    pushed: list[str]
    seconds: float
    phases: dict[str, float]


def check_release_tag(version: str, release_tag: str | None, env: Mapping[str, str]) -> None:
    """A `vX.Y.Z` git tag being released must agree with version.json's version."""
    candidates = [release_tag] if release_tag else []
    if env.get("GITHUB_REF_TYPE") == "tag" and env.get("GITHUB_REF_NAME"):
        candidates.append(env["GITHUB_REF_NAME"])
    for tag in candidates:
        if tag != f"v{version}":
            raise ConfigError(
                f"release tag {tag!r} does not match version.json's version {version}",
                f"tag the release commit v{version}, or correct version.json",
            )


def resolve_target(info: VersionInfo, options: PublishOptions) -> ImageName:
    target = ImageName.parse(options.image or info.image)
    if options.registry:
        target = ImageName(options.registry.rstrip("/"), target.repository)
    return target


def _auths(
    target: ImageName, builds: Sequence[BuildRecord], env: Mapping[str, str]
) -> dict[str, Credentials]:
    auths: dict[str, Credentials] = {}
    for registry in {target.registry, *(ImageName.parse(b.image).registry for b in builds)}:
        creds = credentials_from_env(registry, env)
        if creds is not None:
            auths[registry] = creds
    return auths


def _existing(client: RegistryClient, repository: str, tag: str, index: str) -> ExistingTag | None:
    digest = client.manifest_digest(repository, tag)
    if digest is None:
        return None
    if digest == index:
        return ExistingTag(digest, None)
    found = client.version_label(repository, tag)
    if found is None:  # deleted between HEAD and GET
        return None
    return ExistingTag(found[0], found[1])


def _compose_index(
    plan_target: ImageName,
    first_tag: str,
    sources: Sequence[BuildRecord],
    config_dir: Path,
    options: PublishOptions,
    hint_vars: str,
    backend: str,
) -> Manifest:
    """The exact index imagetools will push, from its --dry-run (its output + a newline)."""
    out = imagetools(
        ["create", "--dry-run", "-t", plan_target.tagged(first_tag), *[s.source for s in sources]],
        config_dir,
        options.retry,
        f"joining the {backend} digests",
        hint_vars,
    )
    body = out[:-1] if out.endswith("\n") else out
    index = Manifest.from_bytes(body.encode("utf-8"))
    platforms = sorted(str(d.platform) for d in index.platform_descriptors)
    expected = sorted(s.platform for s in sources)
    if platforms != expected:
        raise PublishError(
            f"{backend}: the digests hold platforms {', '.join(platforms)}, but the build "
            f"reports say {', '.join(expected)}",
            "rebuild: a report names the wrong platform for its digest",
        )
    return index


def check_sources(
    sources: Sequence[BuildRecord],
    info: VersionInfo,
    auths: Mapping[str, Credentials],
    retry: RetryPolicy,
) -> None:
    """Before anything is pushed: each digest exists, is the platform its report names, and
    carries this release's revision and version labels."""
    problems: list[str] = []
    by_registry: dict[str, list[BuildRecord]] = {}
    for source in sources:
        by_registry.setdefault(ImageName.parse(source.image).registry, []).append(source)
    for registry, records in by_registry.items():
        with RegistryClient(registry, auths.get(registry), retry=retry) as client:
            for source in records:
                name = ImageName.parse(source.image)
                reference = source.index_digest or source.digest
                summary = client.summary(name.repository, reference)
                where = f"{source.backend} {source.platform} ({source.source})"
                if summary is None:
                    problems.append(f"{where} is not in the registry")
                    continue
                if summary.platforms != [source.platform]:
                    problems.append(f"{where} holds {', '.join(summary.platforms) or 'nothing'}")
                for image in summary.images:
                    labels = image.labels
                    if labels.get(LABEL_REVISION) != info.llama_cpp.commit:
                        problems.append(
                            f"{where} has revision label {labels.get(LABEL_REVISION)}, "
                            f"expected {info.llama_cpp.commit}"
                        )
                    if labels.get(LABEL_VERSION) != info.version:
                        problems.append(
                            f"{where} has version label {labels.get(LABEL_VERSION)}, "
                            f"expected {info.version}"
                        )
    if problems:
        raise PublishError(
            "refusing to publish: " + "; ".join(problems),
            "the build reports do not describe these images: rebuild and smoke-test them",
        )


def make_plan(
    client: RegistryClient,
    config_dir: Path,
    info: VersionInfo,
    rules: TagRules,
    target: ImageName,
    groups: Mapping[str, list[BuildRecord]],
    suffixes: Mapping[str, str],
    options: PublishOptions,
    hint_vars: str,
) -> PublishPlan:
    version = SemVer.parse(info.version)
    plans = []
    for backend, sources in groups.items():
        tags = rules.tags_for(
            version, backend, suffixes[backend], info.llama_cpp.commit, info.llama_cpp.ref
        )
        index = _compose_index(
            target, tags[0].name, sources, config_dir, options, hint_vars, backend
        )
        plan = BackendPlan(backend, target, list(sources), index)
        for tag in tags:
            existing = _existing(client, target.repository, tag.name, index.digest)
            plan.decisions.append(decide(tag, version, index.digest, existing, options.force))
        plans.append(plan)
    return PublishPlan(
        version, info.llama_cpp.commit, target, options.dry_run, options.force, plans
    )


def print_plan(plan: PublishPlan) -> None:
    mode = " (dry run: nothing is pushed)" if plan.dry_run else ""
    # Digests and references are printed whole (soft wrap), so logs can be copied from.
    console.out.print(
        f"publish {plan.version} (llama.cpp {plan.commit[:7]}) to {plan.target}{mode}",
        soft_wrap=True,
    )
    for backend in plan.backends:
        console.out.print(
            f"\n[bold]{backend.backend}[/bold]: index {backend.index.digest}", soft_wrap=True
        )
        for source in backend.sources:
            console.out.print(f"  {source.platform}: {source.source}", soft_wrap=True)
        table = Table(show_edge=False, pad_edge=False)
        for column in ("tag", "kind", "action", "now", "why"):
            table.add_column(column, overflow="fold")
        for d in backend.decisions:
            now = f"{d.current.digest[:19]}…" if d.current else "-"
            style = {Action.CONFLICT: "red", Action.OVERWRITE: "yellow", Action.LEAVE: "cyan"}
            action = f"[{style[d.action]}]{d.action}[/]" if d.action in style else str(d.action)
            table.add_row(f"{backend.target}:{d.tag}", str(d.kind), action, now, d.reason)
        console.out.print(table)
    counts: dict[str, int] = {}
    for backend in plan.backends:
        for d in backend.decisions:
            counts[d.action] = counts.get(d.action, 0) + 1
    summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    console.out.print(f"\nplan: {summary}")


# ---------------------------------------------------------------------------- push, verify
def apply_backend(
    plan: BackendPlan,
    client: RegistryClient,
    config_dir: Path,
    options: PublishOptions,
    hint_vars: str,
) -> list[str]:
    """Push the index under every tag that needs it; returns the tags written."""
    order = plan.push_order()
    if not order:
        return []
    for d in order:
        if d.action is Action.OVERWRITE and d.current:
            console.err.print(
                f"warning: --force: overwriting immutable tag {plan.target}:{d.tag} "
                f"(was {d.current.digest}, version {d.current.version or 'unknown'})"
            )
    done: list[str] = []
    repository = plan.target.repository
    try:
        first = order[0]
        imagetools(
            ["create", "-t", plan.target.tagged(first.tag), *[s.source for s in plan.sources]],
            config_dir,
            options.retry,
            f"pushing {plan.target}:{first.tag}",
            hint_vars,
        )
        got = client.manifest_digest(repository, first.tag)
        if got != plan.index.digest:
            raise PublishError(
                f"{plan.target}:{first.tag} is {got} after the push, expected {plan.index.digest}",
                "another publish may be running against the same repository",
            )
        done.append(first.tag)
        for d in order[1:]:
            client.put_manifest(repository, d.tag, plan.index)
            done.append(d.tag)
    except PipelineError as exc:
        left = [d.tag for d in order if d.tag not in done]
        state = f"tagged {', '.join(done) or 'nothing'}; not tagged {', '.join(left)}"
        raise type(exc)(
            f"{plan.backend}: {exc.message} ({state})",
            exc.hint or "re-run publish: tags already pushed show as unchanged",
        ) from exc
    return done


def verify(plan: PublishPlan, client: RegistryClient) -> int:
    """Every tag resolves to the expected index, with exactly the expected platforms, each
    carrying the expected revision and version labels. Returns the number of tags checked."""
    problems: list[str] = []
    checked = 0
    for backend in plan.backends:
        repository = backend.target.repository
        for d in backend.decisions:
            if d.action not in (*PUSHING, Action.UNCHANGED):
                continue
            checked += 1
            digest = client.manifest_digest(repository, d.tag)
            if digest != backend.index.digest:
                problems.append(f"{d.tag} is {digest}, expected {backend.index.digest}")
        summary = client.summary(repository, backend.index.digest)
        if summary is None:
            problems.append(f"index {backend.index.digest} of {backend.backend} is missing")
            continue
        platforms = sorted(summary.platforms)
        if platforms != sorted(backend.platforms):
            problems.append(
                f"{backend.backend} index lists {platforms}, expected {sorted(backend.platforms)}"
            )
        for image in summary.images:
            revision = image.labels.get(LABEL_REVISION)
            if revision != plan.commit:
                problems.append(
                    f"{backend.backend} {image.platform} has revision {revision}, "
                    f"expected {plan.commit}"
                )
            version = image.labels.get(LABEL_VERSION)
            if version != str(plan.version):
                problems.append(
                    f"{backend.backend} {image.platform} has version {version}, "
                    f"expected {plan.version}"
                )
    if problems:
        raise PublishError(
            "verification after push failed: " + "; ".join(problems),
            "inspect the repository; re-run publish once the cause is fixed",
        )
    return checked


def group_by_backend(
    builds: Sequence[BuildRecord],
) -> tuple[dict[str, list[BuildRecord]], dict[str, str]]:
    """Reports per backend (default backend first, platforms sorted) and each backend's tag
    suffix, both checked against matrix.yaml: every platform of a backend must be there."""
    from pipeline.matrix import load_matrix  # the matrix is the build side's data

    matrix = load_matrix()
    groups: dict[str, list[BuildRecord]] = {}
    suffixes: dict[str, str] = {}
    ordered = sorted(
        builds, key=lambda b: (b.backend != matrix.default_backend, b.backend, b.platform)
    )
    for build in ordered:
        groups.setdefault(build.backend, []).append(build)
    for name, records in groups.items():
        backend = matrix.backend(name)
        suffixes[name] = backend.tag_suffix
        have = sorted(r.platform for r in records)
        want = sorted(backend.platform_names)
        if have != want:
            missing = sorted(set(want) - set(have))
            raise PublishError(
                f"{name}: build reports cover {', '.join(have)}, but the backend is built for "
                f"{', '.join(want)}" + (f" (missing {', '.join(missing)})" if missing else ""),
                "build and smoke-test every platform of the backend before publishing it",
            )
    return groups, suffixes


def publish(
    project: Project, options: PublishOptions, env: Mapping[str, str] | None = None
) -> PublishOutcome:
    environ = os.environ if env is None else env
    started = time.monotonic()
    phases: dict[str, float] = {}
    info = load_version(project.version_file)
    check_release_tag(info.version, options.release_tag, environ)
    rules = load_tag_rules()
    target = resolve_target(info, options)
    reports = options.reports or project.reports_dir
    builds = load_build_records(reports)
    if not builds:
        raise PublishError(
            f"no build reports (build-*.json) in {reports}",
            "run `nox -s build -- <arch> --backend <b> --push-by-digest` and `nox -s smoke`",
        )
    if options.backends:
        unknown = sorted(set(options.backends) - {b.backend for b in builds})
        if unknown:
            raise UsageError(
                f"no build reports for backend(s) {', '.join(unknown)} in {reports}",
                f"reports exist for {', '.join(sorted({b.backend for b in builds}))}",
            )
        builds = [b for b in builds if b.backend in options.backends]
    check_reports(builds, load_smoke_records(reports), info)
    groups, suffixes = group_by_backend(builds)
    auths = _auths(target, builds, environ)
    creds = auths.get(target.registry)
    hint_vars = "/".join(creds.variables) if creds else "the registry credentials"
    pushed: list[str] = []
    with (
        docker_config(auths) as config_dir,
        RegistryClient(target.registry, creds, retry=options.retry) as client,
    ):
        client.ping(target.repository)
        check_sources(builds, info, auths, options.retry)
        plan = make_plan(
            client, config_dir, info, rules, target, groups, suffixes, options, hint_vars
        )
        phases["plan"] = time.monotonic() - started
        print_plan(plan)
        if plan.conflicts and not options.force:
            names = ", ".join(f"{target}:{d.tag}" for _, d in plan.conflicts)
            _write_report(project, plan, [], time.monotonic() - started, phases, False)
            raise PublishError(
                f"immutable tag(s) {names} already exist with another digest; nothing was pushed",
                "bump version.json's version, or re-run with --force to overwrite (logged)",
            )
        if options.dry_run:
            _write_report(project, plan, [], time.monotonic() - started, phases, False)
            return PublishOutcome(plan, [], time.monotonic() - started, phases)
        mark = time.monotonic()
        for backend in plan.backends:
            pushed.extend(
                f"{target}:{tag}"
                for tag in apply_backend(backend, client, config_dir, options, hint_vars)
            )
        phases["push"] = time.monotonic() - mark
        mark = time.monotonic()
        checked = verify(plan, client)
        phases["verify"] = time.monotonic() - mark
    seconds = time.monotonic() - started
    _write_report(project, plan, pushed, seconds, phases, True)
    console.out.print(
        f"pushed {len(pushed)} tag(s), verified {checked} tag(s) of "
        f"{len(plan.backends)} backend(s) in {seconds:.1f} s"
    )
    return PublishOutcome(plan, pushed, seconds, phases)


def _write_report(
    project: Project,
    plan: PublishPlan,
    pushed: list[str],
    seconds: float,
    phases: Mapping[str, float],
    verified: bool,
) -> None:
    directory = project.reports_dir
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": 1,
        **plan.to_json(),
        "pushed": pushed,
        "verified": verified,
        "seconds": round(seconds, 3),
        "phases": {k: round(v, 3) for k, v in phases.items()},
    }
    write_json_atomic(directory / REPORT_NAME, data)


# ---------------------------------------------------------------------------- CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the full plan (every tag, its action and why) and stop",
    )
    parser.add_argument(
        "--backend",
        default="",
        help="comma-separated backends to publish (default: every reported one)",
    )
    parser.add_argument(
        "--registry",
        help="registry host replacing version.json's (ghcr.io, "
        "127.0.0.1:5000); default: the image's, Docker Hub",
    )
    parser.add_argument("--image", help="full repository name replacing version.json's image")
    parser.add_argument(
        "--reports",
        type=Path,
        help="directory of build-*.json and smoke-*.json (default build/reports)",
    )
    parser.add_argument(
        "--release-tag", help="the vX.Y.Z git tag being released; must match version.json"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite immutable tags that point to another digest (logged)",
    )


def _handle(args: argparse.Namespace) -> int:
    backends = tuple(b.strip() for b in args.backend.split(",") if b.strip())
    options = PublishOptions(
        dry_run=args.dry_run,
        force=args.force,
        backends=backends,
        registry=args.registry,
        image=args.image,
        reports=args.reports,
        release_tag=args.release_tag,
    )
    publish(Project.discover(), options)
    return 0


COMMANDS: list[Command] = [
    (
        "publish",
        "Tag and push smoke-tested digests as one index per backend.",
        _add_arguments,
        _handle,
    ),
]
