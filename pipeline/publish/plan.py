"""The publish plan: which digests are joined into which index, and what happens to each tag
and why, decided from the records and from what the registry holds now. Nothing is written.

`review` (pure: records and options only) says what may be published and what refuses it;
`make_plan` asks the registries what the tags point to now and decides each one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rich.table import Table

from pipeline.core import console
from pipeline.core.errors import PublishError, UsageError
from pipeline.core.version import SemVer, build_number
from pipeline.matrix import Backend
from pipeline.oci.image import LABEL_PREFIX, LABEL_VERSION, ImageName, Manifest
from pipeline.oci.registry import Credentials, RegistryAccess, RegistryClient
from pipeline.oci.tags import (
    Action,
    ExistingTag,
    TagDecision,
    TagKind,
    decide,
)
from pipeline.publish.options import PublishOptions
from pipeline.publish.sources import Registries, compose_index
from pipeline.records import NO_GPU_TIER, REAL_TIER, BuildRecord, SmokeRecord
from pipeline.records.publish import PublishedBackend, PublishedSource, PublishedTag, PublishRecord


@dataclass(frozen=True)
class BackendSources:
    """One backend's build records, in platform order: what its release index joins."""

    backend: Backend
    sources: tuple[BuildRecord, ...]


@dataclass(frozen=True)
class Review:
    """What the records allow: each backend's sources (the default backend first), what refuses
    the publish (a publish raises the first; a dry run shows them all), and notes."""

    groups: tuple[BackendSources, ...]
    refusals: tuple[PublishError, ...]
    notes: tuple[str, ...]
    # (backend, platform) -> the passed smoke records of its digest, one per required tier:
    # what each platform image is attested with.
    tested: Mapping[tuple[str, str], tuple[SmokeRecord, ...]]

    @property
    def builds(self) -> list[BuildRecord]:
        return [source for group in self.groups for source in group.sources]


def _chosen(options: PublishOptions, builds: Sequence[BuildRecord]) -> list[BuildRecord]:
    if options.platforms is not None:
        names = {p.name for p in options.platforms}
        builds = [b for b in builds if b.platform in names]
    if not options.backends:
        return list(builds)
    wanted = {b.name for b in options.backends}
    unknown = sorted(wanted - {b.backend for b in builds})
    if unknown:
        raise UsageError(
            f"no build reports for backend(s) {', '.join(unknown)}",
            f"reports exist for {', '.join(sorted({b.backend for b in builds}))}",
        )
    return [b for b in builds if b.backend in wanted]


def review(
    options: PublishOptions, builds: Sequence[BuildRecord], smokes: Sequence[SmokeRecord]
) -> Review:
    """Pure: the records checked against each other, version.json and the matrix."""
    chosen = _chosen(options, builds)
    for build in chosen:  # a record naming a backend this matrix lacks: a usage error
        options.matrix.backend(build.backend)
    groups, incomplete = _group_by_backend(options, chosen)
    refusals = check_reports(options, chosen, smokes) + incomplete
    notes: list[str] = []
    for group in groups:
        if not options.gpu_runner(group.backend.name):
            tiers = group.backend.smoke.required(gpu_runner=False)
            if group.backend.smoke.needs_gpu and tiers is not None:
                device = [t for t in tiers if t != REAL_TIER]
                real = ", with the real tier run there" if REAL_TIER in tiers else ""
                notes.append(
                    f"{group.backend.name}: published on its {', '.join(device)} smoke tier only"
                    f"{real}: the release had no GPU runner (matrix.yaml: publish_without_gpu)"
                )
    tested = {}
    for build in chosen:
        smoke = options.matrix.backend(build.backend).smoke
        tiers = smoke.required(options.gpu_runner(build.backend), build.cpu_variants)
        passed = [
            s
            for s in smokes
            if (s.backend, s.platform) == (build.backend, build.platform)
            and s.digest == build.digest
            and s.passed
            and s.tier in (tiers or ())
        ]
        tested[(build.backend, build.platform)] = tuple(sorted(passed, key=lambda s: s.stem))
    return Review(tuple(groups), tuple(refusals), tuple(notes), tested)


def check_reports(
    options: PublishOptions, builds: Sequence[BuildRecord], smokes: Sequence[SmokeRecord]
) -> list[PublishError]:
    """What must not be published, in the order it is found: duplicate, unpushed or stale
    records, then every digest without a passed smoke report of that same digest for each
    tier its backend requires."""
    info = options.version
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
    variant_sets = options.matrix.cpu_variant_sets
    for build in builds:
        variants = variant_sets.get(build.cpu_variants or "")
        if variants is not None and variants.host_only:
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
        backend = options.matrix.backend(build.backend)
        tiers = backend.smoke.required(options.gpu_runner(build.backend), build.cpu_variants)
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


def _group_by_backend(
    options: PublishOptions, builds: Sequence[BuildRecord]
) -> tuple[list[BackendSources], list[PublishError]]:
    """Reports per backend (default backend first, platforms sorted), and a refusal per
    backend that lacks a platform matrix.yaml builds it for."""
    matrix = options.matrix
    ordered = sorted(
        builds, key=lambda b: (b.backend != matrix.default_backend, b.backend, b.platform)
    )
    by_name: dict[str, list[BuildRecord]] = {}
    for build in ordered:
        by_name.setdefault(build.backend, []).append(build)
    groups: list[BackendSources] = []
    refusals: list[PublishError] = []
    for name, records in by_name.items():
        backend = matrix.backend(name)
        groups.append(BackendSources(backend, tuple(records)))
        have = sorted(r.platform for r in records)
        want = sorted(
            p.name for p in backend.platforms if p in (options.platforms or backend.platforms)
        )
        if have != want:
            missing = sorted(set(want) - set(have))
            refusals.append(
                PublishError(
                    f"{name}: build reports cover {', '.join(have)}, but the backend is built for "
                    f"{', '.join(want)}" + (f" (missing {', '.join(missing)})" if missing else ""),
                    "build and smoke-test every platform of the backend before publishing it",
                )
            )
    return groups, refusals


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

    def record(
        self, pushed: Sequence[str], verified: bool, seconds: float, phases: Mapping[str, float]
    ) -> PublishRecord:
        """publish.json: the plan, what was pushed, whether it was verified, how long it took."""
        return PublishRecord(
            version=str(self.version),
            commit=self.commit,
            repository=str(self.target),
            dry_run=self.dry_run,
            force=self.force,
            notes=tuple(self.notes),
            backends=tuple(
                PublishedBackend(
                    backend=plan.backend,
                    index=plan.index_digest,
                    platforms=tuple(plan.platforms),
                    sources=tuple(
                        PublishedSource(s.platform, s.source, s.filename, s.pushed)
                        for s in plan.sources
                    ),
                    tags=tuple(
                        PublishedTag(
                            tag=d.tag,
                            kind=str(d.kind),
                            action=str(d.action),
                            reason=d.reason,
                            current=d.current.digest if d.current else None,
                            current_version=d.current.version if d.current else None,
                            target=plan.index_digest,
                        )
                        for d in plan.decisions
                    ),
                )
                for plan in self.backends
            ),
            pushed=tuple(pushed),
            verified=verified,
            seconds=round(seconds, 3),
            phases={k: round(v, 3) for k, v in phases.items()},
        )


def auths_for(
    target: ImageName, builds: Sequence[BuildRecord], access: RegistryAccess
) -> dict[str, Credentials]:
    """The credentials of each registry publish talks to: only those that belong to it."""
    auths: dict[str, Credentials] = {}
    for registry in {target.registry, *(ImageName.parse(b.image).registry for b in builds)}:
        creds = access.credentials(registry)
        if creds is not None:
            auths[registry] = creds
    return auths


def existing_tag(
    client: RegistryClient,
    repository: str,
    tag: str,
    index: str | None,
    seen: dict[str, ExistingTag],
) -> ExistingTag | None:
    """What `tag` points to now, with the version and upstream build labels of that image;
    `seen` caches them per digest (the floating tags of a release usually share one index)."""
    digest = client.manifest_digest(repository, tag)
    if digest is None:
        return None
    if digest == index:
        return ExistingTag(digest, None)
    if digest not in seen:
        found = client.labels(repository, digest)
        if found is None:  # deleted between HEAD and GET
            return None
        build = found[1].get(f"{LABEL_PREFIX}.llama-build", "")
        seen[digest] = ExistingTag(
            digest, found[1].get(LABEL_VERSION), int(build) if build.isdigit() else None
        )
    return seen[digest]


def make_plan(
    options: PublishOptions,
    groups: Sequence[BackendSources],
    registries: Registries,
    readable: bool = True,
) -> PublishPlan:
    """Every backend's index (when its sources are all pushed) and a decision per tag; with
    the registry not `readable` (a dry run without credentials), tags' states are unknown."""
    info, target = options.version, options.target
    version = SemVer.parse(info.version)
    client = registries.client(target.registry)
    plans = []
    seen: dict[str, ExistingTag] = {}
    llama_build = build_number(info.llama_cpp.ref)
    for group in groups:
        backend, sources = group.backend, list(group.sources)
        tags = options.rules.tags_for(
            version,
            backend.name,
            backend.tag_suffix,
            info.llama_cpp.commit,
            info.llama_cpp.ref,
            options.channel,
        )
        pushed = readable and all(s.pushed for s in sources)
        index = compose_index(registries, backend, sources) if pushed else None
        plan = BackendPlan(backend.name, target, sources, index)
        digest = plan.index_digest
        for tag in tags:
            existing = None
            if readable:
                existing = existing_tag(client, target.repository, tag.name, digest, seen)
            plan.decisions.append(
                decide(
                    tag,
                    version,
                    digest,
                    existing,
                    options.force,
                    readable=readable,
                    llama_build=llama_build,
                )
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
