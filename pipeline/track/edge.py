"""`nox -s track -- --from-edge`: the candidate the edge channel already proved, built by no
one here. When every backend's edge tags name images of version.json's pin at version.json's
version, the candidate record is written from the registry: each index, each platform image's
compressed size, and its tiers as its signed smoke attestations say (verified with the key or
identity verify uses). release.yml on a `v*` tag promotes it instead of rebuilding.
"""

from __future__ import annotations

from pipeline.core import console
from pipeline.core.version import SemVer
from pipeline.matrix import Backend
from pipeline.oci.buildx import docker_config
from pipeline.oci.cosign import SMOKE_PREDICATE, Cosign, Verifier, verifier_from_env
from pipeline.oci.image import LABEL_CPU_VARIANTS, LABEL_REVISION, LABEL_VERSION
from pipeline.oci.registry import PlatformImage, RegistryClient
from pipeline.oci.tags import EDGE, load_tag_rules
from pipeline.records import SmokeRecord
from pipeline.records.candidate import (
    CANDIDATE_RECORD,
    CandidateImage,
    CandidateRecord,
    TierResult,
    write_candidate,
)
from pipeline.track.options import TrackOptions


def _tiers(
    cosign: Cosign, verifier: Verifier, ref: str, image: PlatformImage
) -> tuple[TierResult, ...]:
    """The tiers the image's signed smoke attestations say it passed or failed."""
    records = (
        SmokeRecord.from_json(statement.get("predicate") or {}, f"{ref}: smoke attestation")
        for statement in cosign.attested(verifier, ref, SMOKE_PREDICATE)
    )
    return tuple(
        TierResult(r.tier, r.passed, r.seconds, tuple(r.failed))
        for r in records
        if (r.digest, r.platform) == (image.digest, image.platform)
    )


def _edge_tag(client: RegistryClient, options: TrackOptions, backend: Backend) -> str | None:
    """The backend's edge tag (`edge`, `b<N>`...) naming an image of the pin at the version."""
    info = options.version
    pin, version = info.llama_cpp, SemVer.parse(info.version)
    planned = load_tag_rules().tags_for(
        version, backend.name, backend.tag_suffix, pin.commit, pin.ref, EDGE
    )
    wanted = (pin.commit, str(version))
    for tag in sorted({t.name for t in planned}):
        found = client.labels(options.repository.repository, tag)
        if found and (found[1].get(LABEL_REVISION), found[1].get(LABEL_VERSION)) == wanted:
            return tag
    return None


def from_edge(options: TrackOptions) -> CandidateRecord | None:
    """The candidate edge already proved for version.json's pin and version (every backend's
    edge tags name images of that commit and version), or None."""
    info = options.version
    repository = options.repository
    credentials = options.access.credentials(repository.registry)
    verifier = verifier_from_env(None, options.env.get("COSIGN_IDENTITY"), None, options.env)
    images: list[CandidateImage] = []
    indexes: dict[str, str] = {}
    auths = {repository.registry: credentials} if credentials else {}
    with (
        RegistryClient.for_access(repository.registry, options.access) as client,
        docker_config(auths) as config_dir,
    ):
        cosign = Cosign(options.env, config_dir)
        for backend in options.backends:
            tag = _edge_tag(client, options, backend)
            index = client.manifest(repository.repository, tag) if tag else None
            if index is None:
                pin = info.llama_cpp.ref or info.llama_cpp.commit[:7]
                console.err.print(
                    f"track: edge holds no {backend.name} image of {pin} as {info.version}",
                    markup=False,
                )
                return None
            indexes[backend.name] = index.digest
            for image in client.platform_images(repository.repository, index):
                manifest = client.manifest(repository.repository, image.digest)
                size = manifest.compressed_bytes if manifest else None
                tiers = _tiers(cosign, verifier, f"{repository}@{image.digest}", image)
                variants = image.labels.get(LABEL_CPU_VARIANTS)
                images.append(
                    CandidateImage(
                        backend.name,
                        image.platform,
                        image.digest,
                        tiers,
                        compressed_bytes=size,
                        cpu_variants=variants,
                    )
                )
    record = CandidateRecord(
        ref=info.llama_cpp.ref,
        commit=info.llama_cpp.commit,
        version=info.version,
        repository=str(repository),
        reason="proven on edge",
        status="published",
        seconds=0.0,
        images=tuple(images),
        indexes=indexes,
    )
    write_candidate(options.work_dir / CANDIDATE_RECORD, record)
    shown = ", ".join(f"{b} {d[:19]}…" for b, d in indexes.items())
    console.out.print(f"track: edge already proved {record.name} as {info.version} ({shown})")
    return record
