"""`nox -s track [-- REF]`: the release train's first half. Take the newest upstream `b<N>`
release (or REF); when it is newer than what the edge channel holds (or a Debian package the
stable images carry has a newer version: a packaging-only release of the same pin), run the
whole chain for it, without a person and without touching the checkout: in a work root of its
own (build/track/<ref>/), `render`, `sync`, `build --push-by-digest` of every backend and
platform, `smoke` of every pushed digest in every tier publish requires (the real tier
included), and `publish --channel edge`, signed and attested like a release. It writes one
candidate record (pipeline/records/candidate.py), which `nox -s promote` reads.

A stage that fails stops the train: nothing moves, the record and the output name the stage
and the last lines of its log, and track exits with that stage's own exit code.

`--from-edge` builds nothing: the candidate is what the edge channel already holds for
version.json's pin and version (release.yml on a `v*` tag promotes what edge proved, its tiers
read from the images' signed smoke attestations), or there is none and the release builds.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core import console
from pipeline.core.arguments import Command
from pipeline.core.version import SemVer, build_number, load_version, save_version
from pipeline.oci.image import LABEL_PREFIX, LABEL_REVISION, LABEL_VERSION
from pipeline.oci.registry import RegistryClient
from pipeline.records import load_build_records, load_smoke_records
from pipeline.records.candidate import (
    CANDIDATE_RECORD,
    CandidateImage,
    CandidateRecord,
    TierResult,
    write_candidate,
)
from pipeline.records.publish import load_publish_record
from pipeline.track.chain import Chain, StageFailed, stage_environment
from pipeline.track.edge import from_edge
from pipeline.track.options import TrackOptions, add_track_arguments, resolve_track
from pipeline.track.packages import newer_packages
from pipeline.track.rebuild import reproducible

__all__ = ["COMMANDS", "track"]

EDGE_TAG = "edge"
STABLE_TAG = "latest"


@dataclass(frozen=True)
class Plan:
    """What the train builds: one pin, the version its images carry, and why."""

    commit: str
    ref: str | None
    version: str
    reason: str

    @property
    def name(self) -> str:
        """build/track/<name>: the ref, and the version for a packaging release of a pin."""
        return f"{self.ref or self.commit[:7]}-{self.version}"


def _labels(options: TrackOptions, tag: str) -> dict[str, str] | None:
    """The labels of the image `tag` names in the repository (None: no such tag)."""
    repository = options.repository
    with RegistryClient.for_access(repository.registry, options.access) as client:
        found = client.labels(repository.repository, tag)
    return None if found is None else found[1]


def _pin_of(options: TrackOptions, scratch: Path) -> tuple[str, str | None]:
    """(commit, ref) of REF (default: the newest b<N> tag) on the remote, resolved by the
    `bump` command in a scratch copy of version.json."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copy2(options.project.version_file, scratch / "version.json")
    chain = Chain(scratch, stage_environment({}))
    ref = [options.ref] if options.ref else []
    chain.run("resolve", "bump", *ref, "--remote", options.remote)
    pin = load_version(scratch / "version.json").llama_cpp
    return pin.commit, pin.ref


def plan(options: TrackOptions) -> Plan | None:
    """The candidate to build, or None when edge holds the newest upstream build and no package
    of the stable images has a newer version."""
    edge = _labels(options, EDGE_TAG)
    stable = _labels(options, STABLE_TAG)
    versions = [SemVer.parse(options.version.version)]
    if stable and SemVer.parse_or_none(stable.get(LABEL_VERSION)):
        versions.append(SemVer.parse(stable[LABEL_VERSION]))
    version = str(max(versions).bumped(options.bump))
    commit, ref = _pin_of(options, options.work_dir / ".resolve")
    upstream = build_number(ref)
    held = _build_label(edge)
    if options.force or edge is None or (upstream or 0) > (held or 0):
        why = f"upstream {ref or commit[:7]}" + (f" (edge holds b{held})" if held else "")
        return Plan(commit, ref, version, why)
    console.err.print(f"track: edge already holds b{held}, upstream's newest is {ref}")
    if options.packages and stable is not None:
        updates = newer_packages(options)
        if updates:
            commit = stable.get(LABEL_REVISION, "")
            stable_build = _build_label(stable)
            pin_ref = f"b{stable_build}" if stable_build else None
            return Plan(commit, pin_ref, version, "packaging: " + ", ".join(updates))
    return None


def _build_label(labels: dict[str, str] | None) -> int | None:
    value = (labels or {}).get(f"{LABEL_PREFIX}.llama-build", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _prepare(options: TrackOptions, plan: Plan) -> Path:
    """A work root of its own: version.json at the candidate's pin and version, dockerfiles/."""
    root = options.work_dir / plan.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    info = load_version(options.project.version_file)
    pin = replace(info.llama_cpp, commit=plan.commit, ref=plan.ref)
    save_version(root / "version.json", replace(info, version=plan.version, llama_cpp=pin))
    shutil.copytree(options.project.dockerfiles_dir, root / "dockerfiles")
    return root


def _build_arguments(options: TrackOptions) -> list[str]:
    """What every build of the train is given besides its platform, backend and output."""
    args: list[str] = []
    if options.cpu_variants:
        args += ["--cpu-variants", options.cpu_variants]
    if options.gpu_architectures:
        args += ["--gpu-architectures", ",".join(options.gpu_architectures)]
    if options.apt_sources:
        args += ["--build-arg", "EXTRA_APT_SOURCES=" + "\n".join(options.apt_sources)]
    return args


def _run(options: TrackOptions, chain: Chain) -> None:
    """render, sync, then each backend and platform built and smoke-tested, then edge."""
    chain.run("render", "render")
    chain.run("sync", "sync", "--remote", options.remote)
    for backend in options.backends:
        variants = options.cpu_variants or backend.cpu_variants
        tiers = backend.smoke.required(options.gpu_runner(backend), variants) or ()
        for platform in options.platforms_of(backend):
            where = f"{backend.name} {platform.name}"
            chain.run(
                f"build {where}",
                "build",
                platform.name,
                "--backend",
                backend.name,
                "--push-by-digest",
                "--tag",
                str(options.repository),
                *_build_arguments(options),
            )
            for tier in tiers:
                chain.run(
                    f"smoke {where} {tier}",
                    "smoke",
                    "--platform",
                    platform.name,
                    "--backend",
                    backend.name,
                    "--tier",
                    tier,
                )
    publish = ["publish", "--channel", "edge", "--image", str(options.repository)]
    publish += [*(["--no-sign"] if options.no_sign else [])]
    without = [b.name for b in options.backends if not options.gpu_runner(b)]
    publish += ["--no-gpu-runner", ",".join(without)] if without else []
    for platform in options.platforms or ():  # a CI-size train: only what it built
        publish += ["--platform", platform.name]
    chain.run("publish edge", *publish)


def _images(options: TrackOptions, root: Path) -> list[CandidateImage]:
    reports = root / "build" / "reports"
    smokes = load_smoke_records(reports)
    repository = options.repository
    images = []
    with RegistryClient.for_access(repository.registry, options.access) as client:
        for build in load_build_records(reports):
            tiers = tuple(
                TierResult(s.tier, s.passed, s.seconds, tuple(s.failed))
                for s in smokes
                if (s.backend, s.platform, s.digest)
                == (build.backend, build.platform, build.digest)
            )
            manifest = client.manifest(repository.repository, build.digest)
            compressed = None
            if manifest is not None and not manifest.is_index:
                compressed = manifest.compressed_bytes
            images.append(
                CandidateImage(
                    build.backend,
                    build.platform,
                    build.digest,
                    tiers,
                    compressed,
                    build.size_bytes,
                    build.cpu_variants,
                )
            )
    return images


def track(options: TrackOptions) -> CandidateRecord | None:
    """Build, prove and publish to edge the candidate `plan` finds; its record (None: there
    was nothing to do). StageFailed (the stage's exit code) after writing a failed record."""
    started = time.monotonic()
    chosen = plan(options)
    if chosen is None:
        console.out.print("track: nothing to do: edge is current and no package is newer")
        return None
    console.err.print(f"track: {chosen.name}: {chosen.reason}", markup=False, soft_wrap=True)
    root = _prepare(options, chosen)
    chain = Chain(root, stage_environment({}))
    failure: StageFailed | None = None
    try:
        _run(options, chain)
    except StageFailed as exc:
        failure = exc
    reports = root / "build" / "reports"
    indexes = None
    verdict = None
    if failure is None:
        published = load_publish_record(reports)
        indexes = {b.backend: b.index for b in published.backends if b.index}
        if options.reproducible:
            verdict = reproducible(chain, _build_arguments(options))
            console.err.print(f"track: reproducible: {verdict}", markup=False, soft_wrap=True)
    record = CandidateRecord(
        ref=chosen.ref,
        commit=chosen.commit,
        version=chosen.version,
        repository=str(options.repository),
        reason=chosen.reason,
        status="failed" if failure else "published",
        seconds=round(time.monotonic() - started, 1),
        stages=tuple(chain.runs),
        images=tuple(_images(options, root)) if reports.is_dir() else (),
        indexes=indexes,
        failed_stage=failure.run.stage if failure else None,
        reproducible=verdict,
    )
    write_candidate(root / CANDIDATE_RECORD, record)
    write_candidate(options.work_dir / CANDIDATE_RECORD, record)
    if failure is not None:
        raise failure
    shown = ", ".join(f"{backend} {digest[:19]}…" for backend, digest in (indexes or {}).items())
    candidate = options.project.shown(root / CANDIDATE_RECORD)
    console.out.print(
        f"track: {chosen.name} on edge ({shown}) in {record.seconds:.0f} s; candidate: {candidate}",
        soft_wrap=True,
    )
    return record


def _run_track(args: argparse.Namespace) -> int:
    options = resolve_track(args)
    if options.from_edge:
        from_edge(options)
    else:
        track(options)
    return 0


COMMANDS = (
    Command(
        "track",
        "The release train: the newest upstream release built, proven and published to edge.",
        add_track_arguments,
        _run_track,
    ),
)
