"""Ollama's model store read as it lies on disk (`~/.ollama/models`, or $OLLAMA_MODELS): one
manifest per model at `manifests/<registry>/<namespace>/<model>/<tag>` (an OCI-style JSON whose
layer of media type `application/vnd.ollama.image.model` is the GGUF), the blobs at
`blobs/sha256-<hex>`. The same GGUF files llama-server loads: nothing is copied.

Names are Ollama's: `smollm2:135m` for the library's models, `user/model:tag` and
`host/namespace/model:tag` otherwise. llama-server's router names a model by its file name, which
cannot hold a `/`: such names are served with `_` in its place (the image's entrypoint does the
same, from the same layout)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ModelError

MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
DEFAULT_REGISTRY = "registry.ollama.ai"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HINT = "give Ollama's models directory (~/.ollama/models, or what OLLAMA_MODELS names)"


@dataclass(frozen=True)
class OllamaModel:
    name: str  # as `ollama list` shows it
    blob: Path  # the GGUF
    size: int

    @property
    def served_as(self) -> str:
        """The name llama-server's router lists it under (a file name: no `/`)."""
        return self.name.replace("/", "_")


def ollama_name(registry: str, namespace: str, model: str, tag: str) -> str:
    if registry == DEFAULT_REGISTRY:
        base = model if namespace == "library" else f"{namespace}/{model}"
    else:
        base = f"{registry}/{namespace}/{model}"
    return f"{base}:{tag}"


def _model_layer(manifest: Path) -> str:
    """The digest of the manifest's model layer."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        layers = data["layers"]
        digest = next(str(la["digest"]) for la in layers if la.get("mediaType") == MODEL_MEDIA_TYPE)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, StopIteration):
        raise ModelError(f"{manifest}: not an Ollama manifest with a model layer", _HINT) from None
    if not _DIGEST_RE.match(digest):
        raise ModelError(f"{manifest}: model layer digest {digest!r} is not sha256", _HINT)
    return digest


def ollama_models(store: Path) -> list[OllamaModel]:
    """Every model the store's manifests name, sorted by name; ModelError for a store that is
    not one, a manifest that is not Ollama's, or a blob that is missing or not GGUF."""
    manifests = store / "manifests"
    if not manifests.is_dir():
        raise ModelError(f"{store}: no manifests/ directory, not an Ollama model store", _HINT)
    models = []
    for manifest in manifests.glob("*/*/*/*"):
        if not manifest.is_file():
            continue
        registry, namespace, model, tag = manifest.relative_to(manifests).parts
        digest = _model_layer(manifest)
        blob = store / "blobs" / digest.replace(":", "-")
        name = ollama_name(registry, namespace, model, tag)
        try:
            with blob.open("rb") as handle:
                magic = handle.read(4)
            size = blob.stat().st_size
        except OSError:
            raise ModelError(f"{name}: its model blob {blob} is missing", _HINT) from None
        if magic != b"GGUF":
            raise ModelError(f"{name}: {blob} is not a GGUF file", _HINT)
        models.append(OllamaModel(name, blob, size))
    if not models:
        raise ModelError(f"{store}: no model manifests under manifests/", _HINT)
    return sorted(models, key=lambda m: m.name)
