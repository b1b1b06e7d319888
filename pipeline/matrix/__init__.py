"""The backend x platform matrix (matrix.yaml) as typed data, read here key by key (every key
checked when the file is read, so a typo fails with its name before a build starts) into the
values of backends.py; the names a command line gives resolved against it (choose.py), the
backend this host's GPU calls for (hostgpu.py), and the Dockerfiles rendered from it
(dockerfile.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.datafile import load_yaml
from pipeline.core.fields import Fields
from pipeline.matrix.backends import (
    RUNTIME_KINDS,
    TOOLKIT_SOURCES,
    Backend,
    BackendSmoke,
    BuildTarget,
    CpuVariantSet,
    CudaRuntime,
    Matrix,
    RocmRuntime,
    Runtime,
    RuntimeUser,
    SmokeTier,
    TargetPlatform,
    configure_flags,
    host_platform,
    normalize_platform,
)
from pipeline.records import MODEL_TIERS

__all__ = [
    "MATRIX_FILE",
    "Backend",
    "BackendSmoke",
    "BuildTarget",
    "CpuVariantSet",
    "CudaRuntime",
    "Matrix",
    "Runtime",
    "RuntimeUser",
    "SmokeTier",
    "TargetPlatform",
    "configure_flags",
    "host_platform",
    "load_matrix",
    "normalize_platform",
    "parse_matrix",
]

MATRIX_FILE = Path(__file__).with_name("matrix.yaml")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_ICD_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")  # Mesa's ICD manifest names: intel_hasvk
_SONAME_RE = re.compile(r"^lib[A-Za-z0-9_+-]+\.so(\.[0-9]+)*$")  # libamd_comgr.so.3
_GFX_RE = re.compile(r"^gfx[0-9a-f]{3,4}$")  # an AMD GPU target: gfx1100
# npm pinned by version and the sha512 of its tarball, as corepack takes it.
_NPM_RE = re.compile(r"^\d+\.\d+\.\d+\+sha512\.[0-9a-f]{128}$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a CMake target name
_CMAKE_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Debian/Ubuntu package names (policy §5.6.1).
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")
_PLATFORM_RE = re.compile(r"^linux/[a-z0-9]+$")
# Images are named in Dockerfiles: one token, no white space.
_IMAGE_RE = re.compile(r"^[^\s]+$")

_TOP_KEYS = (
    "default_backend",
    "runtime_user",
    "platforms",
    "cpu_variants",
    "common_cmake_flags",
    "backends",
    "web_ui_builder_image",
    "web_ui_npm",
    "local_cpu_variants",
)
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
    "rocm",
    "web_ui",
    "compiler_cache",
)


def _cmake_flags(spec: Fields, key: str) -> tuple[tuple[str, str], ...]:
    flags = spec.sub(key, expected="a mapping of CMake variable -> string value")
    pairs: list[tuple[str, str]] = []
    for name, value in flags.data.items():
        if not isinstance(name, str) or not _CMAKE_KEY_RE.match(name):
            flags.fail(f"{name!r} is not a CMake variable name")
        # Quoted in YAML on purpose: a bare ON would arrive as the boolean True.
        if not isinstance(value, str):
            flags.fail(
                f"{name} is {type(value).__name__} {value!r}, expected a quoted string "
                '(write "ON"/"OFF" in quotes: YAML reads bare ON as a boolean)'
            )
        pairs.append((name, value))
    return tuple(pairs)


def _platforms(top: Fields) -> dict[str, TargetPlatform]:
    platforms: dict[str, TargetPlatform] = {}
    known = ("arch", "gnu_triplet", "cmake_processor")
    for name, spec in top.entries("platforms", known, name=_PLATFORM_RE):
        arch = spec.text("arch", _NAME_RE)
        if arch != name.split("/", 1)[1]:
            spec.fail(f"arch {arch!r} does not match the platform name")
        platforms[name] = TargetPlatform(
            name=name,
            arch=arch,
            gnu_triplet=spec.text("gnu_triplet", re.compile(r"^[a-z0-9_]+-linux-gnu\w*$")),
            cmake_processor=spec.text("cmake_processor", re.compile(r"^[a-z0-9_]+$")),
        )
    return platforms


def _variant_sets(top: Fields, arches: set[str]) -> dict[str, CpuVariantSet]:
    sets: dict[str, CpuVariantSet] = {}
    known = ("cmake_flags", "host_only", "cpuinfo_options", "quick_targets")
    for name, spec in top.entries("cpu_variants", known, name=_NAME_RE):
        host_only = spec.boolean("host_only", default=False)
        quick = spec.strings("quick_targets", _TARGET_RE, default=())
        if quick and not host_only:
            # A release's code is compiled as upstream compiles it.
            spec.fail("quick_targets: only a host_only set may compile at -O1")
        options: dict[str, tuple[tuple[str, str], ...]] = {}
        if spec.has("cpuinfo_options"):
            cpuinfo = spec.sub("cpuinfo_options", arches)
            options = {arch: tuple(cpuinfo.string_map(arch).items()) for arch in cpuinfo.data}
        per_arch = spec.sub("cmake_flags", arches, expected="a mapping arch -> CMake flags")
        missing = sorted(arches - set(per_arch.data))
        if missing:
            per_arch.fail(f"no flags for arch(es) {', '.join(missing)}")
        flags = {arch: _cmake_flags(per_arch, arch) for arch in per_arch.data}
        sets[name] = CpuVariantSet(name, flags, host_only, options, quick)
    return sets


def _runtime(spec: Fields, arches: set[str]) -> Runtime:
    runtime = spec.sub("runtime", expected="a mapping with kind (scratch or distribution)")
    kind = runtime.choice("kind", RUNTIME_KINDS)
    if kind == "scratch":
        runtime.no_unknown(("kind", "vulkan_drivers", "dlopened"))
        drivers: dict[str, tuple[str, ...]] = {}
        if runtime.has("vulkan_drivers"):
            per_arch = runtime.sub(
                "vulkan_drivers", arches, expected="a mapping arch -> ICD manifest names"
            )
            drivers = {arch: per_arch.strings(arch, _ICD_RE) for arch in per_arch.data}
        dlopened = runtime.strings("dlopened", _SONAME_RE, default=())
        return Runtime(kind, vulkan_drivers=drivers, dlopened=dlopened)
    runtime.no_unknown(("kind", "image", "packages"))
    return Runtime(kind, runtime.text("image", _IMAGE_RE), runtime.strings("packages", _PACKAGE_RE))


def _tier(name: str, spec: Fields) -> SmokeTier:
    patterns: list[re.Pattern[str]] = []
    for pattern in spec.strings("device_log"):
        try:
            patterns.append(re.compile(pattern, re.MULTILINE))
        except re.error as exc:
            spec.fail(f"device_log /{pattern}/ is not a regex: {exc}")
    if not patterns:
        spec.fail("device_log is empty (what proves the backend serves?)")
    devices = spec.strings("devices", re.compile(r"^/dev/[A-Za-z0-9/_-]+$"), default=())
    if devices and not spec.boolean("gpus", default=False):
        spec.fail("devices are a GPU's: a tier with devices needs gpus: true")
    return SmokeTier(
        name,
        spec.boolean("gpus", default=False),
        spec.string_map("env", default={}),
        tuple(patterns),
        spec.strings("checks", _NAME_RE, default=()),
        devices,
    )


def _smoke(backend: Fields, variant_sets: Mapping[str, CpuVariantSet]) -> BackendSmoke:
    keys = (
        *("tiers", "timing_scale", "host_libraries"),
        *("publish_requires", "publish_without_gpu", "publish_requires_by_cpu_variants"),
    )
    spec = backend.sub("smoke", keys, expected="a mapping (tiers, publish_requires, ...)")
    known = ("gpus", "env", "device_log", "checks", "devices")
    tiers = {
        name: _tier(name, tier) for name, tier in spec.entries("tiers", known, non_empty=False)
    }
    if "no-gpu" not in tiers:
        spec.fail("every backend needs a `no-gpu` tier (what runs anywhere)")
    requires = spec.strings("publish_requires")
    without_gpu = None
    if spec.raw("publish_without_gpu", None) is not None:
        without_gpu = spec.strings("publish_without_gpu")
    for tier in (*requires, *(without_gpu or ())):
        if tier not in tiers and tier not in MODEL_TIERS:
            spec.fail(f"publish names tier {tier!r}, not one of its tiers")
    if without_gpu and any(t in tiers and tiers[t].gpus for t in without_gpu):
        spec.fail("publish_without_gpu names a tier that needs a GPU")
    by_variants: dict[str, tuple[str, ...]] = {}
    if spec.has("publish_requires_by_cpu_variants"):
        extra = spec.sub("publish_requires_by_cpu_variants", expected="a mapping of sets to tiers")
        for name in extra.data:
            if name not in variant_sets:
                extra.fail(
                    f"{name!r} is not a CPU variant set",
                    f"declared under 'cpu_variants': {', '.join(variant_sets)}",
                )
            by_variants[name] = extra.strings(name)
            for tier in by_variants[name]:
                if tier not in tiers and tier not in MODEL_TIERS:
                    extra.fail(f"{name} names tier {tier!r}, not one of its tiers")
    return BackendSmoke(
        tiers,
        spec.number("timing_scale", above=0, default=1.0),
        spec.strings("host_libraries", default=()),
        requires,
        without_gpu,
        by_variants,
    )


def _cuda(backend: Fields) -> CudaRuntime | None:
    if backend.raw("cuda", None) is None:
        return None
    spec = backend.sub("cuda", ("version", "min_driver", "instead", "toolkit"))
    return CudaRuntime(
        spec.text("version", re.compile(r"^\d+\.\d+$")),
        spec.text("min_driver", re.compile(r"^\d+(\.\d+)*$")),
        spec.optional_text("instead", _NAME_RE),
        spec.choice("toolkit", TOOLKIT_SOURCES),
    )


def _rocm(backend: Fields, gpu_architectures: tuple[str, ...]) -> RocmRuntime | None:
    if backend.raw("rocm", None) is None:
        return None
    spec = backend.sub("rocm", ("rocblas_architectures",))
    rocm = RocmRuntime(spec.strings("rocblas_architectures", _GFX_RE))
    missing = rocm.unshipped(gpu_architectures)
    if missing:
        shipped = ", ".join(rocm.rocblas_architectures)
        backend.fail(
            f"gpu_architectures names {', '.join(missing)}, for which rocBLAS has no kernels",
            f"rocm.rocblas_architectures (what Debian's rocBLAS ships): {shipped}",
        )
    return rocm


def _backend(
    name: str,
    spec: Fields,
    platforms: Mapping[str, TargetPlatform],
    variant_sets: Mapping[str, CpuVariantSet],
) -> Backend:
    platform_names = spec.strings("platforms")
    if not platform_names:
        spec.fail("key 'platforms' is empty")
    for platform_name in platform_names:
        if platform_name not in platforms:
            spec.fail(
                f"platform {platform_name!r} is not declared under 'platforms'",
                f"declared: {', '.join(platforms)}",
            )
    variants = spec.text("cpu_variants")
    if variants not in variant_sets:
        spec.fail(
            f"cpu_variants {variants!r} is not declared under 'cpu_variants'",
            f"declared: {', '.join(variant_sets)}",
        )
    gpu_architectures = spec.strings("gpu_architectures", re.compile(r"^[0-9a-z]+$"))
    gpu_flag = spec.raw("gpu_architectures_flag", expected="a CMake name or null")
    if gpu_flag is not None and (
        not isinstance(gpu_flag, str) or not _CMAKE_KEY_RE.match(gpu_flag)
    ):
        spec.wrong("gpu_architectures_flag", "a CMake variable name or null")
    if bool(gpu_architectures) != (gpu_flag is not None):
        spec.fail(
            "gpu_architectures and gpu_architectures_flag go together (both set, or [] and null)"
        )
    return Backend(
        name=name,
        title=spec.text("title"),
        description=spec.text("description"),
        template=spec.text("template", re.compile(r"^[a-z0-9-]+\.Dockerfile\.j2$")),
        platforms=tuple(platforms[p] for p in platform_names),
        cross_compile=spec.boolean("cross_compile"),
        tag_suffix=spec.text("tag_suffix", _NAME_RE, allow_empty=True),
        builder_image=spec.text("builder_image", _IMAGE_RE),
        runtime=_runtime(spec, {platforms[p].arch for p in platform_names}),
        build_packages=spec.strings("build_packages", _PACKAGE_RE),
        target_packages=spec.strings("target_packages", _PACKAGE_RE),
        cmake_flags=_cmake_flags(spec, "cmake_flags"),
        cpu_variants=variants,
        gpu_architectures=gpu_architectures,
        gpu_architectures_flag=gpu_flag,
        smoke=_smoke(spec, variant_sets),
        cuda=_cuda(spec),
        rocm=_rocm(spec, gpu_architectures),
        web_ui=spec.boolean("web_ui", default=False),
        compiler_cache=spec.text("compiler_cache", _NAME_RE, default=name),
    )


def _check_tag_suffixes(top: Fields, backends: Mapping[str, Backend]) -> None:
    """Two backends with one tag suffix would push to each other's tags."""
    owners: dict[str, str] = {}
    for backend in backends.values():
        if backend.tag_suffix in owners:
            top.fail(
                f"backends {owners[backend.tag_suffix]} and {backend.name} share the tag suffix "
                f"{backend.tag_suffix!r}: the second would overwrite the first's tags",
                "give each backend a tag_suffix of its own",
            )
        owners[backend.tag_suffix] = backend.name


def parse_matrix(data: object, where: str = "matrix.yaml") -> Matrix:
    """Validate a decoded matrix; every error names the key and what was expected."""
    top = Fields(data, where, _TOP_KEYS)
    platforms = _platforms(top)
    variant_sets = _variant_sets(top, {p.arch for p in platforms.values()})
    user_spec = top.sub("runtime_user", ("name", "uid"), expected="a mapping with name and uid")
    user = RuntimeUser(user_spec.text("name", _USER_RE), user_spec.integer("uid"))
    if user.uid <= 0:
        user_spec.fail("uid must be a non-root uid (> 0)")
    backends = {
        name: _backend(name, spec, platforms, variant_sets)
        for name, spec in top.entries("backends", _BACKEND_KEYS, name=_NAME_RE)
    }
    for backend in backends.values():
        if backend.cuda and backend.cuda.instead and backend.cuda.instead not in backends:
            top.fail(
                f"backends.{backend.name}.cuda.instead {backend.cuda.instead!r} is not a backend"
            )
    ui_image = top.text("web_ui_builder_image", _IMAGE_RE, default=None)
    npm = top.text("web_ui_npm", _NPM_RE, default=None)
    if (ui_image is None or npm is None) and any(b.web_ui for b in backends.values()):
        top.fail("a backend has web_ui: true but web_ui_builder_image or web_ui_npm is not set")
    local = top.text("local_cpu_variants", default=None)
    if local is not None and local not in variant_sets:
        top.fail(f"local_cpu_variants {local!r} is not a set under cpu_variants")
    default = top.text("default_backend")
    if default not in backends:
        top.fail(
            f"default_backend {default!r} is not a backend", f"backends: {', '.join(backends)}"
        )
    _check_tag_suffixes(top, backends)
    for backend in backends.values():
        if backend.compiler_cache not in backends:
            top.fail(
                f"backends.{backend.name}: compiler_cache {backend.compiler_cache!r} is not a "
                "backend (it names the backend whose compiler cache this one shares)",
                f"backends: {', '.join(backends)}",
            )
    return Matrix(
        default_backend=default,
        runtime_user=user,
        platforms=platforms,
        cpu_variant_sets=variant_sets,
        common_cmake_flags=_cmake_flags(top, "common_cmake_flags"),
        backends=backends,
        web_ui_builder_image=ui_image,
        web_ui_npm=npm,
        local_cpu_variants=local,
    )


def load_matrix(path: Path = MATRIX_FILE) -> Matrix:
    return parse_matrix(load_yaml(path), path.name)
