"""Ollama's models reused: a store laid out exactly as Ollama writes it (a manifest per model
under manifests/<registry>/<namespace>/<model>/<tag>, the GGUF as blobs/sha256-<hex>), read by
`nox -s models -- list --ollama DIR` and served by the image (LLAMA_OLLAMA_MODELS) under
Ollama's names, without copying a byte. The served store holds the real trained model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fixtures.images import SmokeImage
from fixtures.lab import REPO_ROOT

from pipeline.cli import main
from pipeline.core.errors import ModelError
from pipeline.modelfiles.ollama import MODEL_MEDIA_TYPE, ollama_models
from pipeline.oci.engine import free_port

ENTRYPOINT = REPO_ROOT / "dockerfiles" / "image" / "entrypoint.sh"
# The real tier's first question (smoke.yaml), which the model answers right at temperature 0.
QUESTION = "What is the capital of France? Answer in one word."


def add_model(store: Path, reference: str, gguf: Path, *, digest_first: bool = False) -> str:
    """`gguf` in `store` as `ollama pull reference` leaves it (hard-linked: no copy); its
    blob digest. `reference`: registry/namespace/model/tag."""
    data = gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / digest.replace(":", "-")
    if not blob.exists():
        os.link(gguf, blob)
    template = b"{{ .Prompt }}"
    template_digest = "sha256:" + hashlib.sha256(template).hexdigest()
    (blobs / template_digest.replace(":", "-")).write_bytes(template)
    layer = {"mediaType": MODEL_MEDIA_TYPE, "digest": digest, "size": len(data)}
    if digest_first:
        layer = {"digest": digest, "mediaType": MODEL_MEDIA_TYPE, "size": len(data)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": template_digest,
            "size": len(template),
        },
        "layers": [
            layer,
            {
                "mediaType": "application/vnd.ollama.image.template",
                "digest": template_digest,
                "size": len(template),
            },
        ],
    }
    path = store / "manifests" / reference
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return digest


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_the_store_is_read_as_ollama_names_its_models(
    tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "models"
    add_model(store, "registry.ollama.ai/library/smollm2/135m", tiny_gguf)
    add_model(store, "registry.ollama.ai/acme/tiny/q4", tiny_gguf, digest_first=True)
    add_model(store, "hf.co/bartowski/tiny-GGUF/Q4_K_M", tiny_gguf)
    models = ollama_models(store)
    assert [(m.name, m.served_as) for m in models] == [
        ("acme/tiny:q4", "acme_tiny:q4"),
        ("hf.co/bartowski/tiny-GGUF:Q4_K_M", "hf.co_bartowski_tiny-GGUF:Q4_K_M"),
        ("smollm2:135m", "smollm2:135m"),
    ]
    assert all(m.blob.samefile(tiny_gguf) for m in models)  # the same file: nothing copied
    assert main(["models", "list", "--ollama", str(store)]) == 0
    shown = capsys.readouterr().out
    assert "smollm2:135m" in shown and "LLAMA_OLLAMA_MODELS=/ollama" in shown


def test_a_store_that_is_not_one_is_one_line(tmp_path: Path, tiny_gguf: Path) -> None:
    with pytest.raises(ModelError, match="no manifests/ directory"):
        ollama_models(tmp_path)
    store = tmp_path / "models"
    digest = add_model(store, "registry.ollama.ai/library/smollm2/135m", tiny_gguf)
    (store / "blobs" / digest.replace(":", "-")).unlink()
    with pytest.raises(ModelError, match=r"smollm2:135m: its model blob .* is missing"):
        ollama_models(store)
    (store / "manifests" / "registry.ollama.ai/library/smollm2/135m").write_text("{}")
    with pytest.raises(ModelError, match="not an Ollama manifest with a model layer"):
        ollama_models(store)


def test_the_entrypoint_serves_the_store_under_ollamas_names(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    store = tmp_path / "ollama"
    add_model(store, "registry.ollama.ai/library/smollm2/135m", tiny_gguf)
    add_model(store, "registry.ollama.ai/acme/tiny/q4", tiny_gguf, digest_first=True)
    shutil.copy(ENTRYPOINT, tmp_path / "entrypoint.sh")
    server = tmp_path / "llama-server"
    server.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$0.args"\n')
    server.chmod(0o755)
    cache = tmp_path / "cache"
    env = {"PATH": os.environ["PATH"], "LLAMA_OLLAMA_MODELS": str(store), "LLAMA_CACHE": str(cache)}
    done = subprocess.run(
        ["/bin/sh", str(tmp_path / "entrypoint.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    argv = Path(f"{server}.args").read_text().split()
    links = cache / "ollama-models"
    assert argv[argv.index("--models-dir") + 1] == str(links)
    assert sorted(p.name for p in links.iterdir()) == ["acme_tiny:q4.gguf", "smollm2:135m.gguf"]
    assert all(p.is_symlink() and p.samefile(tiny_gguf) for p in links.iterdir())
    # Beside another model source, or on a directory that is not a store: one line, exit 64.
    for extra, message in (
        ({"LLAMA_MODEL": str(tiny_gguf)}, "unset LLAMA_MODEL"),
        ({"LLAMA_OLLAMA_MODELS": str(tmp_path)}, "no manifests/ directory there"),
    ):
        refused = subprocess.run(
            ["/bin/sh", str(tmp_path / "entrypoint.sh")],
            env={**env, **extra},
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 64 and refused.stderr.count("\n") == 1, refused.stderr
        assert message in refused.stderr


@pytest.mark.docker
def test_the_image_serves_ollamas_store_read_only(
    cpu_amd64: SmokeImage, real_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "ollama"
    add_model(store, "registry.ollama.ai/library/smollm2/135m", real_gguf)
    port = free_port()
    name = f"ollama-test-{port}"
    started = time.perf_counter()
    run = subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--read-only",
         "-p", f"127.0.0.1:{port}:8080", "-v", f"{store}:/ollama:ro",
         "-e", "LLAMA_OLLAMA_MODELS=/ollama", cpu_amd64.ref],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, subprocess.run(
                ["docker", "logs", name], capture_output=True, text=True
            ).stderr[-2000:]
            time.sleep(0.2)
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
        assert listed == ["smollm2:135m"]
        body = {
            "model": "smollm2:135m",
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24,
            "temperature": 0,
        }
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        content = answer["choices"][0]["message"]["content"]
        assert "Paris" in content, content
        seconds = time.perf_counter() - started
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    with capsys.disabled():
        print(f"\nFIGURE Ollama store served: {listed}; smollm2:135m answered {content!r} "
              f"{seconds:.1f} s after docker run")  # fmt: skip
