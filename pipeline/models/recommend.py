"""`recommend`: the largest preset of a task whose weights and KV cache fit what this host has
for them (the GPU's memory where `--backend auto` finds one that says how much, else RAM) and
that this host generates fast enough, and the llama-server options that go with it.

Speed is estimated, not run: generating a token reads every weight it runs through (of a
mixture of experts, the active ones) and the KV cache so far, so on a CPU tokens/s is about the
memory bandwidth llama.cpp turns into reads (a share of what a short probe measures) over those
bytes. A GPU's bandwidth is not probed here: there, memory alone decides.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ModelError
from pipeline.matrix.hostgpu import Detection
from pipeline.modelfiles.catalogue import Catalogue, CatalogueModel, RecommendRules

GIB = 1 << 30
ALL_LAYERS = 999  # llama-server's idiom for "every layer on the GPU"


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class HostMemory:
    """Memory a model may use on this host, and where the figure comes from; the bandwidth
    the CPU reads it with (bytes/s, probed), None where the model would sit on a GPU."""

    bytes: int
    where: str  # "RAM (MemAvailable)", "GPU 0 (nvidia-smi)"
    gpu: bool
    threads: int
    bandwidth: float | None = None


def probe_bandwidth(threads: int, seconds: float = 0.3, size: int = 256 << 20) -> float:
    """Bytes/s `threads` threads read from RAM: each sums its own share of `size` bytes (more
    than a CPU's caches hold) again and again for about `seconds` (numpy's sums run without
    the GIL, and stream through memory as a matrix-vector product does)."""
    import numpy as np

    share = max(size // max(threads, 1), 32 << 20)
    arrays = [np.ones(share // 4, dtype=np.float32) for _ in range(max(threads, 1))]
    for array in arrays:
        array.sum()  # the pages are in place before the clock starts

    def one_pass() -> None:
        workers = [threading.Thread(target=array.sum) for array in arrays]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    read, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or read == 0:
        one_pass()
        read += share * len(arrays)
    return read / max(time.perf_counter() - started, elapsed, 1e-9)


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
    ram = _ram_available(root)
    return HostMemory(ram, "RAM (MemAvailable)", False, threads, probe_bandwidth(threads))


def tokens_per_second(
    model: CatalogueModel, memory: HostMemory, rules: RecommendRules
) -> float | None:
    """The estimated generation speed of `model` on this host; None where it is not estimated
    (a GPU)."""
    if memory.bandwidth is None:
        return None
    return rules.efficiency * memory.bandwidth / model.bytes_per_token(rules.past_tokens)


@dataclass(frozen=True)
class Candidate:
    """A preset of the task: the bytes it needs, its estimated speed, and whether it fits."""

    model: CatalogueModel
    needs: int  # bytes: weights, KV cache at its context, llama-server's overhead
    speed: float | None  # tokens/s estimated; None: not estimated (a GPU)
    fits: bool
    fast: bool  # its estimate reaches the floor (or there is none)

    def line(self) -> str:
        speed = "" if self.speed is None else f", about {self.speed:.1f} tokens/s"
        verdict = "too big" if not self.fits else ("fits" if self.fast else "too slow")
        needs = f"needs {gib(self.needs)} ({self.model.context} context{speed})"
        return f"{verdict}: {self.model.name} {needs}"


@dataclass(frozen=True)
class Recommendation:
    model: CatalogueModel
    needs: int  # bytes: weights, KV cache at its context, llama-server's overhead
    budget: int
    memory: HostMemory
    considered: tuple[Candidate, ...]  # every preset of the task, by need
    floor: float  # tokens/s: slower presets are not recommended

    @property
    def speed(self) -> float | None:
        return next(c.speed for c in self.considered if c.model == self.model)

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


def recommend(
    catalogue: Catalogue, task: str, memory: HostMemory, min_tokens_per_second: float | None = None
) -> Recommendation:
    """The largest preset of `task` that fits and whose estimated speed reaches the floor
    (`min_tokens_per_second`, else the catalogue's)."""
    rules = catalogue.recommend
    floor = min_tokens_per_second or rules.min_tokens_per_second
    budget = rules.budget(memory.bytes)
    considered = []
    for model in (m for m in catalogue.models.values() if m.task == task):
        needs = model.memory_bytes() + rules.overhead_bytes
        speed = tokens_per_second(model, memory, rules)
        fast = speed is None or speed >= floor
        considered.append(Candidate(model, needs, speed, needs <= budget, fast))
    considered.sort(key=lambda c: c.needs)
    fitting = [c for c in considered if c.fits]
    if not fitting:
        raise ModelError(
            f"no {task} preset fits {gib(budget)} of {memory.where}: the smallest, "
            f"{considered[0].model.name}, needs {gib(considered[0].needs)}",
            "free memory, or run a smaller model of your own with --model",
        )
    chosen = [c for c in fitting if c.fast]
    if not chosen:
        fastest = max(fitting, key=lambda c: c.speed or 0.0)
        raise ModelError(
            f"no {task} preset that fits reaches {floor:g} tokens/s here: the fastest, "
            f"{fastest.model.name}, about {fastest.speed or 0:.1f}",
            "accept slower generation with --min-tokens-per-second, or use a faster host",
        )
    best = chosen[-1]
    return Recommendation(best.model, best.needs, budget, memory, tuple(considered), floor)
