"""`nox -s models -- list | pull NAME | recommend`: the model catalogue (modelfiles/catalogue.yaml)
from the command line. `recommend` (recommend.py) picks the preset this host fits and prints the
llama-server options that go with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from pipeline.core.arguments import Command
from pipeline.core.console import out
from pipeline.core.errors import UsageError
from pipeline.core.pypi import sha256_of
from pipeline.matrix import load_matrix
from pipeline.matrix.hostgpu import detect_backend
from pipeline.modelfiles.catalogue import Catalogue, ensure_catalogue_model, load_catalogue
from pipeline.models.options import add_models_arguments
from pipeline.models.recommend import HostMemory, Recommendation, gib, host_memory, recommend

__all__ = ["COMMANDS", "HostMemory", "Recommendation", "host_memory", "recommend"]


def _list(catalogue: Catalogue) -> int:
    rows = [("preset", "task", "size", "context/trained", "licence", "pinned", "source")]
    rows += [
        (
            m.name,
            m.task,
            gib(m.size),
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
        f"memory: {gib(memory.bytes)} of {memory.where}; a model may use "
        f"{catalogue.recommend.share:.0%}: {gib(chosen.budget)}",
        *(
            f"  {'fits' if need <= chosen.budget else 'too big'}: {m.name} needs {gib(need)} "
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
