"""A local HTTP server speaking the part of the Hugging Face Hub's API that downloads use.

Two clients are served, each exactly the way it talks to the real Hub:
- huggingface_hub's `hf_hub_download`: HEAD then GET `/<repo>/resolve/<revision>/<file>`,
  reading X-Repo-Commit and ETag, and errors from X-Error-Code;
- llama-server's `-hf` (common/hf-cache.cpp, common/download.cpp, endpoint from
  $MODEL_ENDPOINT or $HF_ENDPOINT): GET `/api/models/<repo>/refs` (branch -> commit), GET
  `/api/models/<repo>/tree/<commit>?recursive=true` (files, lfs.oid), then HEAD + GET (with
  Range on resume) of `/<repo>/resolve/<commit>/<file>`.
Smoke runs it for the LLAMA_HF_REPO entrypoint check; tests use it for the --hf-repo path.
It binds loopback only. Request records keep whether a token was sent, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

CHUNK = 1 << 20
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class HubFile:
    path: str
    source: Path
    size: int
    sha256: str
    git_oid: str

    @classmethod
    def from_source(cls, path: str, source: Path) -> HubFile:
        sha256 = hashlib.sha256()
        size = source.stat().st_size
        # Git's blob id: what the Hub reports as `oid` beside the LFS sha256.
        git = hashlib.sha1(f"blob {size}\0".encode())
        with source.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                sha256.update(chunk)
                git.update(chunk)
        return cls(path, source, size, sha256.hexdigest(), git.hexdigest())


@dataclass
class HubRepo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    status: int
    sent_token: bool
    user_agent: str


class HubServer:
    """Serve repositories from local files; a context manager (started on enter)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self._token = token
        self._lock = threading.Lock()
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[HubRequest] = []
        self._httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        return f"http://{host}:{self.port}"

    def add_file(
        self, repo_id: str, path: str, source: Path, *, branch: str = "main", private: bool = False
    ) -> str:
        """Commit `source` as `path` on `branch` (other files kept); returns the commit id."""
        hub_file = HubFile.from_source(path, source)
        with self._lock:
            repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
            repo.private = repo.private or private
            parent = repo.branches.get(branch)
            files = dict(repo.commits.get(parent, {})) if parent else {}
            files[path] = hub_file
            digest = hashlib.sha1(f"{repo_id}\0{parent}\0".encode())
            for name in sorted(files):
                digest.update(f"{name}\0{files[name].sha256}\0".encode())
            commit = digest.hexdigest()
            repo.commits[commit] = files
            repo.branches[branch] = commit
        return commit

    def authorized(self, repo: HubRepo, header: str | None) -> bool:
        if not repo.private:
            return True
        if not self._token or not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header.removeprefix("Bearer "), self._token)

    def record(self, request: HubRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="hubserver", kwargs={"poll_interval": 0.1}
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pipeline-hubserver/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            # Quiet: requests are recorded in hub.requests instead of printed.
            return

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        # ---------------------------------------------------------------- dispatch

        def send_response(self, code: int, message: str | None = None) -> None:
            # Recorded before the response goes out, so a client that has its answer always
            # finds its request in hub.requests.
            hub.record(
                HubRequest(
                    method=self.command,
                    path=urlsplit(self.path).path,
                    status=code,
                    sent_token=self.headers.get("Authorization") is not None,
                    user_agent=self.headers.get("User-Agent", ""),
                )
            )
            super().send_response(code, message)

        def _serve(self, *, head: bool) -> None:
            try:
                parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    self._api(parts[2:], head)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
                else:
                    raise _HubError(404, "EntryNotFound", f"no route for {self.path}")
            except _HubError as err:
                self._error(err, head)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away mid-transfer

        def _repo(self, repo_id: str) -> HubRepo:
            repo = hub.repos.get(repo_id)
            if repo is None or not hub.authorized(repo, self.headers.get("Authorization")):
                # The Hub answers 401 for both missing and private repos (no existence leak).
                raise _HubError(401, "RepoNotFound", f"Repository not found: {repo_id}")
            return repo

        def _commit(self, repo: HubRepo, revision: str) -> str:
            commit = repo.resolve(revision)
            if commit is None:
                raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        def _api(self, rest: list[str], head: bool) -> int:
            repo = self._repo(f"{rest[0]}/{rest[1]}")
            tail = rest[2:]
            if tail == ["refs"]:
                branches = [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit}
                    for name, commit in sorted(repo.branches.items())
                ]
                return self._json({"branches": branches, "tags": [], "converts": []}, head)
            if tail[:1] == ["tree"] and len(tail) >= 2:
                commit = self._commit(repo, tail[1])
                prefix = "/".join(tail[2:])
                entries = [
                    {
                        "type": "file",
                        "oid": f.git_oid,
                        "size": f.size,
                        "path": f.path,
                        "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134},
                    }
                    for f in sorted(repo.commits[commit].values(), key=lambda f: f.path)
                    if not prefix or f.path.startswith(prefix + "/")
                ]
                return self._json(entries, head)
            if tail == [] or (tail[:1] == ["revision"] and len(tail) == 2):
                commit = self._commit(repo, tail[1] if tail else "main")
                info = {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": commit,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])],
                }
                return self._json(info, head)
            raise _HubError(404, "EntryNotFound", f"no API route {'/'.join(tail)}")

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> int:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
            hub_file = repo.commits[commit].get(path)
            if hub_file is None:
                raise _HubError(404, "EntryNotFound", f"Entry not found: {path}", commit)
            start, end = 0, hub_file.size - 1
            status = 200
            wanted = self.headers.get("Range")
            if wanted:
                match = RANGE_RE.match(wanted.strip())
                if not match or int(match.group(1)) >= hub_file.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{hub_file.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return 416
                start = int(match.group(1))
                end = min(int(match.group(2) or end), end)
                status = 206
            length = end - start + 1
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{hub_file.sha256}"')
            self.send_header("X-Repo-Commit", commit)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{hub_file.size}")
            self.end_headers()
            if not head:
                with hub_file.source.open("rb") as handle:
                    handle.seek(start)
                    left = length
                    while left > 0:
                        chunk = handle.read(min(CHUNK, left))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        left -= len(chunk)
            return status

        # ---------------------------------------------------------------- responses

        def _json(self, data: Any, head: bool) -> int:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return 200

        def _error(self, err: _HubError, head: bool) -> None:
            body = json.dumps({"error": err.message}).encode()
            self.send_response(err.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Code", err.code)
            self.send_header("X-Error-Message", err.message)
            if err.commit:
                self.send_header("X-Repo-Commit", err.commit)
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
