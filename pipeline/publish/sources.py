"""The images publish joins: read from the registries their build records name, joined into one
index per backend, and copied into the target repository, all through the registry API.

Blobs the target repository lacks are mounted from the source repository when both live in
the same registry (no data moves), copied across otherwise; manifests go children first, so the
target never holds an index whose parts it lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from pipeline.core.errors import PublishError
from pipeline.matrix import Backend
from pipeline.oci.image import MEDIA_OCI_INDEX, ImageName, Manifest
from pipeline.oci.registry import Credentials, RegistryClient, RetryPolicy
from pipeline.records import BuildRecord


class Registries:
    """One client per registry a publish talks to, closed together."""

    def __init__(
        self, auths: Mapping[str, Credentials], retry: RetryPolicy, token_hosts: Sequence[str] = ()
    ) -> None:
        self.auths = auths
        self.retry = retry
        self.token_hosts = token_hosts
        self._clients: dict[str, RegistryClient] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Registries:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def client(self, registry: str) -> RegistryClient:
        if registry not in self._clients:
            client = RegistryClient(
                registry, self.auths.get(registry), retry=self.retry, token_hosts=self.token_hosts
            )
            self._clients[registry] = self._stack.enter_context(client)
        return self._clients[registry]

    def manifest(self, name: ImageName, digest: str) -> Manifest:
        manifest = self.client(name.registry).manifest(name.repository, digest)
        if manifest is None:
            raise PublishError(
                f"{name}@{digest[:19]}… is not in the registry",
                "were the digests pushed with `nox -s build -- … --push-by-digest`?",
            )
        return manifest


def _entries(registries: Registries, backend: Backend, source: BuildRecord) -> list[dict[str, Any]]:
    """What one source contributes to the release index: the descriptors of its pushed index
    (the image and its attestation manifests), or of its bare image manifest."""
    top = registries.manifest(ImageName.parse(source.image), source.index_digest or source.digest)
    if top.is_index:
        return [dict(entry) for entry in top.data.get("manifests") or []]
    platforms = {p.name: p for p in backend.platforms}
    if source.platform not in platforms:
        raise PublishError(
            f"{source.filename}: {backend.name} is not built for {source.platform}",
            f"its platforms: {', '.join(platforms)}",
        )
    return [
        {
            "mediaType": top.media_type,
            "digest": top.digest,
            "size": len(top.body),
            "platform": platforms[source.platform].oci,
        }
    ]


def compose_index(
    registries: Registries, backend: Backend, sources: Sequence[BuildRecord]
) -> Manifest:
    """The release index of one backend: every source's descriptors, in platform order. The
    same sources give the same bytes, so an unchanged re-publish finds its index in place."""
    entries = [entry for source in sources for entry in _entries(registries, backend, source)]
    data = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": entries}
    index = Manifest.from_bytes(json.dumps(data, separators=(",", ":")).encode("utf-8"))
    platforms = sorted(str(d.platform) for d in index.platform_descriptors)
    expected = sorted(s.platform for s in sources)
    if platforms != expected:
        raise PublishError(
            f"{backend.name}: the digests hold platforms {', '.join(platforms)}, but the build "
            f"reports say {', '.join(expected)}",
            "rebuild: a report names the wrong platform for its digest",
        )
    return index


def copy_image(registries: Registries, source: ImageName, digest: str, target: ImageName) -> None:
    """Make `target` hold the manifest (or index) `digest` of `source` and all it refers to."""
    into = registries.client(target.registry)
    if into.manifest_digest(target.repository, digest) == digest:
        return  # there already, and a registry only holds a manifest whose parts it holds
    manifest = registries.manifest(source, digest)
    if manifest.is_index:
        for child in manifest.descriptors:
            copy_image(registries, source, child.digest, target)
    else:
        for blob in (manifest.config, *manifest.layers):
            if into.has_blob(target.repository, blob.digest):
                continue
            if source.registry == target.registry and into.mount_blob(
                target.repository, blob.digest, source.repository
            ):
                continue
            data = registries.client(source.registry).blob(source.repository, blob.digest)
            into.push_blob(target.repository, blob.digest, data)
    into.put_manifest(target.repository, digest, manifest)
