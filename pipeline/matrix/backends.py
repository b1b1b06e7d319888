"""The backend x platform matrix as typed values: platforms, CPU variant sets, backends (how
each is compiled, what it ships, how it is smoke-tested), and the matrix that names them.

Names given on the command line (backend, platform, CPU variant set) are looked up here and
refused with the list of valid ones; a stage gets these objects, never the names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pipeline.core.errors import UsageError


@dataclass(frozen=True)
class TargetPlatform:
    """One platform images are built for, and what it means to the cross toolchain."""

    name: str  # linux/amd64
    arch: str  # amd64: Docker's TARGETARCH, Debian's architecture
    gnu_triplet: str  # x86_64-linux-gnu
    cmake_processor: str  # x86_64

    @property
    def oci(self) -> dict[str, str]:
        """The platform object of an OCI index entry."""
        os_name, architecture = self.name.split("/", 1)
        return {"architecture": architecture, "os": os_name}


@dataclass(frozen=True)
class CpuVariantSet:
    """A choice of ggml CPU kernels: configure flags per architecture."""

    name: str
    cmake_flags: Mapping[str, tuple[tuple[str, str], ...]]  # arch -> ((KEY, value), ...)
    host_only: bool = False  # compiled for the building machine's CPU: local, never released
    # arch -> ((cpuinfo flag, ggml option), ...): options the builder sets from /proc/cpuinfo
    cpuinfo_options: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # CMake targets compiled at -O1 instead of Release's -O3 (dockerfiles/image/quick-targets.cmake)
    quick_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Runtime:
    """The shipped stage: `scratch` (assembled from files on the build machine, no target code
    runs) or `distribution` (a base image plus packages, installed on the target platform)."""

    kind: str  # scratch | distribution
    image: str | None = None  # the distribution base; build arg RUNTIME_IMAGE overrides it
    packages: tuple[str, ...] = ()
    # scratch only: arch -> the Vulkan drivers carried, by the names of their ICD manifests
    # (/usr/share/vulkan/icd.d/<name>_icd.json, each with the driver library it names)
    vulkan_drivers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # scratch only: libraries loaded with dlopen (in no NEEDED list), carried with their closure
    dlopened: tuple[str, ...] = ()


RUNTIME_KINDS = ("scratch", "distribution")


@dataclass(frozen=True)
class SmokeTier:
    """One way of smoke-testing a backend's image: `no-gpu` runs on any machine, `gpu` where
    the GPU the backend is built for is visible (its containers get `--gpus all`, or the
    host's `devices`)."""

    name: str
    gpus: bool
    env: Mapping[str, str]  # environment of every smoke container of this tier
    # Regular expressions the server's log must match: where the model really runs. A GPU
    # image whose backend finds no device still answers every request from its CPU kernels.
    device_log: tuple[re.Pattern[str], ...]
    checks: tuple[str, ...] = ()  # checks this tier runs besides everyone's (by name)
    # Host device paths given to its containers (`docker run --device`: AMD's /dev/kfd and
    # /dev/dri); empty with `gpus`: NVIDIA's device request (`--gpus all`).
    devices: tuple[str, ...] = ()


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
    # Tiers an image built with a CPU variant set also needs (cpu, `all`: the cpus tier proves
    # the choice ggml makes between its kernel libraries; an image with one set has none).
    publish_requires_by_cpu_variants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def gpu_visible(self, root: Path = Path("/")) -> bool:
        """Whether the machine at `root` shows the GPU the gpu tier needs: its devices (AMD's
        /dev/kfd and /dev/dri), else an NVIDIA GPU (its driver's control device); False for a
        backend without a gpu tier."""
        tier = self.tiers.get("gpu")
        if tier is None:
            return False
        devices = tier.devices or ("/dev/nvidiactl",)
        return all((root / device.lstrip("/")).exists() for device in devices)

    @property
    def needs_gpu(self) -> bool:
        """Whether publishing it requires a tier that needs a GPU."""
        # The real tier (every backend's) runs where the device tier runs.
        return any(t in self.tiers and self.tiers[t].gpus for t in self.publish_requires)

    def required(
        self, gpu_runner: bool = True, cpu_variants: str | None = None
    ) -> tuple[str, ...] | None:
        """The tiers publish requires of an image built with the CPU variant set
        `cpu_variants`; None when, without a GPU runner, it must not publish."""
        tiers = self.publish_without_gpu
        if gpu_runner or not self.needs_gpu:
            tiers = self.publish_requires
        if tiers is None:
            return None
        extra = self.publish_requires_by_cpu_variants.get(cpu_variants or "", ())
        return (*tiers, *(t for t in extra if t not in tiers))

    def tier(self, backend: str, name: str) -> SmokeTier:
        """The tier `name` of `backend`; a UsageError listing its tiers when it has none."""
        if name not in self.tiers:
            raise UsageError(
                f"backend {backend} has no smoke tier {name!r}",
                f"its tiers: {', '.join(self.tiers)}, and real (every backend)",
            )
        return self.tiers[name]


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
class RocmRuntime:
    """What a ROCm image is built with: the GPU targets its rocBLAS has kernels for."""

    rocblas_architectures: tuple[str, ...]

    def unshipped(self, targets: Sequence[str]) -> list[str]:
        """Those of `targets` rocBLAS has no kernels for."""
        return [t for t in targets if t not in self.rocblas_architectures]


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
    rocm: RocmRuntime | None = None
    # Upstream's web UI (tools/ui), built in the `ui` stage and served at /.
    web_ui: bool = False
    # The name of its compiler-cache mount (per architecture, each bounded by CCACHE_MAXSIZE);
    # its own name unless it shares another backend's.
    compiler_cache: str = ""

    @property
    def platform_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.platforms)

    @property
    def compiles_ggml_cuda(self) -> bool:
        """Whether it compiles ggml's CUDA sources (CUDA, or HIP for ROCm), whose
        flash-attention kernels are the build arg CUDA_FLASH_ATTENTION."""
        flags = dict(self.cmake_flags)
        return "ON" in (flags.get("GGML_CUDA"), flags.get("GGML_HIP"))

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

    def targets(
        self, backends: Sequence[Backend], platforms: Sequence[TargetPlatform]
    ) -> list[BuildTarget]:
        """Every (backend, platform) asked for, in the order given.

        A backend not built for a requested platform is a usage error naming the platforms it
        has: asking for `rocm` on arm64 is a mistake, not something to skip silently.
        """
        targets: list[BuildTarget] = []
        for backend in backends:
            for platform in platforms:
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
