"""The records of one backend on one platform: what build made (BuildRecord) and what smoke
found (SmokeRecord), filed as build/reports/<build|smoke>-<backend>-<arch>[-<tier>].json; their
one writer and loader."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pipeline.core.datafile import write_json_atomic
from pipeline.core.errors import PipelineError, RecordInvalidError, RecordMissingError
from pipeline.core.version import COMMIT_RE
from pipeline.oci.image import DIGEST_RE, ImageName, split_reference
from pipeline.records.schema import SCHEMA, Record

# The smoke tier every backend has (pipeline/matrix/matrix.yaml): it runs on any machine.
NO_GPU_TIER = "no-gpu"
# The tier every backend has too: a trained model's answers checked (pipeline/smoke/real.py).
REAL_TIER = "real"
# The CPU kernels under QEMU's CPU models (pipeline/smoke/cpus.py), with the real model.
CPUS_TIER = "cpus"
# The tiers every backend has besides matrix.yaml's: each runs smoke.yaml's trained model.
MODEL_TIERS = (REAL_TIER, CPUS_TIER)
Output = Literal["load", "push", "push-by-digest", "oci"]
OUTPUTS: tuple[Output, ...] = ("load", "push", "push-by-digest", "oci")
PUSHED_OUTPUTS = frozenset({"push", "push-by-digest"})
# A backend, a tier or a CPU variant set: matrix.yaml's names (they become file names).
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*\Z")
_PLATFORM_RE = re.compile(r"^[a-z0-9]+/[a-z0-9]+(?:/[a-z0-9]+)?\Z")
# A file beside the record: a name, no directory part (publish attests it publicly).
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _is_image_name(text: str) -> bool:
    try:
        ImageName.parse(text)
    except PipelineError:
        return False
    return True


def _is_reference(text: str, of: str | None = None) -> bool:
    """Whether `text` is an image reference (to a tag or digest of repository `of`)."""
    try:
        name = split_reference(text)[0]
        return of is None or name == ImageName.parse(of)
    except PipelineError:
        return False


def arch_of(platform: str) -> str:
    """`linux/arm64` -> `arm64`."""
    return platform.rsplit("/", 1)[-1]


class PlatformRecord(Record):
    """A record of one backend on one platform, filed as <PREFIX>-<backend>-<arch>.json."""

    PREFIX: ClassVar[str]
    backend: str
    platform: str

    @property
    def arch(self) -> str:
        return arch_of(self.platform)

    def validate(self, where: str) -> None:
        """Its backend and platform name its file: names, never paths."""
        if not _NAME_RE.match(self.backend):
            raise self.refuse(where, "backend", "a backend name such as cpu")
        if not _PLATFORM_RE.match(self.platform):
            raise self.refuse(where, "platform", "a platform such as linux/amd64")

    @property
    def stem(self) -> str:
        return f"{self.PREFIX}-{self.backend}-{self.arch}"

    @property
    def filename(self) -> str:
        return f"{self.stem}.json"


@dataclass(frozen=True)
class BuildRecord(PlatformRecord):
    """One built image for one (backend, platform).

    `ref` is what `docker run` takes (a tag for --load, name@digest once pushed); `digest` the
    manifest digest (the pushed per-platform manifest, read back from the registry; for --load
    the local image's).
    """

    KIND: ClassVar[str] = "build report"
    HINT: ClassVar[str] = "rebuild: nox -s build"
    PREFIX: ClassVar[str] = "build"

    backend: str
    platform: str  # linux/amd64
    image: str  # repository name, no tag
    ref: str
    digest: str
    output: str  # load | push | push-by-digest | oci
    commit: str
    version: str
    size_bytes: int | None  # uncompressed (sum of the layers' sizes); None when not local
    seconds: float
    cpu_variants: str | None = None
    compressed_bytes: int | None = None
    # A single-platform push with attestations is an index (image + provenance manifests):
    # publish joins that index, not the bare image, so the attestations reach the release.
    index_digest: str | None = None
    # The image's CycloneDX SBOM, a file beside this record (images assembled file by file).
    sbom: str | None = None
    # The GPU targets compiled in (GPU backends; records written before this field: None).
    gpu_architectures: tuple[str, ...] | None = None
    schema: int = SCHEMA

    @property
    def pushed(self) -> bool:
        return self.output in PUSHED_OUTPUTS

    @property
    def source(self) -> str:
        """What publish joins into the release index: the pushed index, else the manifest."""
        return f"{self.image}@{self.index_digest or self.digest}"

    def validate(self, where: str) -> None:
        super().validate(where)
        digest = "a digest sha256:<64 hex>"
        if not DIGEST_RE.match(self.digest):
            raise self.refuse(where, "digest", digest)
        if self.index_digest is not None and not DIGEST_RE.match(self.index_digest):
            raise self.refuse(where, "index_digest", f"{digest} or null")
        if self.output not in OUTPUTS:
            raise self.refuse(where, "output", " or ".join(OUTPUTS))
        if not _is_image_name(self.image):
            raise self.refuse(where, "image", "a repository name such as docker.io/acme/x")
        if self.output == "oci":
            ok = self.ref.startswith("oci-archive:") and self.ref.endswith(f"@{self.digest}")
        else:
            ok = _is_reference(self.ref, of=self.image)
        if not ok:
            raise self.refuse(where, "ref", f"a reference to {self.image} (its output)")
        if not COMMIT_RE.match(self.commit):
            raise self.refuse(where, "commit", "a 40-hex llama.cpp commit")
        if self.cpu_variants is not None and not _NAME_RE.match(self.cpu_variants):
            raise self.refuse(where, "cpu_variants", "a CPU variant set's name or null")
        if self.sbom is not None and not _FILE_NAME_RE.match(self.sbom):
            raise self.refuse(where, "sbom", "a file name in the reports directory, or null")

    def validate_files(self, where: str, directory: Path) -> None:
        """Its SBOM, when it exists, is a file of the reports directory, not a link out."""
        if self.sbom is not None and (directory / self.sbom).is_symlink():
            raise self.refuse(where, "sbom", "a file in the reports directory, not a link")


@dataclass(frozen=True)
class Figure(Record):
    """A measured value a check reports (the load check's latencies and tokens/s)."""

    KIND: ClassVar[str] = "smoke figure"
    HINT: ClassVar[str] = "re-run `nox -s smoke`"

    name: str
    value: float
    unit: str


@dataclass(frozen=True)
class CheckResult(Record):
    """One check's verdict, how long it took, what it saw, and what it measured."""

    name: str
    passed: bool
    seconds: float
    detail: str = ""
    skipped: bool = False
    figures: tuple[Figure, ...] = ()

    KIND: ClassVar[str] = "smoke check"
    HINT: ClassVar[str] = "re-run `nox -s smoke`"


@dataclass(frozen=True)
class SmokeRecord(PlatformRecord):
    """One image on one platform, every check with its verdict; what publish requires."""

    KIND: ClassVar[str] = "smoke report"
    HINT: ClassVar[str] = "re-run `nox -s smoke`"
    PREFIX: ClassVar[str] = "smoke"

    image: str
    digest: str | None
    backend: str
    platform: str
    passed: bool
    seconds: float
    checks: tuple[CheckResult, ...] = ()
    time_to_healthy: float | None = None
    model: str | None = None
    # The smoke tier it ran (matrix.yaml): `no-gpu` anywhere, `gpu` where the GPU is visible.
    tier: str = NO_GPU_TIER
    schema: int = SCHEMA

    @property
    def stem(self) -> str:
        """smoke-<backend>-<arch> for the no-gpu tier, with -<tier> for the others."""
        base = f"{self.PREFIX}-{self.backend}-{self.arch}"
        return base if self.tier == NO_GPU_TIER else f"{base}-{self.tier}"

    @property
    def failed(self) -> list[str]:
        """Checks that ran and failed (skipped ones are the consequence, not the cause)."""
        return [c.name for c in self.checks if not c.passed and not c.skipped]

    def validate(self, where: str) -> None:
        """`passed` says what its checks say: every check passed (and there is one)."""
        super().validate(where)
        if self.digest is not None and not DIGEST_RE.match(self.digest):
            raise self.refuse(where, "digest", "a digest sha256:<64 hex> or null")
        if not _is_reference(self.image):
            raise self.refuse(where, "image", "an image reference")
        if not _NAME_RE.match(self.tier):
            raise self.refuse(where, "tier", "a smoke tier's name")
        contradicting = [c.name for c in self.checks if c.skipped and c.passed]
        if contradicting:
            raise self.refuse(
                where, "checks", f"no check both skipped and passed ({contradicting[0]})"
            )
        if self.passed != (bool(self.checks) and all(c.passed for c in self.checks)):
            said = (
                "failed: " + ", ".join(self.failed or ["no checks"])
                if self.passed
                else "all passed"
            )
            raise self.refuse(where, "passed", f"what its checks say ({said})")


# ------------------------------------------------------------------ writing, loading

R = TypeVar("R", BuildRecord, SmokeRecord)


def write_record(directory: Path, record: BuildRecord | SmokeRecord) -> Path:
    """Write a record atomically into `directory` (made if needed); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / record.filename
    write_json_atomic(path, record.to_json())
    path.chmod(0o644)  # an artifact for other stages and CI uploads, no secret in it
    return path


def _load(directory: Path, record: type[R]) -> list[R]:
    records: list[R] = []
    for path in sorted(directory.glob(f"{record.PREFIX}-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise RecordInvalidError(
                f"cannot read {record.KIND} {path}: {type(exc).__name__}: {exc}", record.HINT
            ) from None
        loaded = record.from_json(data, str(path))
        if isinstance(loaded, BuildRecord):
            loaded.validate_files(str(path), directory)
        records.append(loaded)
    return records


def load_build_records(directory: Path) -> list[BuildRecord]:
    """Every build record in `directory`, sorted by file name (none: an empty list)."""
    return _load(directory, BuildRecord)


def load_smoke_records(directory: Path) -> list[SmokeRecord]:
    """Every smoke record in `directory`, sorted by file name (none: an empty list)."""
    return _load(directory, SmokeRecord)


def find_build_record(
    records: Iterable[BuildRecord], backend: str, platform: str, directory: Path
) -> BuildRecord:
    """The record of one (backend, platform), or RecordMissingError saying how to make it."""
    for record in records:
        if record.backend == backend and record.platform == platform:
            return record
    raise RecordMissingError(
        f"no build report for {backend} {platform} in {directory}",
        f"run: nox -s build -- {arch_of(platform)} --backend {backend}",
    )


def require_build_records(records: Sequence[BuildRecord], directory: Path) -> None:
    if not records:
        raise RecordMissingError(
            f"no build reports (build-*.json) in {directory}",
            "run `nox -s build -- <arch> --backend <b> --push-by-digest` and `nox -s smoke`",
        )
