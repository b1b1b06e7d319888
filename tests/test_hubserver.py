"""The local Hub speaks the API llama-server's -hf download walks (common/hf-cache.cpp):
refs -> tree -> HEAD + ranged GET of resolve. huggingface_hub's side is in test_model.py, and
a real llama-server downloads from it in test_smoke.py (entrypoint-hf-repo)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.smoke.hubserver import HubServer

TOKEN = "hf_" + "Zz9Yy8Xx7W" * 4


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    return path


@pytest.fixture
def hub(blob: Path) -> Iterator[HubServer]:
    with HubServer(token=TOKEN) as server:
        server.add_file("org/model", "model.gguf", blob)
        server.add_file("org/model", "sub/other.gguf", blob)
        server.add_file("org/secret", "model.gguf", blob, private=True)
        yield server


def test_binds_loopback_only(hub: HubServer) -> None:
    assert hub.url.startswith("http://127.0.0.1:")


def test_llama_server_walk(hub: HubServer, blob: Path) -> None:
    """The exact sequence and fields llama-server reads."""
    data = blob.read_bytes()
    with httpx.Client(base_url=hub.url) as http:
        refs = http.get("/api/models/org/model/refs").json()
        main = next(b for b in refs["branches"] if b["name"] == "main")
        commit = main["targetCommit"]
        assert len(commit) == 40 and int(commit, 16) >= 0
        tree = http.get(f"/api/models/org/model/tree/{commit}", params={"recursive": "true"}).json()
        entry = next(e for e in tree if e["path"] == "model.gguf")
        assert entry["type"] == "file"
        assert entry["lfs"]["oid"] == hashlib.sha256(data).hexdigest()
        assert entry["oid"] == hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        assert {e["path"] for e in tree} == {"model.gguf", "sub/other.gguf"}

        url = f"/org/model/resolve/{commit}/model.gguf"
        head = http.head(url)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(data)
        assert head.headers["accept-ranges"] == "bytes"
        assert head.headers["etag"] == f'"{entry["lfs"]["oid"]}"'
        assert head.headers["x-repo-commit"] == commit

        part = http.get(url, headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == data[100:]
        assert part.headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert http.get(url, headers={"Range": "bytes=4-7"}).content == data[4:8]
        assert http.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        assert http.get(url).content == data


def test_branch_names_resolve_too(hub: HubServer, blob: Path) -> None:
    assert (
        httpx.get(f"{hub.url}/org/model/resolve/main/sub/other.gguf").content == blob.read_bytes()
    )


def test_new_commit_keeps_old_one_resolvable(hub: HubServer, blob: Path, tmp_path: Path) -> None:
    old = hub.repos["org/model"].branches["main"]
    newer = tmp_path / "new.gguf"
    newer.write_bytes(b"GGUF-new")
    new = hub.add_file("org/model", "model.gguf", newer)
    assert new != old
    assert httpx.get(f"{hub.url}/org/model/resolve/{old}/model.gguf").content == blob.read_bytes()
    assert httpx.get(f"{hub.url}/org/model/resolve/main/model.gguf").content == b"GGUF-new"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/org/nope/resolve/main/model.gguf", 401, "RepoNotFound"),
        ("/org/model/resolve/v404/model.gguf", 404, "RevisionNotFound"),
        ("/org/model/resolve/main/nope.gguf", 404, "EntryNotFound"),
        ("/api/models/org/nope/refs", 401, "RepoNotFound"),
        ("/api/models/org/model/tree/deadbeef", 404, "RevisionNotFound"),
        ("/org/secret/resolve/main/model.gguf", 401, "RepoNotFound"),
    ],
)
def test_errors_carry_the_hub_error_codes(
    hub: HubServer, path: str, status: int, code: str
) -> None:
    response = httpx.get(hub.url + path)
    assert (response.status_code, response.headers["x-error-code"]) == (status, code)
    # llama-server shows the JSON "error" field of a failed API call.
    assert response.json()["error"]


def test_private_repo_with_token(hub: HubServer) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wrong = {"Authorization": "Bearer hf_" + "0" * 36}
    url = f"{hub.url}/api/models/org/secret/refs"
    assert httpx.get(url, headers=auth).status_code == 200
    assert httpx.get(url, headers=wrong).status_code == 401
    assert [r.sent_token for r in hub.requests] == [True, True]
    # Records say whether a token came, never which.
    assert TOKEN not in repr(hub.requests)
