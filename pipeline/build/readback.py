"""What a finished job produced, and where it goes.

Pushes never use BuildKit's own push (the lab's `docker` driver refuses push-by-digest, and
rewrite-timestamp conflicts with its image exporter): every builder writes an OCI layout with
rewrite-timestamp, and the registry client pushes it, blob by blob, then by digest, then under
its tags. The digests recorded are read back from the registry, not taken from buildx's word.
Loads are asked of the local engine, --oci of the tarball. One BuildRecord per platform.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.build.plan import BuildJob, split_repository
from pipeline.core.errors import BuildError, PipelineError
from pipeline.oci.engine import image_digest, image_sizes, local_image
from pipeline.oci.image import ImageName, Manifest, OciLayout
from pipeline.oci.registry import RegistryAccess, RegistryClient
from pipeline.records import PUSHED_OUTPUTS, BuildRecord


def check_push_access(jobs: Sequence[BuildJob], access: RegistryAccess) -> None:
    """Each repository a job pushes to takes our pushes: asked before any build starts, so a
    missing password or an unreachable registry is not found after the compile."""
    for repository in dict.fromkeys(
        split_repository(job.tags[0])[0] for job in jobs if job.output in PUSHED_OUTPUTS
    ):
        image = ImageName.parse(repository)
        with RegistryClient.for_access(image.registry, access) as client:
            client.ping(image.repository, push=True)


def push_layout(job: BuildJob, layout_dir: Path, access: RegistryAccess) -> Manifest:
    """Push the job's OCI layout to its repository (and under its tags, for --push), with the
    credentials that belong to its registry; the top manifest as the registry holds it
    afterwards. The layout is removed once pushed."""
    targets: dict[str, list[str]] = {}
    for reference in job.tags:  # for push-by-digest: the repository alone, no tag
        name, tag = split_repository(reference)
        targets.setdefault(name, []).extend([tag] if tag else [])
    top: Manifest | None = None
    for repository, tags in targets.items():
        image = ImageName.parse(repository)
        try:
            with (
                OciLayout(layout_dir) as layout,
                RegistryClient.for_access(image.registry, access) as client,
            ):
                pushed = client.push_layout(image.repository, layout, tags)
                top = client.manifest(image.repository, pushed.digest)
        except PipelineError as exc:
            raise type(exc)(f"{job.key}: pushing to {repository}: {exc.message}", exc.hint) from exc
        if top is None or top.digest != pushed.digest:
            raise BuildError(
                f"{job.key}: pushed {repository}@{pushed.digest[:19]}… but the "
                "registry does not return it"
            )
    shutil.rmtree(layout_dir, ignore_errors=True)
    assert top is not None
    return top


def collect_records(
    job: BuildJob,
    seconds: float,
    commit: str,
    version: str,
    client: Any,
    pushed: Manifest | None = None,
    sboms: Mapping[str, str] | None = None,
) -> list[BuildRecord]:
    """The records of one job's platforms, from what its output holds now."""
    per_platform: dict[str, str] = {}
    indexes: dict[str, str] = {}
    sizes: dict[str, tuple[int | None, int | None]] = {}
    if job.output == "load":
        only = job.platforms[0].name
        image = local_image(client, job.tags[0])
        found = image_digest(image) if image is not None else None
        if found is None:
            raise BuildError(
                f"{job.key}: buildx succeeded but the engine has no image {job.tags[0]}",
                "is --builder a builder of this engine? (`docker buildx ls`)",
            )
        measured = image_sizes(client, job.tags[0], only)
        per_platform[only] = found
        sizes[only] = (measured.uncompressed, measured.compressed) if measured else (None, None)
    elif pushed is not None:
        if not pushed.is_index:  # one platform pushed as a bare manifest: that is its digest
            per_platform = {job.platforms[0].name: pushed.digest}
        else:
            per_platform = pushed.platform_digests()
            if len(job.platforms) == 1:  # attestations: the index holds image + SBOM/provenance
                indexes[job.platforms[0].name] = pushed.digest
    else:
        assert job.oci_path is not None
        with OciLayout(job.oci_path) as layout:
            per_platform = layout.platform_digests()
    records: list[BuildRecord] = []
    for platform in job.platforms:
        platform_digest = per_platform.get(platform.name)
        if not platform_digest:
            raise BuildError(f"{job.key}: no {platform.name} manifest in what buildx produced")
        if job.output == "oci":
            ref = f"oci-archive:{job.oci_path}@{platform_digest}"
        elif job.output == "load":
            ref = job.tags[0]
        else:
            ref = f"{job.repository}@{platform_digest}"
        uncompressed, compressed = sizes.get(platform.name, (None, None))
        records.append(
            BuildRecord(
                backend=job.backend.name,
                platform=platform.name,
                image=job.repository,
                ref=ref,
                digest=platform_digest,
                output=job.output,
                commit=commit,
                version=version,
                size_bytes=uncompressed,
                seconds=round(seconds, 1),
                cpu_variants=job.cpu_variants.name,
                gpu_architectures=job.gpu_architectures,
                compressed_bytes=compressed,
                index_digest=indexes.get(platform.name),
                sbom=(sboms or {}).get(platform.name),
            )
        )
    return records
