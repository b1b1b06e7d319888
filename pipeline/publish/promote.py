"""`nox -s promote [-- CANDIDATE]`: the release train's second half. Move the stable tags (X.Y.Z,
X.Y, X, latest and each backend's) to exactly the digests the candidate published on edge,
never a rebuild (what users get on stable is byte for byte what was tested), and only when the
gates pass (pipeline/publish/gates.py). The gates' figures are attested on every promoted image
(`nox -s verify` shows them); version.json takes the candidate's version and pin, for the pull
request that records the release. A refused promotion prints one line per failed gate with both
figures, moves no tag and leaves edge as it was.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.core import console
from pipeline.core.errors import GateError, PublishError
from pipeline.core.version import SemVer, build_number, save_version
from pipeline.matrix import host_platform
from pipeline.oci.buildx import docker_config
from pipeline.oci.cosign import PROMOTION_PREDICATE, Cosign, Signer
from pipeline.oci.image import LABEL_VERSION, ImageName
from pipeline.oci.registry import RegistryClient
from pipeline.oci.tags import STABLE, ExistingTag, decide
from pipeline.publish.gates import Sides, measure, size_gates, tiers_gate
from pipeline.publish.options import PromoteOptions
from pipeline.publish.plan import BackendPlan, PublishPlan, existing_tag, print_plan
from pipeline.publish.push import tag_backend, verify
from pipeline.records import BuildRecord
from pipeline.records.candidate import (
    CandidateImage,
    CandidateRecord,
    load_candidate,
)
from pipeline.records.promotion import Gate, PromotionRecord, write_promotion

NO_SIGNER = PublishError(
    "no signing identity for the gates' attestations: set COSIGN_KEY, or promote from GitHub "
    "Actions with `id-token: write`",
    "or pass --no-sign",
)


def _stable(
    client: RegistryClient, target: ImageName, options: PromoteOptions, backends: set[str]
) -> tuple[list[CandidateImage], str | None]:
    """The images the stable tags point to now (one per backend and platform, with their
    compressed sizes), and stable's version; ([], None) before the first release."""
    images: list[CandidateImage] = []
    version = None
    for name in sorted(backends):
        tag = options.rules.head(STABLE, options.matrix.backend(name).tag_suffix)
        index = client.manifest(target.repository, tag)
        if index is None:
            continue
        for image in client.platform_images(target.repository, index):
            manifest = client.manifest(target.repository, image.digest)
            size = manifest.compressed_bytes if manifest else None
            images.append(CandidateImage(name, image.platform, image.digest, (), size))
            version = version or image.labels.get(LABEL_VERSION)
    return images, version


def _plans(
    client: RegistryClient, target: ImageName, options: PromoteOptions, candidate: CandidateRecord
) -> list[BackendPlan]:
    """The stable tags of each backend and what happens to each, for the candidate's index."""
    version = SemVer.parse(candidate.version)
    seen: dict[str, ExistingTag] = {}
    plans = []
    for backend_name, digest in sorted((candidate.indexes or {}).items()):
        backend = options.matrix.backend(backend_name)
        index = client.manifest(target.repository, digest)
        if index is None:
            raise PublishError(f"the candidate's {backend_name} index {digest[:19]}… is gone")
        sources = [
            BuildRecord(
                backend=i.backend,
                platform=i.platform,
                image=str(target),
                ref=f"{target}@{i.digest}",
                digest=i.digest,
                output="push-by-digest",
                commit=candidate.commit,
                version=candidate.version,
                size_bytes=i.size_bytes,
                seconds=0.0,
            )
            for i in candidate.images
            if i.backend == backend_name
        ]
        plan = BackendPlan(backend_name, target, sources, index)
        for tag in options.rules.tags_for(
            version, backend_name, backend.tag_suffix, candidate.commit, candidate.ref, STABLE
        ):
            existing = existing_tag(client, target.repository, tag.name, digest, seen)
            llama_build = build_number(candidate.ref)
            plan.decisions.append(decide(tag, version, digest, existing, llama_build=llama_build))
        plans.append(plan)
    return plans


def _attest(
    options: PromoteOptions, signer: Signer, record: PromotionRecord, images: list[str]
) -> None:
    """The gates' figures on every promoted image, signed: what `nox -s verify` shows."""
    target = ImageName.parse(record.repository)
    credentials = options.access.credentials(target.registry)
    auths = {target.registry: credentials} if credentials else {}
    with docker_config(auths) as config_dir, tempfile.TemporaryDirectory() as tmp:
        predicate = Path(tmp) / "promotion.json"
        predicate.write_text(json.dumps(record.to_json()), encoding="utf-8")
        cosign = Cosign(options.env, config_dir)
        for image in images:
            cosign.attest(signer, image, predicate, PROMOTION_PREDICATE)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _table(record: PromotionRecord) -> str:
    """The gates as a Markdown table: the body of the pull request that records a release."""
    rows = [
        f"| {g.name} | {'pass' if g.passed else 'FAIL'} | {_cell(g.candidate)} "
        f"| {_cell(g.stable)} | {_cell(g.ratio)} | {g.limit} | {g.detail} |"
        for g in record.gates
    ]
    header = "| gate | verdict | candidate | stable | ratio | limit | how |\n"
    header += "|---|---|---:|---:|---:|---|---|"
    return (
        f"Release {record.version}: llama.cpp {record.candidate} ({record.commit[:7]}), after "
        f"{record.stable_version or 'no stable release'}.\n\n{header}\n" + "\n".join(rows) + "\n"
    )


def promote(options: PromoteOptions) -> PromotionRecord:
    """Hold the candidate to the gates; if they pass, move the stable tags to its digests."""
    started = time.monotonic()
    candidate = load_candidate(options.candidate)
    if not candidate.published:
        raise PublishError(
            f"candidate {candidate.name} stopped at {candidate.failed_stage}: nothing to promote",
            "track a release that passes every stage",
        )
    signer = None if options.no_sign else Signer.from_env(options.env)
    if signer is None and not options.no_sign and not options.dry_run:
        raise NO_SIGNER
    target = options.repository or ImageName.parse(candidate.repository)
    credentials = options.access.credentials(target.registry)
    gates_spec = options.gates
    with RegistryClient.for_access(target.registry, options.access, retry=options.retry) as client:
        backends = {i.backend for i in candidate.images}
        stable, stable_version = _stable(client, target, options, backends)
        gates: list[Gate] = [tiers_gate(candidate, options.matrix)]
        gates += size_gates(candidate, stable, gates_spec.max_size_ratio)
        speed = (gates_spec.backend, host_platform())
        ours = next((i for i in candidate.images if (i.backend, i.platform) == speed), None)
        theirs = next((i for i in stable if (i.backend, i.platform) == speed), None)
        if ours and theirs:
            sides = Sides(f"{target}@{ours.digest}", f"{target}@{theirs.digest}")
            gates += measure(sides, gates_spec, credentials)
        else:
            why = "no stable release to compare with" if theirs is None else "no cpu image"
            gates += [
                Gate(name, True, None, None, None, "-", "", why)
                for name in ("generation", "prompt", "healthy")
            ]
        record = PromotionRecord(
            candidate=f"{candidate.name} {candidate.version}",
            version=candidate.version,
            commit=candidate.commit,
            repository=str(target),
            stable_version=stable_version,
            promoted=False,
            gates=tuple(gates),
        )
        for gate in gates:
            console.out.print(gate.line(), markup=False, soft_wrap=True)
        reports = options.project.reports_dir
        if record.failed:
            write_promotion(reports, record)
            names = ", ".join(g.name for g in record.failed)
            raise GateError(
                f"promotion of {candidate.name} ({candidate.version}) refused: {names} failed",
                "no stable tag moved; edge is unchanged",
            )
        plans = _plans(client, target, options, candidate)
        whole = PublishPlan(
            SemVer.parse(candidate.version), candidate.commit, target, options.dry_run, False, plans
        )
        print_plan(whole)
        if whole.conflicts:
            tags = ", ".join(f"{target}:{d.tag}" for _, d in whole.conflicts)
            raise PublishError(
                f"immutable tag(s) {tags} already name another image; nothing was moved",
                "track again: a new candidate gets the next version",
            )
        if options.dry_run:
            return record
        if signer is not None:
            images = [f"{target}@{i.digest}" for i in candidate.images]
            _attest(options, signer, record, images)
        pushed = [f"{target}:{tag}" for plan in plans for tag in tag_backend(plan, client)]
        verify(whole, client)
    done = replace(
        record, promoted=True, tags=tuple(pushed), seconds=round(time.monotonic() - started, 1)
    )
    write_promotion(reports, done)
    (reports / "promotion.md").write_text(_table(done), encoding="utf-8")
    # The release's record in git: the workflow opens a pull request with this change.
    info = options.version
    pin = replace(info.llama_cpp, commit=candidate.commit, ref=candidate.ref)
    released = replace(info, version=candidate.version, llama_cpp=pin)
    save_version(options.project.version_file, released)
    console.out.print(
        f"promoted {candidate.name} as {candidate.version}: {len(pushed)} stable tag(s) moved in "
        f"{done.seconds:.0f} s; version.json says {candidate.version} now",
        soft_wrap=True,
    )
    return done
