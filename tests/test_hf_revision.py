"""LLAMA_HF_REVISION pins a Hub download to a commit, tag or branch, against the project's local
Hub (pipeline/smoke/hubserver.py, which speaks the Hub's resolve API): a repository whose file has
different bytes on two revisions serves the pinned one; a revision that does not exist is one
line and a non-zero exit."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from fixtures.images import SmokeImage

from pipeline.modelfiles.gguf import generate_model, preset
from pipeline.oci.engine import ServerContainer, docker_client, free_port
from pipeline.smoke.hubserver import HubServer

pytestmark = pytest.mark.docker

REPO = "acme/tiny-GGUF"
FILE = "tiny.gguf"


def serve(image: str, hub: HubServer, revision: str) -> ServerContainer:
    port = free_port()
    env = {
        "LLAMA_HF_REPO": REPO,
        "LLAMA_HF_FILE": FILE,
        "LLAMA_HF_REVISION": revision,
        "HF_ENDPOINT": f"{hub.url}/",
        "LLAMA_SERVER_HOST": "127.0.0.1",
        "LLAMA_SERVER_PORT": str(port),
    }
    return ServerContainer(docker_client(), image, env=env, network_host=True, container_port=port)


def test_a_pinned_revision_is_the_one_served(cpu_amd64: SmokeImage, tmp_path: Path) -> None:
    old = generate_model(preset("tiny", seed=1), tmp_path / "old.gguf")
    new = generate_model(preset("tiny", seed=2), tmp_path / "new.gguf")
    assert old.read_bytes() != new.read_bytes()
    with HubServer() as hub:
        pinned = hub.add_file(REPO, FILE, old)
        hub.add_file(REPO, FILE, new, branch="v2")  # a tag-like ref with other bytes
        hub.add_file(REPO, FILE, new)  # main moves on: the pinned commit must still win
        box = serve(cpu_amd64.ref, hub, pinned)
        started = time.perf_counter()
        with box:
            box.wait_healthy(box.base_url, 60)
            seconds = time.perf_counter() - started
            models = httpx.get(f"{box.base_url}/v1/models", timeout=10).json()
            props = httpx.get(f"{box.base_url}/props", timeout=10).json()
        downloads = [r for r in hub.requests if r.method == "GET" and r.path.endswith(f"/{FILE}")]
    assert models["data"], models
    # One model loaded, from the path named for the pinned revision (not a router's list).
    assert props["model_path"].endswith(f"/{REPO.replace('/', '_')}_{pinned}_{FILE}"), props
    print(
        f"\nFIGURE revision-pinned download to healthy: {seconds:.1f} s, {old.stat().st_size} bytes"
    )
    assert downloads and all(f"/resolve/{pinned}/" in r.path for r in downloads), downloads
    assert downloads[-1].status == 200


def test_a_revision_that_does_not_exist_is_one_line(cpu_amd64: SmokeImage, tmp_path: Path) -> None:
    model = generate_model(preset("tiny"), tmp_path / "m.gguf")
    with HubServer() as hub:
        hub.add_file(REPO, FILE, model)
        box = serve(cpu_amd64.ref, hub, "no-such-revision")
        with box:
            code = box.wait_exit(30)
            lines = [line for line in box.logs().splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and "no-such-revision" in lines[0] and "404" in lines[0], lines


def test_a_pull_requests_revision_is_served(cpu_amd64: SmokeImage, tmp_path: Path) -> None:
    """LLAMA_HF_REVISION=refs/pr/1: the files of a pull request on the Hub, downloaded by the
    real llama-server as one encoded path segment into a cache file without a `/` in its name."""
    main_model = generate_model(preset("tiny", seed=1), tmp_path / "main.gguf")
    proposed = generate_model(preset("tiny", seed=4), tmp_path / "pr.gguf")
    with HubServer() as hub:
        hub.add_file(REPO, FILE, main_model)
        hub.add_file(REPO, FILE, proposed, branch="refs/pr/1")
        with serve(cpu_amd64.ref, hub, "refs/pr/1") as box:
            box.wait_healthy(box.base_url, 60)
            props = httpx.get(f"{box.base_url}/props", timeout=10).json()
        downloads = [r for r in hub.requests if r.method == "GET" and r.path.endswith(f"/{FILE}")]
    assert props["model_path"].endswith(f"/{REPO.replace('/', '_')}_refs%2Fpr%2F1_{FILE}"), props
    assert downloads and all("/resolve/refs%2Fpr%2F1/" in r.path for r in downloads), downloads
    assert downloads[-1].status == 200
