"""The OCI image model every stage shares: names, platforms, descriptors, manifests, labels.

Pure data, no I/O but reading an OCI layout tarball: the registry client (pipeline/oci/registry.py)
fetches manifests, build reads what it pushed or exported, publish joins and verifies them,
all through these types. One rule tells attestations (SBOM, provenance) from runnable images.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import RegistryError

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
# Without an Accept listing them, registries may down-convert or answer 404 for lists.
MANIFEST_ACCEPT = ", ".join(
    [MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST]
)

# Image labels the pipeline writes (render) and checks (smoke, publish).
LABEL_VERSION = "org.opencontainers.image.version"
LABEL_REVISION = "org.opencontainers.image.revision"
# Namespace of this project's own image labels (backend, CPU variant set, GPU targets).
LABEL_PREFIX = "org.llamacpp-images"
# BuildKit marks attestation manifests in an index with this annotation.
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

DOCKER_HUB = "docker.io"


def sha256_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Platform:
    """An OCI platform: `linux/arm64`, `linux/arm/v7`."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        return cls(str(data.get("os", "")), str(data.get("architecture", "")), data.get("variant"))

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Descriptor:
        platform = data.get("platform")
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=str(data.get("digest", "")),
            size=int(data.get("size", 0)),
            platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
            annotations=dict(data.get("annotations") or {}),
        )

    @property
    def is_attestation(self) -> bool:
        """BuildKit stores SBOM/provenance as manifests of platform unknown/unknown in the index
        (annotated as such); an entry without an OS is not runnable either."""
        if self.annotations.get(ATTESTATION_ANNOTATION) == "attestation-manifest":
            return True
        return self.platform is not None and self.platform.os in ("unknown", "")

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


@dataclass(frozen=True)
class Manifest:
    """A manifest or an index exactly as the registry holds it (bytes define the digest)."""

    media_type: str
    digest: str
    body: bytes
    data: Mapping[str, Any]

    @classmethod
    def from_bytes(cls, body: bytes, media_type: str | None = None) -> Manifest:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"manifest is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RegistryError("manifest is not a JSON object")
        kind = str(data.get("mediaType") or media_type or "")
        return cls(kind, sha256_digest(body), body, data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES or "manifests" in self.data

    @property
    def descriptors(self) -> list[Descriptor]:
        return [Descriptor.from_json(item) for item in self.data.get("manifests") or []]

    @property
    def platform_descriptors(self) -> list[Descriptor]:
        """The runnable images of an index: its attestation manifests left out."""
        return [d for d in self.descriptors if not d.is_attestation]

    def platform_digests(self) -> dict[str, str]:
        """platform -> manifest digest of an index's runnable images (the first of each)."""
        found: dict[str, str] = {}
        for descriptor in self.platform_descriptors:
            if descriptor.platform is not None:
                found.setdefault(str(descriptor.platform), descriptor.digest)
        return found

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_json(item) for item in self.data.get("layers") or []]

    @property
    def config(self) -> Descriptor:
        config = self.data.get("config")
        if not isinstance(config, dict):
            raise RegistryError(f"manifest {self.digest} has no config descriptor")
        return Descriptor.from_json(config)

    @property
    def compressed_bytes(self) -> int:
        """What a pull downloads of an image: its config and compressed layers."""
        return sum(d.size for d in (self.config, *self.layers))


def config_platform(config: Mapping[str, Any]) -> Platform:
    """The platform an image config blob declares."""
    return Platform(str(config.get("os", "")), str(config.get("architecture", "")))


def config_labels(config: Mapping[str, Any]) -> dict[str, str]:
    labels = (config.get("config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


@dataclass(frozen=True)
class ImageName:
    """A repository in a registry: `docker.io/acme/llama-server`, `127.0.0.1:5000/x/y`."""

    registry: str
    repository: str

    @classmethod
    def parse(cls, name: str) -> ImageName:
        """Docker's normalisation: no registry part means Docker Hub, one path part `library/`."""
        if "@" in name or not name or name != name.strip():
            raise RegistryError(f"image name {name!r} is not a repository name")
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, name
        if registry in {"index.docker.io", "registry-1.docker.io"}:
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if ":" in repository or not repository:
            raise RegistryError(f"image name {name!r} has a tag; give the repository name only")
        return cls(registry, repository)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}"

    def tagged(self, tag: str) -> str:
        return f"{self}:{tag}"


def split_reference(ref: str) -> tuple[ImageName, str]:
    """`name@sha256:…` or `name:tag` → (ImageName, digest-or-tag); no tag means `latest`."""
    if "@" in ref:
        name, _, reference = ref.partition("@")
        if not DIGEST_RE.match(reference):
            raise RegistryError(f"image reference {ref!r} has a malformed digest")
        return ImageName.parse(name), reference
    head, _, last = ref.rpartition("/")
    if ":" in last:
        repo_last, _, tag = last.partition(":")
        return ImageName.parse(f"{head}/{repo_last}" if head else repo_last), tag
    return ImageName.parse(ref), "latest"


class OciLayout:
    """An OCI image layout as `buildx build --output type=oci` writes it: a directory
    (`tar=false`) or a tarball. Blobs are read by digest; index.json names what was built."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        if not path.is_dir():
            try:
                self._tar = tarfile.open(path)  # noqa: SIM115 (closed by __exit__)
            except (OSError, tarfile.TarError) as exc:
                raise RegistryError(f"{path} is not an OCI layout: {exc}") from None

    def __enter__(self) -> OciLayout:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tar is not None:
            self._tar.close()

    def _read(self, name: str) -> bytes:
        try:
            if self._tar is None:
                return (self.path / name).read_bytes()
            member = self._tar.extractfile(name)
            if member is not None:
                return member.read()
        except (OSError, KeyError):
            pass
        raise RegistryError(f"{self.path}: {name} missing from the OCI layout")

    def blob(self, digest: str) -> bytes:
        data = self._read(f"blobs/sha256/{digest.split(':', 1)[1]}")
        if sha256_digest(data) != digest:
            raise RegistryError(f"{self.path}: blob {digest} is corrupt")
        return data

    def manifest(self, descriptor: Descriptor) -> Manifest:
        return Manifest.from_bytes(self.blob(descriptor.digest), descriptor.media_type)

    @property
    def top(self) -> Descriptor:
        """What the build produced: the one entry of index.json (an image or an index)."""
        entries = Manifest.from_bytes(self._read("index.json")).descriptors
        if len(entries) != 1:
            raise RegistryError(f"{self.path}: index.json lists {len(entries)} images, expected 1")
        return entries[0]

    def platform_digests(self) -> dict[str, str]:
        """platform -> the image manifest digest of each runnable image in the layout."""
        top = self.top
        if top.is_index:
            return self.manifest(top).platform_digests()
        config = json.loads(self.blob(self.manifest(top).config.digest))
        return {str(config_platform(config)): top.digest}
