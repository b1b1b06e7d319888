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
LABEL_CPU_VARIANTS = f"{LABEL_PREFIX}.cpu-variants"
# BuildKit marks attestation manifests in an index with this annotation.
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")  # \Z: no line break after
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")

DOCKER_HUB = "docker.io"
# Docker's reference grammar: a registry host[:port] and lowercase path components.
_REGISTRY_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z"
)
_REPOSITORY_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*\Z"
)


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
    def from_json(cls, data: Any) -> Descriptor:
        """A descriptor as a manifest holds it; RegistryError unless it is one (its digest a
        digest, its size a whole number): manifests come from registries and layouts."""
        if not isinstance(data, dict):
            raise RegistryError(
                f"a manifest lists {type(data).__name__} {data!r:.80}, not a descriptor"
            )
        platform, size = data.get("platform"), data.get("size", 0)
        annotations = data.get("annotations") or {}
        digest = data.get("digest", "")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise RegistryError(f"a descriptor has the digest {digest!r:.80}, not a sha256 digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"descriptor {digest} has the size {size!r:.40}")
        if not isinstance(annotations, dict):
            raise RegistryError(f"descriptor {digest} has annotations that are not a mapping")
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=digest,
            size=size,
            platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
            annotations={str(k): str(v) for k, v in annotations.items()},
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
        except (ValueError, RecursionError) as exc:  # bytes not UTF-8 are a ValueError too
            raise RegistryError(f"manifest is not JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise RegistryError("manifest is not a JSON object")
        kind = str(data.get("mediaType") or media_type or "")
        return cls(kind, sha256_digest(body), body, data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES or "manifests" in self.data

    def _list(self, key: str) -> list[Descriptor]:
        items = self.data.get(key) or []
        if not isinstance(items, list):
            raise RegistryError(f"manifest {self.digest}: '{key}' is not a list")
        return [Descriptor.from_json(item) for item in items]

    @property
    def descriptors(self) -> list[Descriptor]:
        return self._list("manifests")

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
        return self._list("layers")

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
    inner = config.get("config") or {}
    labels = (inner.get("Labels") if isinstance(inner, dict) else None) or {}
    if not isinstance(labels, dict):
        raise RegistryError("an image config's Labels are not a mapping")
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
        if not _REGISTRY_RE.match(registry) or not _REPOSITORY_RE.match(repository):
            raise RegistryError(
                f"image name {name!r} is not a repository name",
                "lowercase path components of letters, digits and . _ -, after host[:port]/",
            )
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
        if not TAG_RE.match(tag):
            raise RegistryError(f"image reference {ref!r} has a malformed tag")
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
