"""The backend x platform matrix (pipeline/matrix/matrix.yaml), loaded into typed records.

Every key is checked when the file is read, so a typo fails with the key's name before a
build starts; names given on the command line (backend, platform, CPU variant set) are
checked against it and rejected with the list of valid ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.config import load_yaml
from pipeline.core.errors import ConfigError, UsageError
from pipeline.core.fields import field_of, no_unknown_keys, strings_of, text_of

MATRIX_FILE = Path(__file__).with_name("matrix.yaml")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# npm pinned by version and the sha512 of its tarball, as corepack takes it.
_NPM_RE = re.compile(r"^\d+\.\d+\.\d+\+sha512\.[0-9a-f]{128}$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a CMake target name
_CMAKE_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Debian/Ubuntu package names (policy §5.6.1).
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")


@dataclass(frozen=True)
class TargetPlatform:
    """One platform images are built for, and what it means to the cross toolchain."""

    name: str  # linux/amd64
    arch: str  # amd64: Docker's TARGETARCH, Debian's architecture
    gnu_triplet: str  # x86_64-linux-gnu
    cmake_processor: str  # x86_64


@dataclass(frozen=True)
class CpuVariantSet:
    """A choice of ggml CPU kernels: configure flags per architecture."""

    name: str
    cmake_flags: Mapping[str, tuple[tuple[str, str], ...]]  # arch -> ((KEY, value), ...)
    host_only: bool = False  # compiled for the building machine's CPU: local, never released
    # arch -> ((cpuinfo flag, ggml option), ...): options the builder sets from /proc/cpuinfo
    cpuinfo_options: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # CMake targets compiled at -O1 instead of Release's -O3 (dockerfiles/quick-targets.cmake)
    quick_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Runtime:
    """The shipped stage: `scratch` (assembled from files on the build machine, no target code
    runs) or `distribution` (a base image plus packages, installed on the target platform)."""

    kind: str  # scratch | distribution
    image: str | None = None  # the distribution base; build arg RUNTIME_IMAGE overrides it
    packages: tuple[str, ...] = ()


RUNTIME_KINDS = ("scratch", "distribution")


@dataclass(frozen=True)
class SmokeTier:
    """One way of smoke-testing a backend's image: `no-gpu` runs on any machine, `gpu` where
    the GPU the backend is built for is visible (its containers get `--gpus all`)."""

    name: str
    gpus: bool
    env: Mapping[str, str]  # environment of every smoke container of this tier
    # Regular expressions the server's log must match: where the model really runs. A GPU
    # image whose backend finds no device still answers every request from its CPU kernels.
    device_log: tuple[re.Pattern[str], ...]
    checks: tuple[str, ...] = ()  # checks this tier runs besides everyone's (by name)


@dataclass(frozen=True)
class BackendSmoke:
    """How a backend's images are smoke-tested, and which tiers publishing requires."""

    tiers: Mapping[str, SmokeTier]
    timing_scale: float  # a factor on smoke.yaml's timing bounds (lavapipe compiles shaders)
    # NEEDED libraries the host provides at run time (the NVIDIA driver's libcuda.so.1): left
    # out of the library-closure check.
    host_libraries: tuple[str, ...]
    publish_requires: tuple[str, ...]  # tiers that must have passed for each digest
    # What publish accepts when the release has no GPU runner; None: nothing less.
    publish_without_gpu: tuple[str, ...] | None

    @property
    def needs_gpu(self) -> bool:
        """Whether publishing it requires a tier that needs a GPU."""
        return any(self.tiers[t].gpus for t in self.publish_requires)

    def required(self, gpu_runner: bool = True) -> tuple[str, ...] | None:
        """The tiers publish requires; None when, without a GPU runner, it must not publish."""
        if gpu_runner or not self.needs_gpu:
            return self.publish_requires
        return self.publish_without_gpu


@dataclass(frozen=True)
class CudaRuntime:
    """What a CUDA image needs of its host, for the labels, NVIDIA's container conventions and
    the entrypoint's driver check."""

    version: str  # the CUDA release the image is built with: 13.0
    min_driver: str  # the oldest Linux driver that runs it (NVIDIA's compatibility table)
    instead: str | None  # the backend whose tags to use on older drivers (cuda13 -> cuda)
    toolkit: str  # image (the builder image carries it) | wheels (NVIDIA's PyPI wheels)

    @property
    def require(self) -> str:
        """NVIDIA_REQUIRE_CUDA: the container toolkit refuses a driver below this CUDA."""
        return f"cuda>={self.version}"


TOOLKIT_SOURCES = ("image", "wheels")


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
    platforms: tuple[TargetPlatform, ...]
    cross_compile: bool
    tag_suffix: str
    builder_image: str
    runtime: Runtime
    build_packages: tuple[str, ...]
    target_packages: tuple[str, ...]
    cmake_flags: tuple[tuple[str, str], ...]
    cpu_variants: str
    gpu_architectures: tuple[str, ...]
    gpu_architectures_flag: str | None
    smoke: BackendSmoke
    cuda: CudaRuntime | None = None
    # Upstream's web UI (tools/ui), built in the `ui` stage and served at /.
    web_ui: bool = False

    @property
    def platform_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.platforms)

    @property
    def runs_target_code(self) -> bool:
        """Whether building it executes target-architecture code (QEMU or a native node).

        A cross-compiled backend with a scratch runtime only copies files into the target
        stage, so it builds for any platform on any builder, emulator or not.
        """
        return not self.cross_compile or self.runtime.kind != "scratch"


@dataclass(frozen=True)
class BuildTarget:
    """One (backend, platform) cell of the matrix: one image manifest."""

    backend: Backend
    platform: TargetPlatform

    @property
    def key(self) -> str:
        """`cpu-amd64`: the name of its report and log files and its local tag's suffix."""
        return f"{self.backend.name}-{self.platform.arch}"


@dataclass(frozen=True)
class Matrix:
    default_backend: str
    runtime_user: RuntimeUser
    platforms: Mapping[str, TargetPlatform]
    cpu_variant_sets: Mapping[str, CpuVariantSet]
    common_cmake_flags: tuple[tuple[str, str], ...]
    backends: Mapping[str, Backend]
    # Where the web UI is built (Node.js from its packages), on the build machine, and the npm
    # it builds with ("<version>+sha512.<hex of the tarball>", fetched and checked by corepack).
    web_ui_builder_image: str | None = None
    web_ui_npm: str | None = None
    # What a local --load build compiles when not told (None: each backend's own set).
    local_cpu_variants: str | None = None

    def backend(self, name: str) -> Backend:
        return _named(self.backends, name, "backend", ", ".join(self.backends))

    def platform(self, text: str) -> TargetPlatform:
        """A platform by name (linux/arm64) or shorthand (arm64)."""
        valid = ", ".join(f"{p.name} ({p.arch})" for p in self.platforms.values())
        return _named(self.platforms, normalize_platform(text), "platform", valid, shown=text)

    def cpu_variant_set(self, name: str) -> CpuVariantSet:
        return _named(
            self.cpu_variant_sets, name, "CPU variant set", ", ".join(self.cpu_variant_sets)
        )

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


Named = TypeVar("Named")


def _named(
    items: Mapping[str, Named], name: str, what: str, valid: str, shown: str | None = None
) -> Named:
    """`items[name]`, or the UsageError naming what was asked and what is valid."""
    try:
        return items[name]
    except KeyError:
        # "valid sets" for a CPU variant set: the last word is enough.
        raise UsageError(
            f"unknown {what} {shown or name!r}", f"valid {what.split()[-1]}s: {valid}"
        ) from None


def configure_flags(
    matrix: Matrix, backend: Backend, *, gpu_architectures: bool = True
) -> list[tuple[str, str]]:
    """The backend's CMake flags, in order: common, the backend's own, its GPU targets (which
    the rendered Dockerfile takes from its build arg GPU_ARCHITECTURES instead).

    The rendered Dockerfile and the host configure test take them from here, so the test
    configures exactly what the image compiles.
    """
    flags = [*matrix.common_cmake_flags, *backend.cmake_flags]
    if backend.gpu_architectures_flag and gpu_architectures:
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


def _platforms(data: Any) -> dict[str, TargetPlatform]:
    if not isinstance(data, dict) or not data:
        raise ConfigError("matrix.yaml: key 'platforms' must be a non-empty mapping")
    platforms: dict[str, TargetPlatform] = {}
    for name, spec in data.items():
        where = f"matrix.yaml: platforms.{name}"
        if not isinstance(name, str) or not re.match(r"^linux/[a-z0-9]+$", name):
            raise ConfigError(f"{where}: expected a name such as linux/arm64")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        no_unknown_keys(spec, ("arch", "gnu_triplet", "cmake_processor"), where)
        arch = text_of(spec, "arch", where, _NAME_RE)
        if arch != name.split("/", 1)[1]:
            raise ConfigError(f"{where}: arch {arch!r} does not match the platform name")
        platforms[name] = TargetPlatform(
            name=name,
            arch=arch,
            gnu_triplet=text_of(
                spec, "gnu_triplet", where, re.compile(r"^[a-z0-9_]+-linux-gnu\w*$")
            ),
            cmake_processor=text_of(spec, "cmake_processor", where, re.compile(r"^[a-z0-9_]+$")),
        )
    return platforms


def _variant_sets(data: Any, platforms: Mapping[str, TargetPlatform]) -> dict[str, CpuVariantSet]:
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
        no_unknown_keys(
            spec, ("cmake_flags", "host_only", "cpuinfo_options", "quick_targets"), where
        )
        cpuinfo = spec.get("cpuinfo_options", {})
        if not isinstance(cpuinfo, dict) or not all(
            isinstance(v, dict) and all(isinstance(o, str) for o in v.values())
            for v in cpuinfo.values()
        ):
            raise ConfigError(f"{where}.cpuinfo_options: expected arch -> {{cpuinfo flag: option}}")
        no_unknown_keys(cpuinfo, arches, f"{where}.cpuinfo_options")
        host_only = spec.get("host_only", False)
        if not isinstance(host_only, bool):
            raise ConfigError(f"{where}.host_only: expected true or false")
        quick = (
            strings_of(spec, "quick_targets", where, _TARGET_RE) if "quick_targets" in spec else ()
        )
        if quick and not host_only:
            # A release's code is compiled as upstream compiles it.
            raise ConfigError(f"{where}.quick_targets: only a host_only set may compile at -O1")
        per_arch = field_of(spec, "cmake_flags", dict, where, "a mapping arch -> CMake flags")
        missing = sorted(arches - set(per_arch))
        if missing:
            raise ConfigError(f"{where}.cmake_flags: no flags for arch(es) {', '.join(missing)}")
        no_unknown_keys(per_arch, arches, f"{where}.cmake_flags")
        sets[name] = CpuVariantSet(
            name,
            {
                arch: _cmake_flags(flags, f"{where}.cmake_flags.{arch}")
                for arch, flags in per_arch.items()
            },
            host_only,
            {arch: tuple((str(f), str(o)) for f, o in m.items()) for arch, m in cpuinfo.items()},
            quick,
        )
    return sets


_BACKEND_KEYS = (
    "title",
    "description",
    "template",
    "platforms",
    "cross_compile",
    "tag_suffix",
    "builder_image",
    "runtime",
    "build_packages",
    "target_packages",
    "cmake_flags",
    "cpu_variants",
    "gpu_architectures",
    "gpu_architectures_flag",
    "smoke",
    "cuda",
    "web_ui",
)


def _runtime(spec: Any, where: str) -> Runtime:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with kind (scratch or distribution)")
    kind = text_of(spec, "kind", where)
    if kind not in RUNTIME_KINDS:
        raise ConfigError(f"{where}: kind {kind!r}, expected one of {', '.join(RUNTIME_KINDS)}")
    if kind == "scratch":
        no_unknown_keys(spec, ("kind",), where)
        return Runtime(kind)
    no_unknown_keys(spec, ("kind", "image", "packages"), where)
    return Runtime(
        kind, text_of(spec, "image", where), strings_of(spec, "packages", where, _PACKAGE_RE)
    )


def _patterns(spec: Mapping[str, Any], where: str) -> tuple[re.Pattern[str], ...]:
    patterns: list[re.Pattern[str]] = []
    for pattern in strings_of(spec, "device_log", where):
        try:
            patterns.append(re.compile(pattern, re.MULTILINE))
        except re.error as exc:
            raise ConfigError(f"{where}: device_log /{pattern}/ is not a regex: {exc}") from None
    if not patterns:
        raise ConfigError(f"{where}: device_log is empty (what proves the backend serves?)")
    return tuple(patterns)


def _tier(name: str, spec: Any, where: str) -> SmokeTier:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (gpus, env, device_log, checks)")
    no_unknown_keys(spec, ("gpus", "env", "device_log", "checks"), where)
    env = spec.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ConfigError(f"{where}: env must map names to quoted strings")
    gpus = spec.get("gpus", False)
    if not isinstance(gpus, bool):
        raise ConfigError(f"{where}: gpus {gpus!r}, expected true or false")
    checks = strings_of(spec, "checks", where, _NAME_RE) if "checks" in spec else ()
    return SmokeTier(name, gpus, dict(env), _patterns(spec, where), checks)


def _smoke(spec: Any, where: str) -> BackendSmoke:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (tiers, publish_requires, ...)")
    keys = ("tiers", "timing_scale", "host_libraries", "publish_requires", "publish_without_gpu")
    no_unknown_keys(spec, keys, where)
    tiers_spec = field_of(spec, "tiers", dict, where, "a mapping of tier name -> spec")
    tiers = {str(n): _tier(str(n), t, f"{where}.tiers.{n}") for n, t in tiers_spec.items()}
    if "no-gpu" not in tiers:
        raise ConfigError(f"{where}: every backend needs a `no-gpu` tier (what runs anywhere)")
    scale = spec.get("timing_scale", 1)
    if not isinstance(scale, int | float) or isinstance(scale, bool) or scale <= 0:
        raise ConfigError(f"{where}: timing_scale {scale!r}, expected a positive number")
    host_libraries = strings_of(spec, "host_libraries", where) if "host_libraries" in spec else ()
    requires = strings_of(spec, "publish_requires", where)
    without = spec.get("publish_without_gpu")
    without_gpu = None if without is None else strings_of(spec, "publish_without_gpu", where)
    for tier in (*requires, *(without_gpu or ())):
        if tier not in tiers:
            raise ConfigError(f"{where}: publish names tier {tier!r}, not one of its tiers")
    if without_gpu and any(tiers[t].gpus for t in without_gpu):
        raise ConfigError(f"{where}: publish_without_gpu names a tier that needs a GPU")
    return BackendSmoke(tiers, float(scale), host_libraries, requires, without_gpu)


def _cuda(spec: Any, where: str) -> CudaRuntime | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping (version, min_driver, instead, toolkit)")
    no_unknown_keys(spec, ("version", "min_driver", "instead", "toolkit"), where)
    version = text_of(spec, "version", where, re.compile(r"^\d+\.\d+$"))
    driver = text_of(spec, "min_driver", where, re.compile(r"^\d+(\.\d+)*$"))
    toolkit = text_of(spec, "toolkit", where)
    if toolkit not in TOOLKIT_SOURCES:
        raise ConfigError(f"{where}: toolkit {toolkit!r}, expected one of {TOOLKIT_SOURCES}")
    instead = spec.get("instead")
    if instead is not None and not isinstance(instead, str):
        raise ConfigError(f"{where}: instead {instead!r}, expected a backend name or null")
    return CudaRuntime(version, driver, instead, toolkit)


def _backend(
    name: str,
    spec: Any,
    platforms: Mapping[str, TargetPlatform],
    variant_sets: Mapping[str, CpuVariantSet],
) -> Backend:
    where = f"matrix.yaml: backends.{name}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}: backend names are lowercase letters, digits and dashes")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping")
    no_unknown_keys(spec, _BACKEND_KEYS, where)
    platform_names = strings_of(spec, "platforms", where)
    if not platform_names:
        raise ConfigError(f"{where}: key 'platforms' is empty")
    for platform_name in platform_names:
        if platform_name not in platforms:
            raise ConfigError(
                f"{where}: platform {platform_name!r} is not declared under 'platforms'",
                f"declared: {', '.join(platforms)}",
            )
    template = text_of(spec, "template", where, re.compile(r"^[a-z0-9-]+\.Dockerfile\.j2$"))
    variants = text_of(spec, "cpu_variants", where)
    if variants not in variant_sets:
        raise ConfigError(
            f"{where}: cpu_variants {variants!r} is not declared under 'cpu_variants'",
            f"declared: {', '.join(variant_sets)}",
        )
    gpu_architectures = strings_of(spec, "gpu_architectures", where, re.compile(r"^[0-9a-z]+$"))
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
    return Backend(
        name=name,
        title=text_of(spec, "title", where),
        description=text_of(spec, "description", where),
        template=template,
        platforms=tuple(platforms[p] for p in platform_names),
        cross_compile=field_of(spec, "cross_compile", bool, where, "true or false"),
        tag_suffix=text_of(spec, "tag_suffix", where, _NAME_RE, allow_empty=True),
        builder_image=text_of(spec, "builder_image", where),
        runtime=_runtime(spec.get("runtime"), f"{where}.runtime"),
        build_packages=strings_of(spec, "build_packages", where, _PACKAGE_RE),
        target_packages=strings_of(spec, "target_packages", where, _PACKAGE_RE),
        cmake_flags=_cmake_flags(
            field_of(spec, "cmake_flags", dict, where, "a mapping"), f"{where}.cmake_flags"
        ),
        cpu_variants=variants,
        gpu_architectures=gpu_architectures,
        gpu_architectures_flag=gpu_flag,
        smoke=_smoke(spec.get("smoke"), f"{where}.smoke"),
        cuda=_cuda(spec.get("cuda"), f"{where}.cuda"),
        web_ui=field_of(spec, "web_ui", bool, where, "true or false")
        if "web_ui" in spec
        else False,
    )


def parse_matrix(data: Any, where: str = "matrix.yaml") -> Matrix:
    """Validate a decoded matrix; every error names the key and what was expected."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level is {type(data).__name__}, expected a mapping")
    no_unknown_keys(
        data,
        (
            "default_backend",
            "runtime_user",
            "platforms",
            "cpu_variants",
            "common_cmake_flags",
            "backends",
            "web_ui_builder_image",
            "web_ui_npm",
            "local_cpu_variants",
        ),
        where,
    )
    platforms = _platforms(data.get("platforms"))
    variant_sets = _variant_sets(data.get("cpu_variants"), platforms)
    user_spec = field_of(data, "runtime_user", dict, where, "a mapping with name and uid")
    no_unknown_keys(user_spec, ("name", "uid"), f"{where}: runtime_user")
    user = RuntimeUser(
        text_of(user_spec, "name", f"{where}: runtime_user", _USER_RE),
        field_of(user_spec, "uid", int, f"{where}: runtime_user", "a non-zero integer uid"),
    )
    if user.uid <= 0:
        raise ConfigError(f"{where}: runtime_user.uid must be a non-root uid (> 0)")
    backends_spec = field_of(data, "backends", dict, where, "a mapping of backend name -> spec")
    if not backends_spec:
        raise ConfigError(f"{where}: key 'backends' is empty")
    backends = {
        str(name): _backend(str(name), spec, platforms, variant_sets)
        for name, spec in backends_spec.items()
    }
    for backend in backends.values():
        if backend.cuda and backend.cuda.instead and backend.cuda.instead not in backends:
            raise ConfigError(
                f"{where}: backends.{backend.name}.cuda.instead {backend.cuda.instead!r} "
                "is not a backend"
            )
    ui_image = (
        text_of(data, "web_ui_builder_image", where) if "web_ui_builder_image" in data else None
    )
    npm = text_of(data, "web_ui_npm", where, _NPM_RE) if "web_ui_npm" in data else None
    if (ui_image is None or npm is None) and any(b.web_ui for b in backends.values()):
        raise ConfigError(
            f"{where}: a backend has web_ui: true but web_ui_builder_image or web_ui_npm is not set"
        )
    local = text_of(data, "local_cpu_variants", where) if "local_cpu_variants" in data else None
    if local is not None and local not in variant_sets:
        raise ConfigError(f"{where}: local_cpu_variants {local!r} is not a set under cpu_variants")
    default = text_of(data, "default_backend", where)
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
            field_of(data, "common_cmake_flags", dict, where, "a mapping"),
            f"{where}: common_cmake_flags",
        ),
        backends=backends,
        web_ui_builder_image=ui_image,
        web_ui_npm=npm,
        local_cpu_variants=local,
    )


def load_matrix(path: Path = MATRIX_FILE) -> Matrix:
    return parse_matrix(load_yaml(path), path.name)
