"""`nox -s models -- list | pull NAME | recommend`: the model catalogue (modelfiles/catalogue.yaml)
from the command line (`list --ollama DIR`: the models of an Ollama store instead).
`recommend` (recommend.py) picks the preset this host fits and runs fast enough, and prints
the llama-server options that go with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.arguments import Command
from pipeline.core.console import out
from pipeline.core.errors import ModelError, UsageError
from pipeline.core.pypi import sha256_of
from pipeline.matrix import load_matrix
from pipeline.matrix.hostgpu import detect_backend
from pipeline.modelfiles.catalogue import Catalogue, ensure_catalogue_model, load_catalogue
from pipeline.modelfiles.ollama import ollama_models
from pipeline.models.options import ModelsOptions, add_models_arguments, resolve_models
from pipeline.models.recommend import (
    HostMemory,
    Recommendation,
    gib,
    host_memory,
    probe_bandwidth,
    recommend,
)

__all__ = [
    "COMMANDS",
    "HostMemory",
    "Recommendation",
    "host_memory",
    "probe_bandwidth",
    "recommend",
]


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
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, the last one left to run on."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.print("  ".join([*cells, row[-1]]), markup=False, soft_wrap=True)


def _list_ollama(store: Path) -> int:
    rows = [("model", "served as", "size", "GGUF")]
    rows += [(m.name, m.served_as, gib(m.size), str(m.blob)) for m in ollama_models(store)]
    _print_table(rows)
    out.print(
        f"serve them: docker run -v {store}:/ollama:ro -e LLAMA_OLLAMA_MODELS=/ollama IMAGE",
        markup=False,
        soft_wrap=True,
    )
    return 0


def _place(path: Path, into: Path) -> tuple[Path, bool]:
    """`path` also at `into` (a hard link where possible); (where, whether it was placed): a
    target that already is the file (the model cache itself, an earlier link) is left alone."""
    target = into / path.name
    if target.exists() and os.path.samefile(target, path):
        return target, False
    try:
        into.mkdir(parents=True, exist_ok=True)
        partial = into / f".{path.name}.partial"
        partial.unlink(missing_ok=True)
        try:
            os.link(path, partial)
        except OSError:
            shutil.copy2(path, partial)
        os.replace(partial, target)  # the old file stays whole until the new one is there
    except OSError as exc:
        raise ModelError(
            f"cannot put {path.name} into {into}: {exc.strerror}", "choose another --into"
        ) from None
    return target, True


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
        target, placed = _place(path, into)
        said = "also at" if placed else "already at"
        out.print(f"{said} {target}", soft_wrap=True)
    return 0


def _speed_lines(chosen: Recommendation, efficiency: float) -> list[str]:
    memory = chosen.memory
    if memory.bandwidth is None:
        return ["speed: not estimated on a GPU (its bandwidth is not probed): memory decides"]
    return [
        f"memory bandwidth: {memory.bandwidth / 1e9:.1f} GB/s measured with {memory.threads} "
        f"thread(s); generation is estimated at {efficiency:.0%} of it over the bytes each "
        f"token reads; presets under {chosen.floor:g} tokens/s are not recommended",
    ]


def _recommend(options: ModelsOptions, catalogue: Catalogue) -> int:
    detection = detect_backend(load_matrix())
    memory = host_memory(detection)
    task = options.task or catalogue.recommend.task
    chosen = recommend(catalogue, task, memory, options.min_tokens_per_second)
    lines = [
        detection.line(),
        f"memory: {gib(memory.bytes)} of {memory.where}; a model may use "
        f"{catalogue.recommend.share:.0%}: {gib(chosen.budget)}",
        *_speed_lines(chosen, catalogue.recommend.efficiency),
        *(f"  {candidate.line()}" for candidate in chosen.considered),
        f"recommended: {chosen.model.name} ({chosen.model.file}, {chosen.model.licence})"
        + ("" if chosen.speed is None else f", about {chosen.speed:.1f} tokens/s"),
        f"llama-server options: {' '.join(chosen.server_args)}",
        f"or in the environment (compose's .env): {' '.join(chosen.environment)}",
        f"image backend: {detection.backend}; fetch it: nox -s models -- pull {chosen.model.name}",
    ]
    for line in lines:
        out.print(line, markup=False, soft_wrap=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    options = resolve_models(args)
    catalogue = load_catalogue(options.catalogue)
    if options.action == "list" and options.ollama is not None:
        return _list_ollama(options.ollama)
    if options.action == "list":
        return _list(catalogue)
    if options.action == "pull":
        return _pull(catalogue, options.name, options.into)
    return _recommend(options, catalogue)


COMMANDS = (
    Command(
        "models",
        "The model catalogue: list presets, pull one (sha256 checked), recommend one for "
        "this host.",
        add_models_arguments,
        _run,
    ),
)
