"""NVIDIA's CUDA wheels for a `toolkit: wheels` backend (cuda-wheels.yaml, beside this file):
fetched on the build machine, checked against their pinned sha256, and laid out as the named build
context `cuda-toolkit` (one directory per target architecture), which the builder unpacks into
/usr/local/cuda.

Fetched here rather than in a build step: a build step reaches no package index through the
lab's TLS-intercepting proxy (lab.md §9), and a context of pinned files keeps the build
hermetic (pipeline/core/pypi.py fetches them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.datafile import load_yaml
from pipeline.core.errors import BuildError
from pipeline.core.fields import Fields
from pipeline.core.pypi import Pin, cache_dir, pip_download, sha256_of
from pipeline.matrix import Backend, TargetPlatform

WHEELS_FILE = Path(__file__).with_name("cuda-wheels.yaml")
TOOLKIT_CONTEXT = "cuda-toolkit"
# The platform tags NVIDIA's wheels carry, per Docker architecture.
PIP_PLATFORMS = {
    "amd64": ("manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"),
    "arm64": ("manylinux2014_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64"),
}
FETCH_HINT = (
    "check that this machine reaches the Python package index (pip's own settings apply), "
    "or put the files of pipeline/build/cuda-wheels.yaml into the wheel cache by hand"
)


def load_wheels(backend: str, arch: str, path: Path = WHEELS_FILE) -> list[Pin]:
    top = Fields(load_yaml(path), path.name)
    per_arch = top.sub(backend, expected="a mapping of architectures to wheels")
    wheels = []
    for entry in per_arch.items(arch, "wheel"):
        entry.no_unknown(Pin.KEYS)
        wheels.append(Pin.read(entry))
    return wheels


def toolkit_context(backend: Backend, platforms: Sequence[TargetPlatform], directory: Path) -> Path:
    """`directory`/<arch>/ holding the backend's pinned wheels for each platform (hard links
    into the cache, checked against their sha256); the directory."""
    shutil.rmtree(directory, ignore_errors=True)
    cache = cache_dir("wheels")
    for platform in platforms:
        wheels = load_wheels(backend.name, platform.arch)
        missing = [w for w in wheels if not (cache / w.file).is_file()]
        if missing:
            what = f"NVIDIA's CUDA wheels for {platform.arch}"
            pip_download(missing, cache, BuildError, what, FETCH_HINT, PIP_PLATFORMS[platform.arch])
        target = directory / platform.arch
        target.mkdir(parents=True)
        for wheel in wheels:
            cached = cache / wheel.file
            if not cached.is_file() or sha256_of(cached) != wheel.sha256:
                cached.unlink(missing_ok=True)  # a corrupt or foreign file: fetched anew next time
                raise BuildError(
                    f"{wheel.file}: not the file pipeline/build/cuda-wheels.yaml pins (sha256)",
                    "run the build again to fetch it anew",
                )
            try:
                os.link(cached, target / wheel.file)
            except OSError:  # another file system
                shutil.copy2(cached, target / wheel.file)
    return directory
