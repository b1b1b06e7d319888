"""compose.yaml with Docker Compose v2 (the lab's plugin): its images are the tags publish
pushes, `config` validates it, and the llama profile comes up healthy, answers, and goes away
without a trace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fixtures.images import SmokeImage
from fixtures.lab import REPO_ROOT, require_lab

from pipeline.cli import main
from pipeline.core.version import SemVer, load_version
from pipeline.matrix import load_matrix
from pipeline.modelfiles.catalogue import catalogue_model
from pipeline.oci.engine import free_port
from pipeline.oci.tags import TagKind, load_tag_rules
from pipeline.smoke.settings import load_settings

COMPOSE = REPO_ROOT / "compose.yaml"
REAL = load_settings().real
PRESET = "smollm2-135m"


def compose_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def release_tag(backend: str) -> str:
    """The first immutable tag publish gives `backend` for version.json's release."""
    version = load_version(REPO_ROOT / "version.json")
    suffix = load_matrix().backend(backend).tag_suffix
    planned = load_tag_rules().tags_for(
        SemVer.parse(version.version),
        backend,
        suffix,
        version.llama_cpp.commit,
        version.llama_cpp.ref,
    )
    name = next(t.name for t in planned if t.kind is TagKind.IMMUTABLE)
    return f"{version.image}:{name}"


@pytest.mark.parametrize(
    ("service", "backend"),
    [
        ("llama-server", "cpu"),
        ("llama-embeddings", "cpu"),
        ("llama-ollama", "cpu"),
        ("llama-rpc-server", "cpu"),
        ("llama-rpc-worker-1", "cpu"),
        ("llama-cuda", "cuda"),
    ],
)
def test_compose_runs_the_tags_publish_pushes(service: str, backend: str) -> None:
    services = compose_data()["services"]
    defaults = {"${LLAMA_IMAGE:-": "", "${LLAMA_TAG:-": "", "${LLAMA_CUDA_TAG:-": ""}
    image = services[service].get("image") or compose_data()["x-llama-server"]["image"]
    for variable in defaults:
        image = image.replace(variable, "")
    assert image.replace("}", "") == release_tag(backend)


def compose(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "compose", *args], capture_output=True, text=True, env=env, cwd=cwd, check=False
    )


def has_compose() -> bool:
    return shutil.which("docker") is not None and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )


def stack(tmp_path: Path, image: str, env_file: str) -> tuple[Path, int]:
    """A directory holding compose.yaml and a .env naming `image`, a free host port and
    `env_file`'s lines, as users set them; (the directory, the port)."""
    project_dir = tmp_path / "stack"
    project_dir.mkdir()
    shutil.copy(COMPOSE, project_dir / "compose.yaml")
    repository, _, tag = image.rpartition(":")
    port = free_port()
    (project_dir / ".env").write_text(
        f"LLAMA_IMAGE={repository}\nLLAMA_TAG={tag}\nLLAMA_PORT={port}\n{env_file}"
    )
    return project_dir, port


@pytest.mark.docker
def test_the_llama_profile_comes_up_healthy_answers_and_leaves_nothing(
    cpu_amd64: SmokeImage, real_gguf: Path, tmp_path: Path
) -> None:
    require_lab(has_compose(), "Docker Compose v2 (.ci/provision installs the plugin)")

    # The model by preset, as the README tells users: `nox -s models -- pull NAME --into DIR`.
    models = tmp_path / "models"
    assert main(["models", "pull", PRESET, "--into", str(models)]) == 0
    model = models / catalogue_model(PRESET).file
    # Every knob from .env: llama-server's own option too, and a typo the entrypoint names.
    project_dir, port = stack(
        tmp_path,
        cpu_amd64.ref,
        f"LLAMA_MODELS_HOST_DIR={models}\nLLAMA_MODEL=/models/{model.name}\n"
        "LLAMA_SERVER_EXTRA_ARGS=--alias compose-model\n"
        "LLAMA_ARG_CTX_SIZE=1024\nLLAMA_MODLE=typo.gguf\n",
    )
    name = f"compose-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": name}
    config = compose("--profile", "llama", "config", "--format", "json", env=env, cwd=project_dir)
    assert config.returncode == 0, config.stderr
    service = json.loads(config.stdout)["services"]["llama-server"]
    assert service["image"] == cpu_amd64.ref and service["restart"] == "unless-stopped"
    assert service["volumes"][0]["read_only"] is True
    # Downloads in a named volume; the root read-only.
    assert {"type": "volume", "source": "llama-cache", "target": "/cache"}.items() <= service[
        "volumes"
    ][1].items()
    assert service["read_only"] is True
    started = time.perf_counter()
    try:
        up = compose(
            "--profile",
            "llama",
            "up",
            "--wait",
            "--wait-timeout",
            "120",
            "llama-server",
            env=env,
            cwd=project_dir,
        )
        assert up.returncode == 0, up.stderr
        print(f"\nFIGURE compose up --wait -> healthy: {time.perf_counter() - started:.1f} s")
        models_seen = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert [m["id"] for m in models_seen["data"]] == ["compose-model"]
        ps = compose("ps", "--format", "json", env=env, cwd=project_dir).stdout
        assert '"Health":"healthy"' in ps.replace(" ", "")
        props = httpx.get(f"http://127.0.0.1:{port}/props", timeout=30).json()
        assert props["default_generation_settings"]["n_ctx"] == 1024
        logs = compose("logs", "llama-server", env=env, cwd=project_dir).stdout
        assert "warning: LLAMA_MODLE is not a knob of this image" in logs, logs[-2000:]
    finally:
        down = compose("--profile", "llama", "down", "--volumes", env=env, cwd=project_dir)
    assert down.returncode == 0, down.stderr
    label = f"label=com.docker.compose.project={name}"
    for kind in ("container", "network", "volume"):
        left = subprocess.run(
            [
                "docker",
                kind,
                "ls",
                *(["-a"] if kind == "container" else []),
                "-q",
                "--filter",
                label,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert left == [], f"{kind}s left behind: {left}"


@pytest.mark.docker
def test_the_rpc_profile_splits_the_model_over_two_workers(
    cpu_amd64: SmokeImage, real_gguf: Path, tmp_path: Path
) -> None:
    """`docker compose --profile rpc up`: two workers on an internal network, healthy, and the
    server that splits the real model over them (its log names each worker's share)."""
    require_lab(has_compose(), "Docker Compose v2 (.ci/provision installs the plugin)")
    project_dir, port = stack(
        tmp_path,
        cpu_amd64.ref,
        f"LLAMA_MODELS_HOST_DIR={real_gguf.parent}\nLLAMA_MODEL=/models/{real_gguf.name}\n"
        "LLAMA_SERVER_EXTRA_ARGS=--ctx-size 2048 --parallel 1 -lv 4\n",  # -lv 4: the split
    )
    name = f"compose-rpc-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "COMPOSE_PROJECT_NAME": name}
    config = compose("--profile", "rpc", "config", "--format", "json", env=env, cwd=project_dir)
    assert config.returncode == 0, config.stderr
    data = json.loads(config.stdout)
    assert data["networks"]["llama-rpc"]["internal"] is True
    assert list(data["services"]["llama-rpc-worker-1"]["networks"]) == ["llama-rpc"]
    try:
        up = compose(
            "--profile", "rpc", "up", "--wait", "--wait-timeout", "180", env=env, cwd=project_dir
        )
        assert up.returncode == 0, up.stderr
        health = compose("ps", "--format", "json", env=env, cwd=project_dir).stdout
        assert health.replace(" ", "").count('"Health":"healthy"') == 3, health
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                # The real tier's first question, asked as it asks it.
                "messages": [{"role": "user", "content": REAL.factual.questions[0].question}],
                "max_tokens": 16,
                "temperature": 0,
                "seed": REAL.seed,
            },
            timeout=120,
        ).json()
        assert "Paris" in reply["choices"][0]["message"]["content"], reply
        logs = compose("logs", "llama-rpc-server", env=env, cwd=project_dir).stdout
        for worker in ("llama-rpc-worker-1", "llama-rpc-worker-2"):
            assert f"[{worker}:50052] model buffer size" in logs, logs[-3000:]
    finally:
        down = compose("--profile", "rpc", "down", "--volumes", env=env, cwd=project_dir)
    assert down.returncode == 0, down.stderr
