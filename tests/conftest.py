"""Shared fixtures. Lab-dependent parts (Docker engine, upstream mirror, registry) come from
.ci/provision; on CI (CI=true) their absence fails the run instead of skipping it, so a broken
provision can never turn into a green run of skips.

Areas append their own shared fixtures below in a marked section.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def lab_dir() -> Path:
    return Path(os.environ.get("LLAMA_LAB", "/opt/llama-lab"))


def lab_env() -> dict[str, str]:
    """KEY=value lines .ci/provision writes to $LLAMA_LAB/env."""
    env_file = lab_dir() / "env"
    values: dict[str, str] = {}
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip('"')
    return values


def require_lab(available: bool, what: str) -> None:
    """Skip with the reason when this machine lacks a lab part; on CI, fail instead."""
    if available:
        return
    message = f"{what} is not available (run .ci/provision)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {message}")
    pytest.skip(message)


def docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def upstream_mirror() -> Path:
    """The real upstream llama.cpp git checkout at the pin (lab.md §5), fetched by provision."""
    remote = lab_env().get("LLAMA_CPP_REMOTE", "")
    path = Path(remote.removeprefix("file://")) if remote else lab_dir() / "upstream" / "llama.cpp"
    require_lab((path / ".git").exists(), f"upstream llama.cpp mirror at {path}")
    return path


@pytest.fixture(scope="session")
def docker_engine() -> None:
    require_lab(docker_engine_answers(), "a Docker engine")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests must not see the developer's remotes, tokens or roots."""
    for name in ("LLAMA_CPP_REMOTE", "PIPELINE_ROOT", "HF_TOKEN", "DOCKERHUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield


# =====================================================================================
# sync (owner: sync engineer): real git repositories standing in for upstream llama.cpp,
# served over file://. Several commits with fixed dates, `b<number>` tags (lightweight and
# annotated, numbered so that numeric, lexical and date order disagree), a branch, and
# files both in paths pipeline/prune.yaml removes and in paths it keeps.
# =====================================================================================


@dataclass(frozen=True)
class FakeUpstream:
    path: Path
    url: str  # file://...
    commits: dict[str, str]  # "c1".."c4" -> sha, oldest first; c4 is master's tip
    dates: dict[str, str]  # "c1".."c4" -> committer date, ISO 8601
    tags: dict[str, str]  # tag name -> commit sha (annotated tags resolved)
    branch: str  # a branch besides master, pointing at c3


def git_run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


# path -> content (bytes for binary files); "<exec>" marks an executable script.
FAKE_KEPT_FILES: dict[str, bytes] = {
    "LICENSE": b"MIT License\n",
    "CMakeLists.txt": b"cmake_minimum_required(VERSION 3.14)\nproject(llama.cpp)\n",
    "src/llama.cpp": b"// llama\n",
    "src/llama.h": b"#pragma once\n",
    "common/common.cpp": b"// common\n",
    "ggml/src/ggml-cpu/ggml-cpu.c": b"/* cpu backend */\n",
    "tools/server/server.cpp": b"// server\n",
    "tools/ui/CMakeLists.txt": b"set(TARGET llama-ui)\n",
    "examples/simple/simple.cpp": b"// simple\n",
    "scripts/ui-assets.cmake": b"# embeds the web UI\n",
    "models/ggml-vocab-llama-spm.gguf": b"GGUF" + bytes(range(256)) * 64,
    "build-info.sh": b"#!/bin/sh\necho build\n",  # executable, kept
}
FAKE_PRUNED_FILES: dict[str, bytes] = {
    "docs/build.md": b"# Build\n",
    "docs/ops/table.bin": bytes(range(256)) * 1024,  # 256 KiB: pruning must save bytes
    "media/logo.png": b"\x89PNG\r\n\x1a\n" + bytes(2048),
    ".github/workflows/build.yml": b"on: push\n",
    "models/ggml-vocab-gemma-4.gguf": b"GGUF" + bytes(4096),
    "models/templates/chat.jinja": b"{{ messages }}\n",
    "examples/llama.android/README.md": b"android\n",
    "ggml/src/ggml-metal/ggml-metal.metal": b"// metal\n",
    "tests/test-tokenizer.cpp": b"// test\n",
    "tools/server/tests/unit/test_basic.py": b"def test(): pass\n",
    "scripts/sync-ggml.sh": b"#!/bin/sh\n",
    "gguf-py/gguf/__init__.py": b"",
    "convert_hf_to_gguf.py": b"print()\n",
}
FAKE_EXECUTABLES = ("build-info.sh", "scripts/sync-ggml.sh")
FAKE_SYMLINK = ("common/llama.h", "../src/llama.h")  # a kept symlink


def build_fake_upstream(root: Path) -> FakeUpstream:
    path = root / "llama.cpp"
    path.mkdir(parents=True)
    git_run(path, "init", "-q", "-b", "master")
    git_run(path, "config", "user.name", "Upstream Dev")
    git_run(path, "config", "user.email", "dev@upstream.example")
    for rel, content in {**FAKE_KEPT_FILES, **FAKE_PRUNED_FILES}.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    for rel in FAKE_EXECUTABLES:
        (path / rel).chmod(0o755)
    (path / FAKE_SYMLINK[0]).symlink_to(FAKE_SYMLINK[1])
    commits: dict[str, str] = {}
    dates: dict[str, str] = {}
    for n in range(1, 5):
        (path / "src" / "llama.cpp").write_text(f"// llama, revision {n}\n")
        (path / "docs" / "build.md").write_text(f"# Build, revision {n}\n")
        date = f"2026-0{n}-1{n}T1{n}:00:00+02:00"
        env = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
        git_run(path, "add", "-A", env=env)
        git_run(path, "commit", "-q", "-m", f"revision {n}", env=env)
        commits[f"c{n}"] = git_run(path, "rev-parse", "HEAD")
        dates[f"c{n}"] = date
    # Numeric order picks b1000 (c2); lexical order would pick b999 (c3), dates c4.
    git_run(path, "tag", "b998", commits["c1"])
    git_run(path, "tag", "-a", "-m", "release b1000", "b1000", commits["c2"])
    git_run(path, "tag", "-a", "-m", "release b999", "b999", commits["c3"])
    git_run(path, "tag", "v1.0", commits["c3"])
    git_run(path, "tag", "b12x", commits["c4"])  # not a release tag
    git_run(path, "branch", "feature", commits["c3"])
    tags = {"b998": commits["c1"], "b1000": commits["c2"], "b999": commits["c3"]}
    tags |= {"v1.0": commits["c3"], "b12x": commits["c4"]}
    return FakeUpstream(path, f"file://{path}", commits, dates, tags, "feature")


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> FakeUpstream:
    """A real git repository shaped like upstream llama.cpp (read-only: tests don't change it)."""
    return build_fake_upstream(tmp_path_factory.mktemp("upstream"))


def write_version_json(
    root: Path, commit: str, ref: str | None, repository: str, **extra: object
) -> Path:
    data = {
        "version": "0.1.0",
        "llama_cpp": {"repository": repository, "commit": commit, "ref": ref},
        "image": "docker.io/acme/llama-server",
        **extra,
    }
    path = root / "version.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@pytest.fixture
def fake_project(tmp_path: Path, fake_upstream: FakeUpstream, clean_env: None) -> Path:
    """A project root whose version.json pins the fake upstream's b1000 (commit c2)."""
    root = tmp_path / "project"
    root.mkdir()
    write_version_json(root, fake_upstream.commits["c2"], "b1000", fake_upstream.url)
    return root


# =====================================================================================
# smoke (owner: smoke engineer, issue 4): the cpu images as `nox -s build -- <arch> --load`
# builds them (through the build section's `cpu_image`), and throwaway broken images derived
# from them by `docker commit` (no build).
# =====================================================================================


@dataclass(frozen=True)
class SmokeImage:
    ref: str
    digest: str | None
    report: Path  # build/reports/build-cpu-<arch>.json


def reported_image(reports: Path, backend: str, arch: str) -> SmokeImage:
    """The image a build report in `reports` names, present in the local engine."""
    require_lab(docker_engine_answers(), "a Docker engine")
    report = reports / f"build-{backend}-{arch}.json"
    require_lab(report.is_file(), f"a built {backend} {arch} image ({report}; nox -s build)")
    data = json.loads(report.read_text())
    inspect = subprocess.run(
        ["docker", "image", "inspect", data["ref"]], capture_output=True, check=False
    )
    require_lab(inspect.returncode == 0, f"image {data['ref']} in the local engine")
    return SmokeImage(data["ref"], data.get("digest"), report)


def smoke_image(request: pytest.FixtureRequest, arch: str, backend: str = "cpu") -> SmokeImage:
    # $SMOKE_BUILD_REPORTS: images built elsewhere (a CI job's artifacts, a developer's own
    # build); otherwise the build section builds them (BuildKit's cache: seconds when unchanged).
    override = os.environ.get("SMOKE_BUILD_REPORTS")
    if override:
        return reported_image(Path(override), backend, arch)
    result = request.getfixturevalue("backend_image")(backend, arch)
    report = REPO_ROOT / "build" / "reports" / f"build-{backend}-{arch}.json"
    return SmokeImage(result.ref, result.digest, report)


@pytest.fixture(scope="session")
def cpu_amd64(request: pytest.FixtureRequest) -> SmokeImage:
    return smoke_image(request, "amd64")


@pytest.fixture(scope="session")
def cpu_arm64(request: pytest.FixtureRequest) -> SmokeImage:
    return smoke_image(request, "arm64")


@pytest.fixture(scope="session")
def vulkan_amd64(request: pytest.FixtureRequest) -> SmokeImage:
    """The Vulkan image: without a GPU here, its server runs on Mesa's lavapipe."""
    return smoke_image(request, "amd64", "vulkan")


# Entrypoints replacing llama-server: one that dies at once with a message, one that never
# listens. Everything else (labels, user, HEALTHCHECK) is the real image's.
BROKEN_ENTRYPOINTS = {
    "exits": '["/bin/sh", "-c", "echo \'fatal: model load failed (smoke test)\' >&2; exit 3"]',
    "sleeps": '["/bin/sh", "-c", "exec sleep 600"]',
}


@pytest.fixture(scope="session")
def broken_images(cpu_amd64: SmokeImage) -> Iterator[dict[str, str]]:
    """`docker commit` of the real image with another ENTRYPOINT: no build, no CPU, seconds."""
    tags: dict[str, str] = {}
    for name, entrypoint in BROKEN_ENTRYPOINTS.items():
        tag = f"smoke-test/{name}:{os.getpid()}"
        created = subprocess.run(
            ["docker", "container", "create", cpu_amd64.ref],
            capture_output=True,
            text=True,
            check=True,
        )
        cid = created.stdout.strip()
        try:
            subprocess.run(
                ["docker", "commit", "--change", f"ENTRYPOINT {entrypoint}", cid, tag],
                capture_output=True,
                check=True,
            )
        finally:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
        tags[name] = tag
    yield tags
    subprocess.run(
        ["docker", "image", "rm", "-f", *tags.values()], capture_output=True, check=False
    )


# =====================================================================================
# publish (owner: publish engineer, issue 5): Debian's docker-registry on free loopback
# ports (own storage, access log, optional htpasswd bcrypt auth), a TCP proxy in front of one
# that can answer 503 or stop the registry when a given request passes (real faults, real
# sockets), and tiny real two-platform images pushed to a registry per platform, as
# `nox -s build -- <arch> --push-by-digest` does on CI.
# =====================================================================================

REQUEST_LINE_RE = re.compile(rb"^(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n", re.M)
ACCESS_LOG_RE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) ')


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class LocalRegistry:
    """A real `docker-registry serve` on 127.0.0.1:<free port>; stop()/start() keep storage."""

    def __init__(
        self, root: Path, user: tuple[str, str] | None = None, auth_config: str = ""
    ) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = root / "registry.log"
        self.user = user
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        auth = auth_config
        if user is not None:
            # bcrypt (-B), password from stdin (-i): never on a command line.
            entry = subprocess.run(
                ["htpasswd", "-B", "-n", "-i", user[0]],
                input=user[1],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            (root / "htpasswd").write_text(entry + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: lab\n    path: {root / 'htpasswd'}\n"
        (root / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n{auth}"
        )

    def start(self) -> None:
        assert self.process is None, "already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request so far, from the access log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [(m, p, int(s)) for m, p, s in ACCESS_LOG_RE.findall(text)]

    def writes_since(self, mark: int) -> list[tuple[str, str, int]]:
        return [r for r in self.requests()[mark:] if r[0] in {"PUT", "POST", "PATCH", "DELETE"}]

    def blob_uploads_since(self, mark: int) -> list[tuple[str, str, int]]:
        """Blob data sent to the registry (cross-repository mounts carry no data)."""
        return [
            r
            for r in self.writes_since(mark)
            if "/blobs/uploads/" in r[1] and "mount=" not in r[1] and r[0] != "DELETE"
        ]


class FaultProxy:
    """A TCP proxy on a free loopback port in front of a LocalRegistry.

    fail_next(n): the next n connections get `503 Service Unavailable` and are closed.
    stop_on(pattern, restart_after): when a request line matching `pattern` arrives, the
    registry is stopped before the request reaches it (the connection is dropped), and
    started again `restart_after` seconds later (None: left stopped).
    """

    def __init__(self, registry: LocalRegistry) -> None:
        self.registry = registry
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self._fail = 0
        self._stop_pattern: re.Pattern[bytes] | None = None
        self._restart_after: float | None = None
        self.stopped_on: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closing = False
        self._restarts: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_next(self, count: int) -> None:
        with self._lock:
            self._fail = count

    def stop_on(self, pattern: str, restart_after: float | None) -> None:
        with self._lock:
            self._stop_pattern = re.compile(pattern.encode())
            self._restart_after = restart_after

    def close(self) -> None:
        self._closing = True
        self._server.close()
        for thread in self._restarts:
            thread.join(timeout=30)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            fail = self._fail > 0
            self._fail -= 1 if fail else 0
        if fail:
            client.recv(65536)
            client.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n"
            )
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.registry.port), timeout=5)
        except OSError:
            client.close()  # the registry is down: the client sees the connection drop
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, inspect: bool) -> None:
        try:
            while data := source.recv(65536):
                if inspect and self._should_stop(data):
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _should_stop(self, data: bytes) -> bool:
        with self._lock:
            pattern = self._stop_pattern
            if pattern is None:
                return False
            for match in REQUEST_LINE_RE.finditer(data):
                line = match.group(0).strip()
                if pattern.search(line):
                    self._stop_pattern = None
                    break
            else:
                return False
        self.stopped_on.append(line.decode())
        self.registry.stop()
        if self._restart_after is not None:
            delay = self._restart_after
            thread = threading.Thread(target=self._restart, args=(delay,), daemon=True)
            self._restarts.append(thread)
            thread.start()
        return True

    def _restart(self, delay: float) -> None:
        time.sleep(delay)
        self.registry.start()


class TokenServer:
    """A registry token server (Docker's token auth spec, as auth.docker.io serves Docker Hub).

    Signs ES256 JWTs with a self-signed certificate that the registry trusts (its
    `rootcertbundle`). `user` may pull and push; anonymous callers get pull only, or nothing
    when `anonymous_pull` is False. Wrong credentials get 401.
    """

    def __init__(self, root: Path, user: tuple[str, str], anonymous_pull: bool = False) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.user = user
        self.anonymous_pull = anonymous_pull
        self.service = "lab-registry"
        self.issuer = "lab-token-issuer"
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = root / "token-cert.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued: list[tuple[str, str]] = []  # (who, scope) of every token handed out
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle(self)

            def do_POST(self) -> None:  # OAuth2 password grant: containerd (buildx) uses it
                server.handle(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def registry_config(self) -> str:
        return (
            f"auth:\n  token:\n    realm: {self.realm}\n    service: {self.service}\n"
            f"    issuer: {self.issuer}\n    rootcertbundle: {self.cert_path}\n"
        )

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(request.path).query)
        header = request.headers.get("Authorization", "")
        who = ""
        presented: tuple[str, str] | None = None
        if request.command == "POST":
            length = int(request.headers.get("Content-Length", "0"))
            form = urllib.parse.parse_qs(request.rfile.read(length).decode())
            query = {**query, **form}
            if form.get("grant_type") == ["password"]:
                presented = (form.get("username", [""])[0], form.get("password", [""])[0])
        elif header.startswith("Basic "):
            user, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            presented = (user, secret)
        if presented is not None:
            user, secret = presented
            if (user, secret) != self.user:
                request.send_response(401)
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            who = user
        access = []
        # GET repeats `scope`; the OAuth2 POST form joins scopes with spaces.
        for scope in " ".join(query.get("scope", [])).split():
            kind, name, actions = scope.split(":")
            wanted = set(actions.split(","))
            granted = wanted if who else wanted & ({"pull"} if self.anonymous_pull else set())
            access.append({"type": kind, "name": name, "actions": sorted(granted)})
            self.issued.append((who or "anonymous", scope))
        token = self.sign(who, access)
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300,
            "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access,
        }  # fmt: skip
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[LocalRegistry, TokenServer]]:
    """A registry behind bearer-token auth (Docker Hub's flow), user `publisher`."""
    require_lab(shutil.which("docker-registry") is not None, "Debian's docker-registry")
    pytest.importorskip("cryptography", reason="the test extra (cryptography) is not installed")
    tokens = TokenServer(tmp_path / "token", ("publisher", "t0ken-secret"))
    registry = LocalRegistry(tmp_path / "token-registry", auth_config=tokens.registry_config())
    registry.start()
    yield registry, tokens
    registry.stop()
    tokens.close()


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[Callable[..., LocalRegistry]]:
    """Start fresh registries (optionally with htpasswd auth); all stopped afterwards."""
    require_lab(shutil.which("docker-registry") is not None, "Debian's docker-registry")
    started: list[LocalRegistry] = []

    def make(user: tuple[str, str] | None = None) -> LocalRegistry:
        registry = LocalRegistry(tmp_path / f"registry-{len(started)}", user)
        started.append(registry)
        registry.start()
        return registry

    yield make
    for registry in started:
        registry.stop()


@pytest.fixture
def fault_proxy(make_registry: Callable[..., LocalRegistry]) -> Iterator[FaultProxy]:
    proxy = FaultProxy(make_registry())
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def lab_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry shared by the session: the per-platform test images live in it."""
    require_lab(shutil.which("docker-registry") is not None, "Debian's docker-registry")
    root = tmp_path_factory.mktemp("lab-registry")
    cached = publish_images_cache() / "storage"
    if cached.is_dir():  # the test images of an earlier session: no build needed
        shutil.copytree(cached, root / "storage")
    registry = LocalRegistry(root)
    registry.start()
    yield registry
    registry.stop()


TEST_IMAGE_DOCKERFILE = """\
FROM --platform=$BUILDPLATFORM debian:trixie AS gen
ARG TARGETPLATFORM
ARG VERSION
ARG FLAVOUR
RUN printf '%s %s %s\\n' "$TARGETPLATFORM" "$VERSION" "$FLAVOUR" > /payload.txt
FROM scratch
ARG VERSION
ARG REVISION
COPY --from=gen /payload.txt /payload.txt
LABEL org.opencontainers.image.version=$VERSION org.opencontainers.image.revision=$REVISION
"""


@dataclass(frozen=True)
class LabRelease:
    """Per-platform digests of one tiny real image, pushed to `repository` platform by platform."""

    version: str
    commit: str
    repository: str  # 127.0.0.1:<port>/src
    digests: dict[str, str]  # platform -> pushed digest (an index: image + provenance)
    manifests: dict[str, str]  # platform -> the image manifest's digest inside that index


def release_commit(version: str, flavour: str = "") -> str:
    return hashlib.sha1(f"llama.cpp {version} {flavour}".encode()).hexdigest()


def build_test_release(
    registry: LocalRegistry, context: Path, version: str, flavour: str = "", commit: str = ""
) -> LabRelease:
    commit = commit or release_commit(version)
    repository = f"{registry.host}/src"
    digests: dict[str, str] = {}
    manifests: dict[str, str] = {}
    for platform in ("linux/amd64", "linux/arm64"):
        arch = platform.split("/")[1]
        metadata = context / f"metadata-{version}{flavour}-{arch}.json"
        name = f"{repository}:{version}{flavour}-{arch}"
        subprocess.run(
            [
                "docker",
                "buildx",
                "build",
                "--platform",
                platform,
                "--provenance=mode=min",
                "--build-arg",
                f"VERSION={version}",
                "--build-arg",
                f"REVISION={commit}",
                "--build-arg",
                f"FLAVOUR={flavour}",
                "--output",
                f"type=image,name={name},push=true",
                "--metadata-file",
                str(metadata),
                str(context),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        digests[platform] = json.loads(metadata.read_text())["containerimage.digest"]
        pushed = f"{repository}@{digests[platform]}"
        index = subprocess.run(
            ["docker", "buildx", "imagetools", "inspect", "--raw", pushed],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        manifests[platform] = next(
            m["digest"]
            for m in json.loads(index.stdout)["manifests"]
            if m.get("platform", {}).get("architecture") == arch
        )
        # The engine keeps a copy under this name; the registry's copy is what tests use.
        subprocess.run(["docker", "image", "rm", name], capture_output=True, check=False)
    return LabRelease(version, commit, repository, digests, manifests)


@pytest.fixture(scope="session")
def test_releases(
    docker_engine: None, lab_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LabRelease]:
    """Tiny real releases (linux/amd64 + linux/arm64 each) in lab_registry's `src` repository.

    Keys: the version, or `<version>+rebuild` for a second, different build of 1.1.0.
    """
    cache = publish_images_cache()
    repository = f"{lab_registry.host}/src"
    if (cache / "releases.json").is_file():
        saved = json.loads((cache / "releases.json").read_text())
        releases = {k: LabRelease(**(v | {"repository": repository})) for k, v in saved.items()}
        present = all(
            httpx.head(
                f"http://{lab_registry.host}/v2/src/manifests/{d}",
                headers={"Accept": "application/vnd.oci.image.index.v1+json"},
            ).status_code
            == 200
            for release in releases.values()
            for d in release.digests.values()
        )
        if present:
            return releases
    context = tmp_path_factory.mktemp("test-image")
    (context / "Dockerfile").write_text(TEST_IMAGE_DOCKERFILE)
    # The machine's one-build-at-a-time lock, held once for the ten small builds; waiting for
    # it is not part of any build's timeout.
    with build_lock():
        releases = {
            v: build_test_release(lab_registry, context, v)
            for v in ("1.0.0", "1.1.0", "1.0.1", "2.0.0-rc.1")
        }
        releases["1.1.0+rebuild"] = build_test_release(
            lab_registry, context, "1.1.0", "-rebuild", releases["1.1.0"].commit
        )
    # Keep them for later sessions on this machine (build/ is not in git): the copy of the
    # storage holds only the `src` repository, pushed so far.
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(lab_registry.root / "storage", partial / "storage")
    (partial / "releases.json").write_text(json.dumps({k: asdict(v) for k, v in releases.items()}))
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)
    return releases


def publish_images_cache() -> Path:
    key = hashlib.sha256(f"{TEST_IMAGE_DOCKERFILE}|releases-v1".encode()).hexdigest()[:12]
    return REPO_ROOT / "build" / "test-cache" / f"publish-images-{key}"


# =====================================================================================
# build (owner: build engineer, issue 3): the checkout's real pinned snapshot and the real
# cpu images, built through pipeline.build.build (the same path as `nox -s build -- <arch>`,
# reports in build/reports/). Unchanged inputs hit BuildKit's cache: a rebuild takes seconds.
# Builds take /tmp/lab-docker-build.lock: the machine has 2 cores, one build at a time.
# =====================================================================================

from typing import TYPE_CHECKING  # noqa: E402 (this section's own import)

if TYPE_CHECKING:
    from pipeline.build import BuildResult

BUILD_LOCK = Path("/tmp/lab-docker-build.lock")
# Tests build the portable `baseline` CPU kernels (about half the compile time of `all`, to
# keep CI within budget); LLAMA_TEST_CPU_VARIANTS=all tests what releases ship.
TEST_CPU_VARIANTS = os.environ.get("LLAMA_TEST_CPU_VARIANTS", "baseline")


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Hold the machine's one-build-at-a-time lock (the same lock `flock` takes)."""
    with BUILD_LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def pinned_snapshot(upstream_mirror: Path) -> Path:
    """third_party/llama.cpp of the checkout at version.json's pin (synced from the lab's
    upstream mirror when missing or stale; a no-op when it verifies)."""
    from pipeline.config import Project
    from pipeline.sync import sync

    project = Project(REPO_ROOT)
    sync(project, remote=f"file://{upstream_mirror}")
    return project.third_party


@pytest.fixture(scope="session")
def backend_image(docker_engine: None, pinned_snapshot: Path) -> Callable[[str, str], BuildResult]:
    """Factory: backend_image("cpu" | "vulkan", "amd64" | "linux/arm64") -> BuildResult.

    Builds (--load, TEST_CPU_VARIANTS) once per backend and platform per session and writes
    build/reports/build-<backend>-<arch>.json; the image is `result.ref` in the local engine.
    """
    from pipeline.build import BuildRequest, build
    from pipeline.config import Project
    from pipeline.matrix import normalize_platform

    built: dict[tuple[str, str], BuildResult] = {}

    def image_for(backend: str, platform: str) -> BuildResult:
        key = (backend, normalize_platform(platform))
        if key not in built:
            request = BuildRequest(
                platforms=(key[1],), backends=(backend,), cpu_variants=TEST_CPU_VARIANTS
            )
            with build_lock():
                built[key] = build(Project(REPO_ROOT), request, quiet=True).results[0]
        return built[key]

    return image_for


@pytest.fixture(scope="session")
def cpu_image(
    backend_image: Callable[[str, str], BuildResult],
) -> Callable[[str], BuildResult]:
    """Factory: cpu_image("amd64" | "linux/arm64") -> BuildResult (see backend_image)."""
    return lambda platform: backend_image("cpu", platform)
