"""Models for smoke and bench: a generated GGUF, GGUF validation, and Hub downloads.

The generated model has random weights but a real llama-architecture layout, a byte-level SPM
vocabulary (every UTF-8 string tokenizes, so every endpoint works) and a chat template. It is a
pure function of its `ModelSpec` (seeded per tensor), written once to build/models/ and reused.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.datafile import load_yaml
from pipeline.core.errors import ModelError
from pipeline.core.fields import Fields
from pipeline.core.project import Project

GGUF_MAGIC = b"GGUF"
# Bumped whenever the generator's output changes for the same spec: part of the file name, so a
# cached file from an older generator is never mistaken for the current one.
GENERATOR_VERSION = 1
PRESETS_FILE = Path(__file__).with_name("models.yaml")
# Weight types the `gguf` package can produce itself (numpy casts or its own quantizers).
DTYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
WORDS = ("hello", "world", "llama", "server", "smoke", "test")
SPACE = "\u2581"  # SentencePiece's visible space
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a generated model; every field is part of its cached file name."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx: int = 2048
    dtype: str = "F32"
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelError(f"model spec: {f.name} is {value!r}, expected an integer >= 0")
            if f.name != "seed" and value == 0:
                raise ModelError(f"model spec: {f.name} is 0, expected a positive integer")
        if self.dtype not in DTYPES:
            raise ModelError(
                f"model spec: dtype {self.dtype!r} is not one the generator can write",
                f"use one of {', '.join(DTYPES)}",
            )
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ModelError(
                f"model spec: n_embd {self.n_embd}, n_head {self.n_head}, n_head_kv "
                f"{self.n_head_kv} do not divide evenly",
                "n_embd must be a multiple of n_head, and n_head of n_head_kv",
            )
        block = self.block_size
        if self.n_embd % block or self.n_ff % block:
            raise ModelError(
                f"model spec: {self.dtype} packs rows in blocks of {block}; n_embd "
                f"{self.n_embd} and n_ff {self.n_ff} must be multiples of it"
            )

    @property
    def qtype(self) -> Any:
        import gguf

        return gguf.GGMLQuantizationType[self.dtype]

    @property
    def block_size(self) -> int:
        import gguf

        block, _ = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(block)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def filename(self) -> str:
        return (
            f"llama-e{self.n_embd}-l{self.n_layer}-h{self.n_head}-kv{self.n_head_kv}"
            f"-f{self.n_ff}-c{self.n_ctx}-{self.dtype.lower()}-s{self.seed}"
            f"-g{GENERATOR_VERSION}.gguf"
        )

    @property
    def n_vocab(self) -> int:
        return len(vocabulary()[0])

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, numpy shape as (rows, row length)) in file order, llama's tensor names."""
        e, kv, ff, v = self.n_embd, self.n_embd_kv, self.n_ff, self.n_vocab
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("token_embd.weight", (v, e)),
            ("output_norm.weight", (e,)),
            ("output.weight", (v, e)),
        ]
        for i in range(self.n_layer):
            shapes += [
                (f"blk.{i}.attn_norm.weight", (e,)),
                (f"blk.{i}.attn_q.weight", (e, e)),
                (f"blk.{i}.attn_k.weight", (kv, e)),
                (f"blk.{i}.attn_v.weight", (kv, e)),
                (f"blk.{i}.attn_output.weight", (e, e)),
                (f"blk.{i}.ffn_norm.weight", (e,)),
                (f"blk.{i}.ffn_gate.weight", (ff, e)),
                (f"blk.{i}.ffn_up.weight", (ff, e)),
                (f"blk.{i}.ffn_down.weight", (e, ff)),
            ]
        return shapes

    def tensor_nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one tensor: norms (1-D) stay F32, matrices take the spec's type."""
        import gguf

        n = int(np.prod(shape))
        if len(shape) == 1:
            return 4 * n
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return n // int(block) * int(type_size)


def load_presets(path: Path = PRESETS_FILE) -> dict[str, ModelSpec]:
    """models.yaml: preset name -> the shape of a generated model (ModelSpec checks values)."""
    known = [f.name for f in fields(ModelSpec)]
    presets: dict[str, ModelSpec] = {}
    for name, spec in Fields(load_yaml(path), path.name).entries(known=known):
        presets[name] = ModelSpec(
            **{
                key: spec.text(key) if key == "dtype" else spec.integer(key, minimum=0)
                for key in known
                if spec.has(key)
            }
        )
    return presets


def preset(name: str = "tiny", **overrides: Any) -> ModelSpec:
    """A preset from models.yaml, with fields overridden (e.g. `preset("bench", n_layer=4)`)."""
    presets = load_presets()
    if name not in presets:
        raise ModelError(f"no model preset {name!r}", f"choose one of {', '.join(presets)}")
    return replace(presets[name], **overrides)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of the byte-level SPM vocabulary.

    <unk> <s> </s>, the 256 byte tokens (so any text has a fallback), the space marker and
    letters, and a few words with each prefix they are merged through (SPM merges adjacent
    pieces only when the result is itself a token, so `▁hello` needs `▁h`, `▁he`, ...).
    """
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    pieces = [SPACE, *"abcdefghijklmnopqrstuvwxyz"]
    for word in WORDS:
        marked = SPACE + word
        pieces += [marked[:n] for n in range(2, len(marked) + 1) if marked[:n] not in pieces]
    tokens += pieces
    types += [int(TokenType.NORMAL)] * len(pieces)
    # Longer pieces score higher, so merges prefer whole words.
    scores = [0.0] * (3 + 256) + [float(len(p)) for p in pieces]
    return tokens, scores, types


def _tensor_data(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """One tensor's bytes: deterministic from (seed, name), independent of the others."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    weights = rng.standard_normal(shape, dtype=np.float32)
    weights *= WEIGHT_STD
    if spec.dtype == "F32":
        return weights
    from gguf import quants

    return np.asarray(quants.quantize(weights, spec.qtype))


def _file_type(spec: ModelSpec) -> int:
    from gguf import LlamaFileType

    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
    return int(LlamaFileType[names.get(spec.dtype, f"MOSTLY_{spec.dtype}")])


def _tensors(spec: ModelSpec) -> Iterator[np.ndarray[Any, Any]]:
    for name, shape in spec.tensor_shapes():
        yield _tensor_data(spec, name, shape)


def generate_model(spec: ModelSpec, path: Path) -> Path:
    """Write the model for `spec` to `path` atomically; tensors are streamed one at a time."""
    import gguf

    tokens, scores, types = vocabulary()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(f"pipeline test model {spec.filename.removesuffix('.gguf')}")
        writer.add_description(
            f"random weights, generated by pipeline.modelfiles.gguf: {asdict(spec)}"
        )
        writer.add_context_length(spec.n_ctx)
        writer.add_embedding_length(spec.n_embd)
        writer.add_block_count(spec.n_layer)
        writer.add_feed_forward_length(spec.n_ff)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(tokens))
        writer.add_file_type(_file_type(spec))
        if spec.dtype.startswith("Q"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(True)
        writer.add_chat_template(CHAT_TEMPLATE)
        for name, shape in spec.tensor_shapes():
            qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else spec.qtype
            writer.add_tensor_info(
                name, shape, np.dtype(np.float32), spec.tensor_nbytes(shape), raw_dtype=qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensors(spec):
            writer.write_tensor_data(data)
        writer.close()
        # mkstemp makes 0600 files; the container's non-root user must be able to read it.
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def ensure_model(project: Project, spec: ModelSpec | None = None) -> Path:
    """The generated model for `spec` (default: the tiny preset), generated on first use."""
    spec = spec or preset("tiny")
    path = project.models_dir / spec.filename
    if not path.is_file():
        generate_model(spec, path)
    return path


# ---------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class GGUFInfo:
    """What smoke needs to know about a model file before a container sees it."""

    path: Path
    size_bytes: int
    version: int
    architecture: str
    name: str | None
    n_embd: int
    n_vocab: int
    n_tensors: int


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def validate_gguf(path: Path) -> GGUFInfo:
    """Refuse anything that is not a readable GGUF model: magic, then a full parse by `gguf`."""
    hint = "pass a .gguf model file (llama.cpp's format)"
    if not path.exists():
        raise ModelError(f"model file {path} does not exist", "check the --model path")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a regular file", hint)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})", hint
        )
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
        file_size = len(reader.data)
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > file_size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
        version = int(_field(reader, "GGUF.version"))
        arch = _field(reader, "general.architecture")
        if not isinstance(arch, str):
            raise ValueError("no general.architecture key")
        n_embd = _field(reader, f"{arch}.embedding_length")
        tokens = reader.get_field("tokenizer.ggml.tokens")
        name = _field(reader, "general.name")
        info = GGUFInfo(
            path=path,
            size_bytes=file_size,
            version=version,
            architecture=arch,
            name=name if isinstance(name, str) else None,
            n_embd=int(n_embd) if n_embd is not None else 0,
            n_vocab=len(tokens.data) if tokens is not None else 0,
            n_tensors=len(reader.tensors),
        )
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"{path} has a GGUF magic but cannot be parsed: {detail}", hint) from None
    if info.n_tensors == 0:
        raise ModelError(f"{path} is a GGUF file with no tensors (not a model)", hint)
    return info


# ---------------------------------------------------------------------------- Hub download


@dataclass(frozen=True)
class HubModel:
    path: Path
    repo: str
    filename: str
    revision: str
    commit: str | None
    info: GGUFInfo  # validated once, on download


def download_hf_model(
    repo: str,
    filename: str,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> HubModel:
    """Download one file with huggingface_hub into its cache, then validate it as GGUF.

    The token comes from $HF_TOKEN only (never an argument: it would end up in logs and
    process lists). `endpoint` defaults to $HF_ENDPOINT read now, not at import time.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    where = endpoint or "the Hugging Face Hub"
    rev = revision or "main"
    token = os.environ.get("HF_TOKEN") or False
    label = f"{repo}/{filename}@{rev}"
    try:
        local = hf_hub_download(
            repo,
            filename,
            revision=rev,
            endpoint=endpoint,
            cache_dir=str(cache_dir) if cache_dir else None,
            token=token,
        )
    except GatedRepoError:
        raise ModelError(
            f"{repo} on {where} is gated", "accept its terms and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"Hugging Face repository {repo} not found on {where}",
            "check --hf-repo; for a private repository set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"revision {rev!r} not found in {repo} on {where}", "check --hf-revision"
        ) from None
    except LocalEntryNotFoundError as exc:
        # The HEAD request failed and the file is not cached: say why the network failed.
        cause = exc.__cause__ or exc.__context__ or exc
        detail = " ".join(str(cause).split())[:200]
        raise ModelError(
            f"cannot download {label} from {where}: {detail}",
            "check network access and HF_ENDPOINT",
        ) from None
    except EntryNotFoundError:
        raise ModelError(
            f"file {filename!r} not found in {repo}@{rev} on {where}", "check --hf-file"
        ) from None
    except HFValidationError as exc:
        raise ModelError(f"invalid Hugging Face repository or revision: {exc}") from None
    except (HfHubHTTPError, OSError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(f"cannot download {label} from {where}: {detail}") from None
    snapshot = Path(local)
    # huggingface_hub's cache layout: .../snapshots/<commit>/<filename> (a symlink to a blob).
    commit = next(
        (p.name for p in snapshot.parents if p.parent.name == "snapshots"),
        None,
    )
    path = snapshot.resolve()
    info = validate_gguf(path)
    return HubModel(path, repo, filename, rev, commit, info)
