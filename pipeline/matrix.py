"""The backend x platform matrix (pipeline/matrix.yaml), loaded into typed records.

Every key is checked when the file is read, so a typo fails with the key's name before a
build starts; names given on the command line (backend, platform, CPU variant set) are
checked against it and rejected with the list of valid ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError, UsageError

MATRIX_FILE = Path(__file__).with_name("matrix.yaml")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_CMAKE_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Debian/Ubuntu package names (policy §5.6.1).
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")


@dataclass(frozen=True)
class Platform:
    """One target platform and what it means to the cross toolchain."""

    name: str  # linux/amd64
    arch: str  # amd64: Docker's TARGETARCH, Debian's architecture
    gnu_triplet: str  # x86_64-linux-gnu
    cmake_processor: str  # x86_64


@dataclass(frozen=True)
class CpuVariantSet:
    """A choice of ggml CPU kernels: configure flags per architecture."""

    name: str
    cmake_flags: Mapping[str, tuple[tuple[str, str], ...]]  # arch -> ((KEY, value), ...)


@dataclass(frozen=True)
class RuntimeUser:
    name: str
    uid: int


@dataclass(frozen=True)
class Backend:
    """One image flavour: how it is compiled, what it runs on, what it ships."""

    name: str
    title: str
    description: str
    template: str
    platforms: tuple[Platform, ...]
    cross_compile: bool
    smoke_without_gpu: bool
    tag_suffix: str
    builder_image: str
    runtime_image: str
    build_packages: tuple[str, ...]
    target_packages: tuple[str, ...]
    runtime_packages: tuple[str, ...]
    cmake_flags: tuple[tuple[str, str], ...]
    cpu_variants: str
    gpu_architectures: tuple[str, ...]
    gpu_architectures_flag: str | None

    @property
    def platform_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.platforms)

    @property
    def runs_target_code(self) -> bool:
        """Whether building it executes target-architecture code (QEMU or a native node).

        A cross-compiled backend with a scratch runtime only copies files into the target
        stage, so it builds for any platform on any builder, emulator or not.
        """
        return not self.cross_compile or self.runtime_image != "scratch"


@dataclass(frozen=True)
class BuildTarget:
    """One (backend, platform) cell of the matrix: one image manifest."""

    backend: Backend
    platform: Platform

    @property
    def key(self) -> str:
        """`cpu-amd64`: the name of its report and log files and its local tag's suffix."""
        return f"{self.backend.name}-{self.platform.arch}"


@dataclass(frozen=True)
class Matrix:
    default_backend: str
    runtime_user: RuntimeUser
    platforms: Mapping[str, Platform]
    cpu_variant_sets: Mapping[str, CpuVariantSet]
    common_cmake_flags: tuple[tuple[str, str], ...]
    backends: Mapping[str, Backend]

    def backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise UsageError(
                f"unknown backend {name!r}",
                f"valid backends: {', '.join(self.backends)}",
            ) from None

    def platform(self, text: str) -> Platform:
        """A platform by name (linux/arm64) or shorthand (arm64)."""
        name = normalize_platform(text)
        try:
            return self.platforms[name]
        except KeyError:
            valid = ", ".join(f"{p.name} ({p.arch})" for p in self.platforms.values())
            raise UsageError(f"unknown platform {text!r}", f"valid platforms: {valid}") from None

    def cpu_variant_set(self, name: str) -> CpuVariantSet:
        try:
            return self.cpu_variant_sets[name]
        except KeyError:
            raise UsageError(
                f"unknown CPU variant set {name!r}",
                f"valid sets: {', '.join(self.cpu_variant_sets)}",
            ) from None

    def targets(self, backends: Sequence[str], platforms: Sequence[str]) -> list[BuildTarget]:
        """Every (backend, platform) asked for, in the order given; all names checked first.

        A backend not built for a requested platform is a usage error naming the platforms it
        has: asking for `rocm` on arm64 is a mistake, not something to skip silently.
        """
        chosen_backends = [self.backend(name) for name in backends]
        chosen_platforms = [self.platform(name) for name in platforms]
        targets: list[BuildTarget] = []
        for backend in chosen_backends:
            for platform in chosen_platforms:
                if platform not in backend.platforms:
                    raise UsageError(
                        f"backend {backend.name!r} is not built for {platform.name}",
                        f"its platforms: {', '.join(backend.platform_names)}",
                    )
                targets.append(BuildTarget(backend, platform))
        return targets


def configure_flags(matrix: Matrix, backend: Backend) -> list[tuple[str, str]]:
    """The backend's CMake flags, in order: common, the backend's own, its GPU targets.

    The rendered Dockerfile and the host configure test take them from here, so the test
    configures exactly what the image compiles.
    """
    flags = [*matrix.common_cmake_flags, *backend.cmake_flags]
    if backend.gpu_architectures_flag:
        flags.append((backend.gpu_architectures_flag, ";".join(backend.gpu_architectures)))
    return flags


def host_platform() -> str:
    """This machine's platform as Docker names it: `linux/amd64`, `linux/arm64`."""
    machine = os.uname().machine.lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    return f"linux/{arch}"


def normalize_platform(text: str) -> str:
    """`arm64` -> `linux/arm64`; names with an OS pass through unchanged."""
    text = text.strip()
    return text if "/" in text else f"linux/{text}"


# --- parsing ---------------------------------------------------------------------------


def _get(data: Mapping[str, Any], key: str, kind: type, where: str, expected: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}' (expected {expected})")
    value = data[key]
    # bool is an int: a uid of `true` is a typo, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: key '{key}' is {type(value).__name__} {value!r}, expected {expected}"
        )
    return value


def _no_unknown(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}",
            f"valid keys: {', '.join(sorted(known))}",
        )


def _text(
    data: Mapping[str, Any],
    key: str,
    where: str,
    pattern: re.Pattern[str] | None = None,
    allow_empty: bool = False,
) -> str:
    value: str = _get(data, key, str, where, "a string")
    if not allow_empty and not value.strip():
        raise ConfigError(f"{where}: key '{key}' is empty")
    if pattern is not None and value and not pattern.match(value):
        raise ConfigError(f"{where}: key '{key}' is {value!r}, expected /{pattern.pattern}/")
    return value.strip() if key != "description" else " ".join(value.split())


def _str_list(
    data: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str] | None = None
) -> tuple[str, ...]:
    value = _get(data, key, list, where, "a list of strings")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or (pattern is not None and not pattern.match(item)):
            expected = f"strings matching /{pattern.pattern}/" if pattern else "strings"
            raise ConfigError(f"{where}: key '{key}' holds {item!r}, expected {expected}")
        if item in items:
            raise ConfigError(f"{where}: key '{key}' lists {item!r} twice")
        items.append(item)
    return tuple(items)


def _cmake_flags(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of CMake variable -> string value")
    flags: list[tuple[str, str]] = []
    for key, flag in value.items():
        if not isinstance(key, str) or not _CMAKE_KEY_RE.match(key):
            raise ConfigError(f"{where}: {key!r} is not a CMake variable name")
        # Quoted in YAML on purpose: a bare ON would arrive as the boolean True.
        if not isinstance(flag, str):
            raise ConfigError(
                f"{where}: {key} is {type(flag).__name__} {flag!r}, expected a quoted string "
                '(write "ON"/"OFF" in quotes: YAML reads bare ON as a boolean)'
            )
        flags.append((key, flag))
    return tuple(flags)


def _platforms(data: Any) -> dict[str, Platform]:
    if not isinstance(data, dict) or not data:
        raise ConfigError("matrix.yaml: key 'platforms' must be a non-empty mapping")
    platforms: dict[str, Platform] = {}
    for name, spec in data.items():
        where = f"matrix.yaml: platforms.{name}"
        if not isinstance(name, str) or not re.match(r"^linux/[a-z0-9]+$", name):
            raise ConfigError(f"{where}: expected a name such as linux/arm64")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        _no_unknown(spec, ("arch", "gnu_triplet", "cmake_processor"), where)
        arch = _text(spec, "arch", where, _NAME_RE)
        if arch != name.split("/", 1)[1]:
            raise ConfigError(f"{where}: arch {arch!r} does not match the platform name")
        platforms[name] = Platform(
            name=name,
            arch=arch,
            gnu_triplet=_text(spec, "gnu_triplet", where, re.compile(r"^[a-z0-9_]+-linux-gnu\w*$")),
            cmake_processor=_text(spec, "cmake_processor", where, re.compile(r"^[a-z0-9_]+$")),
        )
    return platforms


def _variant_sets(data: Any, platforms: Mapping[str, Platform]) -> dict[str, CpuVariantSet]:
    if not isinstance(data, dict) or not data:
        raise ConfigError("matrix.yaml: key 'cpu_variants' must be a non-empty mapping")
    arches = {p.arch for p in platforms.values()}
    sets: dict[str, CpuVariantSet] = {}
    for name, spec in data.items():
        where = f"matrix.yaml: cpu_variants.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"{where}: expected a lowercase name")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        _no_unknown(spec, ("cmake_flags",), where)
        per_arch = _get(spec, "cmake_flags", dict, where, "a mapping arch -> CMake flags")
        missing = sorted(arches - set(per_arch))
        if missing:
            raise ConfigError(f"{where}.cmake_flags: no flags for arch(es) {', '.join(missing)}")
        _no_unknown(per_arch, arches, f"{where}.cmake_flags")
        sets[name] = CpuVariantSet(
            name,
            {
                arch: _cmake_flags(flags, f"{where}.cmake_flags.{arch}")
                for arch, flags in per_arch.items()
            },
        )
    return sets


_BACKEND_KEYS = (
    "title", "description", "template", "platforms", "cross_compile", "smoke_without_gpu",
    "tag_suffix", "builder_image", "runtime_image", "build_packages", "target_packages",
    "runtime_packages", "cmake_flags", "cpu_variants", "gpu_architectures",
    "gpu_architectures_flag",
)  # fmt: skip


def _backend(
    name: str,
    spec: Any,
    platforms: Mapping[str, Platform],
    variant_sets: Mapping[str, CpuVariantSet],
) -> Backend:
    where = f"matrix.yaml: backends.{name}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}: backend names are lowercase letters, digits and dashes")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _no_unknown(spec, _BACKEND_KEYS, where)
    platform_names = _str_list(spec, "platforms", where)
    if not platform_names:
        raise ConfigError(f"{where}: key 'platforms' is empty")
    for platform_name in platform_names:
        if platform_name not in platforms:
            raise ConfigError(
                f"{where}: platform {platform_name!r} is not declared under 'platforms'",
                f"declared: {', '.join(platforms)}",
            )
    template = _text(spec, "template", where, re.compile(r"^[a-z0-9-]+\.Dockerfile\.j2$"))
    variants = _text(spec, "cpu_variants", where)
    if variants not in variant_sets:
        raise ConfigError(
            f"{where}: cpu_variants {variants!r} is not declared under 'cpu_variants'",
            f"declared: {', '.join(variant_sets)}",
        )
    gpu_architectures = _str_list(spec, "gpu_architectures", where, re.compile(r"^[0-9a-z]+$"))
    gpu_flag = spec.get("gpu_architectures_flag", "<missing>")
    if gpu_flag == "<missing>":
        raise ConfigError(f"{where}: missing key 'gpu_architectures_flag' (a CMake name or null)")
    if gpu_flag is not None and (
        not isinstance(gpu_flag, str) or not _CMAKE_KEY_RE.match(gpu_flag)
    ):
        raise ConfigError(f"{where}: gpu_architectures_flag {gpu_flag!r} is not a CMake name")
    if bool(gpu_architectures) != (gpu_flag is not None):
        raise ConfigError(
            f"{where}: gpu_architectures and gpu_architectures_flag go together "
            "(both set, or [] and null)"
        )
    runtime_image = _text(spec, "runtime_image", where)
    runtime_packages = _str_list(spec, "runtime_packages", where, _PACKAGE_RE)
    if runtime_image == "scratch" and runtime_packages:
        raise ConfigError(f"{where}: a scratch runtime cannot install runtime_packages")
    return Backend(
        name=name,
        title=_text(spec, "title", where),
        description=_text(spec, "description", where),
        template=template,
        platforms=tuple(platforms[p] for p in platform_names),
        cross_compile=_get(spec, "cross_compile", bool, where, "true or false"),
        smoke_without_gpu=_get(spec, "smoke_without_gpu", bool, where, "true or false"),
        tag_suffix=_text(spec, "tag_suffix", where, _NAME_RE, allow_empty=True),
        builder_image=_text(spec, "builder_image", where),
        runtime_image=runtime_image,
        build_packages=_str_list(spec, "build_packages", where, _PACKAGE_RE),
        target_packages=_str_list(spec, "target_packages", where, _PACKAGE_RE),
        runtime_packages=runtime_packages,
        cmake_flags=_cmake_flags(_get(spec, "cmake_flags", dict, where, "a mapping"),
                                 f"{where}.cmake_flags"),
        cpu_variants=variants,
        gpu_architectures=gpu_architectures,
        gpu_architectures_flag=gpu_flag,
    )  # fmt: skip


def parse_matrix(data: Any, where: str = "matrix.yaml") -> Matrix:
    """Validate a decoded matrix; every error names the key and what was expected."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level is {type(data).__name__}, expected a mapping")
    _no_unknown(
        data,
        ("default_backend", "runtime_user", "platforms", "cpu_variants", "common_cmake_flags",
         "backends"),
        where,
    )  # fmt: skip
    platforms = _platforms(data.get("platforms"))
    variant_sets = _variant_sets(data.get("cpu_variants"), platforms)
    user_spec = _get(data, "runtime_user", dict, where, "a mapping with name and uid")
    _no_unknown(user_spec, ("name", "uid"), f"{where}: runtime_user")
    user = RuntimeUser(
        _text(user_spec, "name", f"{where}: runtime_user", _USER_RE),
        _get(user_spec, "uid", int, f"{where}: runtime_user", "a non-zero integer uid"),
    )
    if user.uid <= 0:
        raise ConfigError(f"{where}: runtime_user.uid must be a non-root uid (> 0)")
    backends_spec = _get(data, "backends", dict, where, "a mapping of backend name -> spec")
    if not backends_spec:
        raise ConfigError(f"{where}: key 'backends' is empty")
    backends = {
        str(name): _backend(str(name), spec, platforms, variant_sets)
        for name, spec in backends_spec.items()
    }
    default = _text(data, "default_backend", where)
    if default not in backends:
        raise ConfigError(
            f"{where}: default_backend {default!r} is not a backend",
            f"backends: {', '.join(backends)}",
        )
    return Matrix(
        default_backend=default,
        runtime_user=user,
        platforms=platforms,
        cpu_variant_sets=variant_sets,
        common_cmake_flags=_cmake_flags(
            _get(data, "common_cmake_flags", dict, where, "a mapping"),
            f"{where}: common_cmake_flags",
        ),
        backends=backends,
    )


def load_matrix(path: Path = MATRIX_FILE) -> Matrix:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found", "restore it from the repository") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path.name} is not valid YAML{at}") from None
    return parse_matrix(data, path.name)
