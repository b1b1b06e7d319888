"""The generated model, GGUF validation, and Hub downloads through the local hub server."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from pipeline.core.errors import ModelError
from pipeline.core.project import Project
from pipeline.modelfiles.gguf import (
    CHAT_TEMPLATE,
    ModelSpec,
    download_hf_model,
    ensure_model,
    generate_model,
    preset,
    validate_gguf,
    vocabulary,
)
from pipeline.smoke.hubserver import HubServer

TOKEN = "hf_" + "a1B2c3D4e5" * 4  # the Hub's token shape; a test value, not a secret


def tensor_bytes(spec: ModelSpec) -> int:
    """Bytes of tensor data alone (the file adds its header, vocab and alignment padding)."""
    return sum(spec.tensor_nbytes(shape) for _, shape in spec.tensor_shapes())


def n_params(spec: ModelSpec) -> int:
    return sum(math.prod(shape) for _, shape in spec.tensor_shapes())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_model(preset("tiny"), tmp_path_factory.mktemp("model") / "tiny.gguf")


def test_generation_is_deterministic_per_seed(tiny: Path, tmp_path: Path) -> None:
    again = generate_model(preset("tiny"), tmp_path / "again.gguf")
    other = generate_model(preset("tiny", seed=1), tmp_path / "other.gguf")
    assert sha256(again) == sha256(tiny)
    assert sha256(other) != sha256(tiny)
    assert other.stat().st_size == tiny.stat().st_size


def test_tiny_model_layout(tiny: Path) -> None:
    spec = preset("tiny")
    reader = gguf.GGUFReader(tiny)
    tensors = {t.name: t for t in reader.tensors}
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert tokens is not None
    n_vocab = len(tokens.data)
    # The vocabulary length must equal the rows of token_embd and output (lab.md §6).
    assert [int(x) for x in tensors["token_embd.weight"].shape] == [spec.n_embd, n_vocab]
    assert [int(x) for x in tensors["output.weight"].shape] == [spec.n_embd, n_vocab]
    assert len(tensors) == 3 + 9 * spec.n_layer
    field = reader.get_field("general.architecture")
    assert field is not None and field.contents() == "llama"
    model = reader.get_field("tokenizer.ggml.model")
    assert model is not None and model.contents() == "llama"
    template = reader.get_field("tokenizer.chat_template")
    assert template is not None and template.contents() == CHAT_TEMPLATE
    listed = tokens.contents()
    assert listed[:3] == ["<unk>", "<s>", "</s>"]
    assert listed[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert "\u2581hello" in listed and len(set(listed)) == len(listed)
    assert 400_000 < tiny.stat().st_size < 700_000  # about 0.5 MB
    assert tiny.stat().st_mode & 0o777 == 0o644  # readable by the container's non-root user


def test_quantized_variant_has_the_type_and_the_predicted_size(tmp_path: Path) -> None:
    spec = ModelSpec(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, dtype="Q4_0")
    path = generate_model(spec, tmp_path / spec.filename)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert sum(int(t.n_bytes) for t in reader.tensors) == tensor_bytes(spec)
    assert validate_gguf(path).n_embd == 128


def test_bench_preset_is_a_few_hundred_mb_quantized() -> None:
    spec = preset("bench")
    assert spec.dtype == "Q4_0"
    assert 200e6 < tensor_bytes(spec) < 500e6
    # Q4_0 is 18 bytes per 32 weights; norms stay F32.
    assert tensor_bytes(spec) < n_params(spec) * 0.6


def test_ensure_model_caches_under_build_models(tmp_path: Path) -> None:
    project = Project(tmp_path)
    path = ensure_model(project)
    assert path.parent == tmp_path / "build" / "models"
    assert path.name == preset("tiny").filename
    before = path.stat().st_mtime_ns
    assert ensure_model(project) == path
    assert path.stat().st_mtime_ns == before
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "Q9_9"}, "dtype"),
        ({"n_embd": 62}, "divide evenly"),
        ({"n_head_kv": 3}, "divide evenly"),
        ({"dtype": "Q8_0", "n_embd": 48, "n_head": 4}, "blocks of 32"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_bad_specs_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        preset("tiny", **overrides)


def test_vocabulary_types_match_tokens() -> None:
    tokens, scores, types = vocabulary()
    assert len(tokens) == len(scores) == len(types)
    assert types[0] == gguf.TokenType.UNKNOWN and types[3] == gguf.TokenType.BYTE


# ---------------------------------------------------------------------------- validation


def test_validate_reports_the_model(tiny: Path) -> None:
    info = validate_gguf(tiny)
    assert (info.architecture, info.n_embd, info.version) == ("llama", 64, 3)
    assert info.n_vocab == len(vocabulary()[0])
    assert info.size_bytes == tiny.stat().st_size


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        validate_gguf(tmp_path / "nope.gguf")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a regular file"):
        validate_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GGU", b"not a model at all\n", b"\x00" * 64])
def test_wrong_magic_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a GGUF file"):
        validate_gguf(path)


def test_truncated_gguf_is_refused(tiny: Path, tmp_path: Path) -> None:
    for cut in (24, 2000, tiny.stat().st_size - 100):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(tiny.read_bytes()[:cut])
        with pytest.raises(ModelError, match="cannot be parsed"):
            validate_gguf(path)


def test_gguf_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ModelError, match="no tensors"):
        validate_gguf(path)


# ---------------------------------------------------------------------------- Hub download


@pytest.fixture
def hub(tiny: Path, tmp_path: Path, clean_env: None) -> Iterator[HubServer]:
    server = HubServer(token=TOKEN)
    server.add_file("acme/tiny", "tiny.gguf", tiny)
    (tmp_path / "README.md").write_text("not a model\n")
    server.add_file("acme/tiny", "README.md", tmp_path / "README.md")
    server.add_file("acme/private", "tiny.gguf", tiny, private=True)
    with server:
        yield server


def test_download_public_file(hub: HubServer, tiny: Path, tmp_path: Path) -> None:
    model = download_hf_model("acme/tiny", "tiny.gguf", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert sha256(model.path) == sha256(tiny)
    assert model.commit == hub.repos["acme/tiny"].branches["main"]
    assert model.path.is_relative_to(tmp_path / "c")
    assert not any(r.sent_token for r in hub.requests)


def test_download_honours_hf_endpoint_env(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    model = download_hf_model("acme/tiny", "tiny.gguf", cache_dir=tmp_path / "c")
    assert model.path.is_file()
    assert any(r.path.endswith("/tiny.gguf") for r in hub.requests)


def test_download_pins_the_revision(hub: HubServer, tiny: Path, tmp_path: Path) -> None:
    first = hub.repos["acme/tiny"].branches["main"]
    other = generate_model(preset("tiny", seed=7), tmp_path / "v2.gguf")
    second = hub.add_file("acme/tiny", "tiny.gguf", other)
    cache = tmp_path / "c"
    pinned = download_hf_model("acme/tiny", "tiny.gguf", first, endpoint=hub.url, cache_dir=cache)
    latest = download_hf_model("acme/tiny", "tiny.gguf", "main", endpoint=hub.url, cache_dir=cache)
    assert (pinned.commit, sha256(pinned.path)) == (first, sha256(tiny))
    assert (latest.commit, sha256(latest.path)) == (second, sha256(other))


def test_private_repo_needs_hf_token(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelError, match="acme/private not found") as caught:
        download_hf_model("acme/private", "tiny.gguf", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert "HF_TOKEN" in caught.value.line()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = download_hf_model(
        "acme/private", "tiny.gguf", endpoint=hub.url, cache_dir=tmp_path / "c"
    )
    assert model.path.is_file()
    assert hub.requests[-1].sent_token


@pytest.mark.parametrize(
    ("repo", "filename", "revision", "message"),
    [
        ("acme/missing", "tiny.gguf", None, "repository acme/missing not found"),
        ("acme/tiny", "missing.gguf", None, "file 'missing.gguf' not found"),
        ("acme/tiny", "tiny.gguf", "v9", "revision 'v9' not found"),
        ("acme/tiny", "README.md", None, "not a GGUF file"),
    ],
)
def test_download_failures_are_model_errors(
    hub: HubServer, tmp_path: Path, repo: str, filename: str, revision: str | None, message: str
) -> None:
    with pytest.raises(ModelError, match=message) as caught:
        download_hf_model(repo, filename, revision, endpoint=hub.url, cache_dir=tmp_path / "c")
    assert "\n" not in caught.value.line()


def test_token_never_appears_in_errors(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ModelError) as caught:
        download_hf_model("acme/private", "nope.gguf", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert TOKEN not in caught.value.line()
    assert os.environ["HF_TOKEN"] == TOKEN
