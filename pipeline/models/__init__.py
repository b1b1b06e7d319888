"""`nox -s models -- list | pull NAME | recommend`: the model catalogue (modelfiles/catalogue.yaml)
from the command line. `recommend` picks the largest preset of a task whose weights and KV cache
fit what this host has for them (the GPU's memory where `--backend auto` finds one that says
how much, else RAM), and prints the llama-server options that go with it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.console import out
from pipeline.core.errors import ModelError, UsageError
from pipeline.core.options import Command
from pipeline.matrix import load_matrix
from pipeline.matrix.hostgpu import Detection, detect_backend
from pipeline.modelfiles.catalogue import (
    CATALOGUE_FILE,
    TASKS,
    Catalogue,
    CatalogueModel,
    ensure_catalogue_model,
    load_catalogue,
)

__all__ = ["COMMANDS", "HostMemory", "Recommendation", "host_memory", "recommend"]

GIB = 1 << 30
ALL_LAYERS = 999  # llama-server's idiom for "every layer on the GPU"


def _gib(n: int) -> str:
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
    budget = int(memory.bytes * rules.share)
    presets = [m for m in catalogue.models.values() if m.task == task]
    considered = sorted(
        ((m, m.memory_bytes() + rules.overhead_bytes) for m in presets), key=lambda p: p[1]
    )
    fitting = [(m, need) for m, need in considered if need <= budget]
    if not fitting:
        smallest = considered[0]
        raise ModelError(
            f"no {task} preset fits {_gib(budget)} of {memory.where}: the smallest, "
            f"{smallest[0].name}, needs {_gib(smallest[1])}",
            "free memory, or run a smaller model of your own with --model",
        )
    model, needs = fitting[-1]
    return Recommendation(model, needs, budget, memory, tuple(considered))


# ----------------------------------------------------------------------------- the commands


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "pull", "recommend"))
    parser.add_argument("name", nargs="?", help="pull: the preset to fetch")
    parser.add_argument(
        "--into",
        metavar="DIR",
        type=Path,
        help="pull: also put the file here (a hard link where possible), e.g. compose's ./models",
    )
    parser.add_argument(
        "--task", choices=TASKS, help="recommend: the task (default: catalogue.yaml's)"
    )
    parser.add_argument(
        "--catalogue",
        metavar="FILE",
        type=Path,
        default=CATALOGUE_FILE,
        help="a catalogue of your own, in catalogue.yaml's format",
    )


def _list(catalogue: Catalogue) -> int:
    rows = [("preset", "task", "size", "context/trained", "licence", "pinned", "source")]
    rows += [
        (
            m.name,
            m.task,
            _gib(m.size),
            f"{m.context}/{m.context_length}",
            m.licence,
            f"sha256 {m.sha256[:12]}" if m.sha256 else "not yet",
            f"{m.source} {m.file}",
        )
        for m in catalogue.models.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.print("  ".join([*cells, row[-1]]), markup=False, soft_wrap=True)
    return 0


def _place(path: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    target = into / path.name
    if target.exists():
        target.unlink()
    try:
        os.link(path, target)
    except OSError:
        shutil.copy2(path, target)
    return target


def _pull(catalogue: Catalogue, name: str | None, into: Path | None) -> int:
    if not name:
        raise UsageError("models pull: which preset?", f"one of {', '.join(catalogue.models)}")
    model = catalogue.model(name)
    path = ensure_catalogue_model(model)
    pin = f"sha256 {model.sha256}" if model.sha256 else "not pinned"
    out.print(f"{model.name}: {path} ({path.stat().st_size} bytes, {pin})", soft_wrap=True)
    if model.sha256 is None:
        from pipeline.core.pypi import sha256_of

        out.print(
            f"to pin it, in catalogue.yaml: sha256: {sha256_of(path)}, size: {path.stat().st_size}",
            soft_wrap=True,
        )
    if into is not None:
        out.print(f"also at {_place(path, into)}", soft_wrap=True)
    return 0


def _recommend(catalogue: Catalogue, task: str | None) -> int:
    detection = detect_backend(load_matrix())
    memory = host_memory(detection)
    chosen = recommend(catalogue, task or catalogue.recommend.task, memory)
    lines = [
        detection.line(),
        f"memory: {_gib(memory.bytes)} of {memory.where}; a model may use "
        f"{catalogue.recommend.share:.0%}: {_gib(chosen.budget)}",
        *(
            f"  {'fits' if need <= chosen.budget else 'too big'}: {m.name} needs {_gib(need)} "
            f"({m.context} context)"
            for m, need in chosen.considered
        ),
        f"recommended: {chosen.model.name} ({chosen.model.file}, {chosen.model.licence})",
        f"llama-server options: {' '.join(chosen.server_args)}",
        f"or in the environment (compose's .env): {' '.join(chosen.environment)}",
        f"image backend: {detection.backend}; fetch it: nox -s models -- pull {chosen.model.name}",
    ]
    for line in lines:
        out.print(line, markup=False, soft_wrap=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    catalogue = load_catalogue(args.catalogue)
    if args.action == "list":
        return _list(catalogue)
    if args.action == "pull":
        return _pull(catalogue, args.name, args.into)
    return _recommend(catalogue, args.task)


COMMANDS = (
    Command(
        "models",
        "The model catalogue: list presets, pull one (sha256 checked), recommend one for "
        "this host.",
        add_models_arguments,
        _run,
    ),
)
