"""`recommend`: the largest preset of a task whose weights and KV cache fit what this host has
for them (the GPU's memory where `--backend auto` finds one that says how much, else RAM), and
the llama-server options that go with it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ModelError
from pipeline.matrix.hostgpu import Detection
from pipeline.modelfiles.catalogue import Catalogue, CatalogueModel

GIB = 1 << 30
ALL_LAYERS = 999  # llama-server's idiom for "every layer on the GPU"


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class HostMemory:
    """Memory a model may use on this host, and where the figure comes from."""

    bytes: int
    where: str  # "RAM (MemAvailable)", "GPU 0 (nvidia-smi)"
    gpu: bool
    threads: int


def _ram_available(root: Path) -> int:
    try:
        text = (root / "proc" / "meminfo").read_text()
    except OSError as exc:
        raise ModelError(f"cannot read /proc/meminfo: {exc.strerror}") from None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if not match:
        raise ModelError("/proc/meminfo has no MemAvailable line")
    return int(match.group(1)) * 1024


def _nvidia_memory() -> int | None:
    """The first GPU's total memory by nvidia-smi, or None when it cannot say."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
        return int(done.stdout.split()[0]) * (1 << 20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _amd_memory(root: Path) -> int | None:
    for vram in sorted((root / "sys" / "class" / "drm").glob("card*/device/mem_info_vram_total")):
        try:
            return int(vram.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def host_memory(detection: Detection, root: Path = Path("/")) -> HostMemory:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    gpu: int | None = None
    where = ""
    if detection.backend.startswith("cuda") and root == Path("/"):
        gpu, where = _nvidia_memory(), "GPU 0 (nvidia-smi)"
    elif detection.backend in ("rocm", "vulkan"):
        gpu, where = _amd_memory(root), "GPU (mem_info_vram_total)"
    if gpu:
        return HostMemory(gpu, where, True, threads)
    return HostMemory(_ram_available(root), "RAM (MemAvailable)", False, threads)


@dataclass(frozen=True)
class Recommendation:
    model: CatalogueModel
    needs: int  # bytes: weights, KV cache at its context, llama-server's overhead
    budget: int
    memory: HostMemory
    considered: tuple[tuple[CatalogueModel, int], ...]  # (preset, bytes it needs), by need

    @property
    def server_args(self) -> tuple[str, ...]:
        layers = ALL_LAYERS if self.memory.gpu else 0
        return (
            f"--ctx-size {self.model.context}",
            f"--n-gpu-layers {layers}",
            f"--threads {self.memory.threads}",
        )

    @property
    def environment(self) -> tuple[str, ...]:
        """The same options as llama-server's own environment (compose's .env)."""
        names = ("LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_N_GPU_LAYERS", "LLAMA_ARG_THREADS")
        return tuple(
            f"{name}={arg.split()[1]}" for name, arg in zip(names, self.server_args, strict=True)
        )


def recommend(catalogue: Catalogue, task: str, memory: HostMemory) -> Recommendation:
    rules = catalogue.recommend
    budget = rules.budget(memory.bytes)
    presets = [m for m in catalogue.models.values() if m.task == task]
    considered = sorted(
        ((m, m.memory_bytes() + rules.overhead_bytes) for m in presets), key=lambda p: p[1]
    )
    fitting = [(m, need) for m, need in considered if need <= budget]
    if not fitting:
        smallest = considered[0]
        raise ModelError(
            f"no {task} preset fits {gib(budget)} of {memory.where}: the smallest, "
            f"{smallest[0].name}, needs {gib(smallest[1])}",
            "free memory, or run a smaller model of your own with --model",
        )
    model, needs = fitting[-1]
    return Recommendation(model, needs, budget, memory, tuple(considered))
