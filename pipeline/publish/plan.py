"""The publish plan: which digests are joined into which index, and what happens to each tag
and why, decided from the records and from what the registry holds now. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from pipeline.core import console
from pipeline.core.config import VersionInfo
from pipeline.core.errors import ConfigError, PublishError
from pipeline.core.options import PublishOptions
from pipeline.matrix import load_matrix
from pipeline.oci.image import ImageName, Manifest
from pipeline.oci.registry import Credentials, RegistryClient, credentials_from_env
from pipeline.publish.sources import Registries, compose_index
from pipeline.publish.tags import (
    Action,
    ExistingTag,
    SemVer,
    TagDecision,
    TagKind,
    TagRules,
    decide,
)
from pipeline.records import NO_GPU_TIER, BuildRecord, SmokeRecord


def required_tiers(
    builds: Sequence[BuildRecord], no_gpu_runner: bool
) -> dict[str, tuple[str, ...] | None]:
    """backend -> the smoke tiers each of its digests needs (matrix.yaml's publish_requires, or
    publish_without_gpu when the release had no GPU runner); None: not publishable so."""
    matrix = load_matrix()
    return {
        b.backend: matrix.backend(b.backend).smoke.required(gpu_runner=not no_gpu_runner)
        for b in builds
    }


def check_reports(
    builds: Sequence[BuildRecord],
    smokes: Sequence[SmokeRecord],
    info: VersionInfo,
    required: Mapping[str, tuple[str, ...] | None],
) -> list[PublishError]:
    """What must not be published, in the order it is found: duplicate, unpushed or stale
    records, then every digest without a passed smoke report of that same digest for each
    tier its backend requires. A publish raises the first; a dry run shows them all."""
    refusals: list[PublishError] = []
    seen: dict[tuple[str, str], BuildRecord] = {}
    for build in builds:
        key = (build.backend, build.platform)
        if key in seen:
            refusals.append(
                PublishError(
                    f"two build reports for {build.backend} {build.platform}: "
                    f"{seen[key].source} and {build.source}"
                )
            )
        seen[key] = build
        if not build.pushed:
            refusals.append(
                PublishError(
                    f"{build.filename}: {build.backend} {build.platform} was built with output "
                    f"{build.output!r}, so no registry holds it",
                    f"build it with `nox -s build -- {build.platform} --backend {build.backend} "
                    "--push-by-digest`",
                )
            )
        if build.version != info.version or build.commit != info.llama_cpp.commit:
            refusals.append(
                PublishError(
                    f"{build.filename} is version {build.version} of llama.cpp {build.commit[:7]}, "
                    f"but version.json says {info.version} of {info.llama_cpp.short}",
                    "rebuild, or publish from the commit that built it",
                )
            )
    local_sets = {n for n, v in load_matrix().cpu_variant_sets.items() if v.host_only}
    for build in builds:
        if build.cpu_variants in local_sets:
            refusals.append(
                PublishError(
                    f"{build.filename}: {build.backend} {build.platform} was built with "
                    f"--cpu-variants {build.cpu_variants}, for the building machine's CPU only",
                    "a release builds every variant: --cpu-variants all",
                )
            )
    smoke_by_key = {(s.backend, s.platform, s.tier): s for s in smokes}
    problems = []
    for build in builds:
        where = f"{build.backend} {build.platform} ({build.digest[:19]}…)"
        tiers = required.get(build.backend, (NO_GPU_TIER,))
        if tiers is None:
            problems.append(
                f"{where} needs a smoke test on a GPU, and matrix.yaml publishes it with "
                "nothing less (publish_without_gpu: null)"
            )
            continue
        for tier in tiers:
            smoke = smoke_by_key.get((build.backend, build.platform, tier))
            named = where if tier == NO_GPU_TIER else f"{where}, tier {tier},"
            if smoke is None:
                problems.append(f"{named} has no smoke report")
            elif smoke.digest != build.digest:
                tested = (smoke.digest or "no digest")[:19]
                problems.append(f"{named}: its smoke report tested another digest {tested}…")
            elif not smoke.passed:
                checks = ", ".join(smoke.failed) or "see the report"
                problems.append(f"{named} failed its smoke test ({checks})")
    if problems:
        refusals.append(
            PublishError(
                "refusing to publish: " + "; ".join(problems),
                "run `nox -s smoke` on these digests; only smoke-tested images are published",
            )
        )
    return refusals


@dataclass
class BackendPlan:
    backend: str
    target: ImageName
    sources: list[BuildRecord]
    index: Manifest | None  # None: not known before every source is pushed (dry runs only)
    decisions: list[TagDecision] = field(default_factory=list)

    @property
    def index_digest(self) -> str | None:
        return self.index.digest if self.index else None

    @property
    def pushable(self) -> Manifest:
        """The index to push: a plan that is carried out has one (its sources are pushed)."""
        if self.index is None:
            raise PublishError(f"{self.backend}: the index is unknown: a source is not pushed")
        return self.index

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
    # What a real publish would refuse or could not know (dry runs only; a publish raises).
    notes: list[str] = field(default_factory=list)

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
            "notes": self.notes,
            "backends": [
                {
                    "backend": plan.backend,
                    "index": plan.index_digest,
                    "platforms": plan.platforms,
                    "sources": [
                        {
                            "platform": s.platform,
                            "ref": s.source,
                            "report": s.filename,
                            "pushed": s.pushed,
                        }
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
                            "target": plan.index_digest,
                        }
                        for d in plan.decisions
                    ],
                }
                for plan in self.backends
            ],
        }


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


def auths_for(
    target: ImageName, builds: Sequence[BuildRecord], env: Mapping[str, str]
) -> dict[str, Credentials]:
    auths: dict[str, Credentials] = {}
    for registry in {target.registry, *(ImageName.parse(b.image).registry for b in builds)}:
        creds = credentials_from_env(registry, env)
        if creds is not None:
            auths[registry] = creds
    return auths


def _existing(
    client: RegistryClient,
    repository: str,
    tag: str,
    index: str | None,
    versions: dict[str, str | None],
) -> ExistingTag | None:
    """What `tag` points to now, with the version label of that image; `versions` caches the
    label per digest (the floating tags of the last release usually share one index)."""
    digest = client.manifest_digest(repository, tag)
    if digest is None:
        return None
    if digest == index:
        return ExistingTag(digest, None)
    if digest not in versions:
        found = client.version_label(repository, digest)
        if found is None:  # deleted between HEAD and GET
            return None
        versions[digest] = found[1]
    return ExistingTag(digest, versions[digest])


def make_plan(
    registries: Registries,
    info: VersionInfo,
    rules: TagRules,
    target: ImageName,
    groups: Mapping[str, list[BuildRecord]],
    suffixes: Mapping[str, str],
    options: PublishOptions,
    readable: bool = True,
) -> PublishPlan:
    """Every backend's index (when its sources are all pushed) and a decision per tag; with
    the registry not `readable` (a dry run without credentials), tags' states are unknown."""
    version = SemVer.parse(info.version)
    client = registries.client(target.registry)
    plans = []
    versions: dict[str, str | None] = {}
    for backend, sources in groups.items():
        tags = rules.tags_for(
            version, backend, suffixes[backend], info.llama_cpp.commit, info.llama_cpp.ref
        )
        pushed = readable and all(s.pushed for s in sources)
        index = compose_index(registries, backend, sources) if pushed else None
        plan = BackendPlan(backend, target, list(sources), index)
        digest = plan.index_digest
        for tag in tags:
            existing = None
            if readable:
                existing = _existing(client, target.repository, tag.name, digest, versions)
            plan.decisions.append(
                decide(tag, version, digest, existing, options.force, readable=readable)
            )
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
        index = backend.index_digest or "unknown until every source is pushed"
        console.out.print(f"\n[bold]{backend.backend}[/bold]: index {index}", soft_wrap=True)
        for source in backend.sources:
            state = "" if source.pushed else f" (unpushed: output {source.output}, {source.ref})"
            console.out.print(f"  {source.platform}: {source.source}{state}", soft_wrap=True)
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
    for note in plan.notes:
        console.out.print(f"[yellow]would refuse:[/yellow] {note}", soft_wrap=True)


def group_by_backend(
    builds: Sequence[BuildRecord],
) -> tuple[dict[str, list[BuildRecord]], dict[str, str], list[PublishError]]:
    """Reports per backend (default backend first, platforms sorted), each backend's tag
    suffix, and a refusal per backend that lacks a platform matrix.yaml builds it for."""
    matrix = load_matrix()
    groups: dict[str, list[BuildRecord]] = {}
    suffixes: dict[str, str] = {}
    refusals: list[PublishError] = []
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
            refusals.append(
                PublishError(
                    f"{name}: build reports cover {', '.join(have)}, but the backend is built for "
                    f"{', '.join(want)}" + (f" (missing {', '.join(missing)})" if missing else ""),
                    "build and smoke-test every platform of the backend before publishing it",
                )
            )
    return groups, suffixes, refusals
