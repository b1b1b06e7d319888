"""What every stage's options resolve against (`Resolved`: the project, the matrix,
version.json), and names from a command line (`--backend cpu,vulkan`, `arm64`,
`--gpu-architectures 75,90`) resolved once into the matrix's typed values; a name the matrix does
not know is a usage error listing the ones it does."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.core.errors import UsageError
from pipeline.core.project import Project
from pipeline.core.version import VersionInfo, load_version
from pipeline.matrix import load_matrix
from pipeline.matrix.backends import Backend, Matrix, TargetPlatform, host_platform
from pipeline.oci.credentials import RegistryAccess
from pipeline.oci.image import ImageName


@dataclass(frozen=True)
class Resolved:
    """The base of every stage's options: the project, its matrix and its version.json, read
    once when the options resolve; a stage reads them here, never again from their files.
    `access`: which registry the environment's credentials belong to ($REGISTRY_HOST, else
    version.json's image's registry)."""

    project: Project
    matrix: Matrix = field(repr=False)
    version: VersionInfo = field(repr=False)
    access: RegistryAccess = field(repr=False)

    @classmethod
    def load(
        cls, project: Project, matrix: Matrix | None = None, env: Mapping[str, str] | None = None
    ) -> Resolved:
        version = load_version(project.version_file)
        access = RegistryAccess.from_env(ImageName.parse(version.image).registry, env)
        return cls(project, matrix or load_matrix(), version, access)


def backend_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--backend", metavar="B[,B...]", help=help_text)


def platforms_argument(parser: argparse.ArgumentParser) -> None:
    """Platforms as positional arguments (`platforms_named` reads them)."""
    parser.add_argument(
        "platforms",
        nargs="*",
        metavar="ARCH|PLATFORM",
        help="amd64, arm64, or linux/<arch> (default: this machine's)",
    )


def platforms_named(values: Sequence[str] | None, matrix: Matrix) -> tuple[TargetPlatform, ...]:
    """Platform names (`arm64`, `linux/arm64`, comma-separated or repeated), checked against the
    matrix; none given: this machine's."""
    given = [p for value in values or () for p in value.split(",") if p.strip()]
    return tuple(dict.fromkeys(matrix.platform(p) for p in given or [host_platform()]))


def backends_named(text: str | Sequence[str] | None, matrix: Matrix) -> tuple[Backend, ...]:
    """Backend names (comma-separated, or a sequence), checked; none given: the matrix's
    default. `auto`: the one this host's GPUs call for (pipeline/matrix/hostgpu.py), with the
    evidence printed."""
    if text is None or isinstance(text, str):
        text = (text or matrix.default_backend).split(",")
    names = [name.strip() for name in text if name.strip()]
    if "auto" in names:
        from pipeline.core.console import err
        from pipeline.matrix.hostgpu import detect_backend

        detection = detect_backend(matrix)
        err.print(detection.line(), markup=False, soft_wrap=True)
        names = [detection.backend if name == "auto" else name for name in names]
    return tuple(matrix.backend(name) for name in dict.fromkeys(names))


def gpu_architectures_named(text: str | None) -> tuple[str, ...] | None:
    """`90`, `75,90-real`, `90-virtual` or `gfx1100;gfx1201`: CMake's GPU target forms (90:
    SASS and PTX; -real: SASS only; -virtual: PTX only, compiled by the driver at first start,
    the quickest build; gfx…: ROCm). None: the matrix's list."""
    if text is None:
        return None
    items = [item.strip() for item in re.split(r"[,;]", text) if item.strip()]
    if not items or not all(re.fullmatch(r"[0-9a-z]+(-real|-virtual)?", i) for i in items):
        raise UsageError(
            f"--gpu-architectures {text!r}: expected a list such as 90, 75,90-real or 90-virtual"
        )
    return tuple(dict.fromkeys(items))
