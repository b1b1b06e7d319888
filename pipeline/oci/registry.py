"""A small client of the registry HTTP API v2 (what Docker Hub, GHCR and distribution speak).

Reads manifests and indexes (with the Accept headers registries need to return OCI and Docker
lists), reads config blobs for their labels, and writes manifests to tags. Authentication
follows Docker's registry auth spec: an anonymous request, then the challenge in the 401's
`WWW-Authenticate` answered with HTTP Basic or with a bearer token fetched from the realm it
names (Docker Hub's flow). Transient failures are retried with bounded backoff; refused or
missing credentials become one CredentialsError naming the registry and the variables.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.core import console
from pipeline.core.errors import CredentialsError, RegistryError
from pipeline.oci.image import (
    DIGEST_RE,
    DOCKER_HUB,
    MANIFEST_ACCEPT,
    Descriptor,
    Manifest,
    OciLayout,
    config_labels,
    config_platform,
    sha256_digest,
)

DOCKER_HUB_API = "registry-1.docker.io"
# The key `docker login` writes for Docker Hub in config.json; tools look it up by this name.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
# httpx's event hooks, passed through: how a caller (a test) watches each response.
EventHooks = Mapping[str, Sequence[Callable[..., object]]]


def is_loopback(host: str) -> bool:
    """Docker talks plain HTTP to loopback registries by default; so do we (127.0.0.0/8, ::1)."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and a secret, and the names of the variables they came from (for messages)."""

    username: str
    secret: str
    variables: tuple[str, str]

    def __repr__(self) -> str:
        # The secret must never reach a log, a traceback or an assertion message.
        return f"Credentials(username={self.username!r}, from={'/'.join(self.variables)})"

    @property
    def token(self) -> str:
        """`user:secret` in base64: HTTP Basic's credentials and a docker config's `auth`."""
        return base64.b64encode(f"{self.username}:{self.secret}".encode()).decode("ascii")

    def basic(self) -> str:
        return f"Basic {self.token}"


def env_pairs(registry: str) -> list[tuple[str, str]]:
    """Which environment variables hold credentials for `registry`, in order of preference."""
    pairs = [("DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN")] if registry == DOCKER_HUB else []
    return [*pairs, ("REGISTRY_USERNAME", "REGISTRY_PASSWORD")]


def credentials_from_env(registry: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """The first complete pair of variables for `registry`; None means anonymous access."""
    environ = os.environ if env is None else env
    for user_var, secret_var in env_pairs(registry):
        user, secret = environ.get(user_var, ""), environ.get(secret_var, "")
        if user and secret:
            return Credentials(user, secret, (user_var, secret_var))
        if user or secret:
            have, lack = (user_var, secret_var) if user else (secret_var, user_var)
            raise CredentialsError(
                f"{have} is set but {lack} is not (credentials for {registry})",
                "set both, or neither for anonymous access",
            )
    return None


def credentials_from_docker_config(
    registry: str, config_dir: Path | None = None
) -> Credentials | None:
    """What `docker login` (or docker/login-action) stored in config.json's `auths` for
    `registry`; credential helpers are not asked. None when there is nothing."""
    directory = config_dir or Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    path = directory / "config.json"
    try:
        auths = json.loads(path.read_text(encoding="utf-8")).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    key = DOCKER_HUB_CONFIG_KEY if registry == DOCKER_HUB else registry
    entry = auths.get(key) if isinstance(auths, dict) else None
    token = entry.get("auth") if isinstance(entry, dict) else None
    if not isinstance(token, str) or not token:
        return None
    try:
        user, sep, secret = base64.b64decode(token).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return Credentials(user, secret, (str(path), "auths")) if sep and user and secret else None


def registry_credentials(
    registry: str, env: Mapping[str, str] | None = None, config_dir: Path | None = None
) -> Credentials | None:
    """Credentials for `registry`: the environment's first, else docker's config.json."""
    return credentials_from_env(registry, env) or credentials_from_docker_config(
        registry, config_dir
    )


def _wanted(registry: str) -> str:
    return " and ".join("/".join(pair) for pair in env_pairs(registry)[:1])


@dataclass(frozen=True)
class PlatformImage:
    platform: str
    digest: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class ImageSummary:
    """What a tag points to: its digest and, per platform, the manifest digest and labels."""

    digest: str
    media_type: str
    images: list[PlatformImage]
    attestations: int

    @property
    def platforms(self) -> list[str]:
        return [image.platform for image in self.images]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: `attempts` tries, sleeping base, 2*base, … up to max_delay."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_delay)
        return float(min(self.base_delay * (2 ** (attempt - 1)), self.max_delay))


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM_RE.findall(rest))


class RegistryClient:
    """One registry, one set of credentials (or none). Use as a context manager."""

    def __init__(
        self,
        registry: str,
        credentials: Credentials | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        plain_http: bool | None = None,
        event_hooks: EventHooks | None = None,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self.retry = retry or RetryPolicy()
        host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        insecure = is_loopback(registry) if plain_http is None else plain_http
        self.base_url = f"{'http' if insecure else 'https'}://{host}"
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            headers={"User-Agent": "llama-server-images-publish"},
            event_hooks={k: list(v) for k, v in (event_hooks or {}).items()},
        )
        # Per scope: the Authorization header value that worked (bearer tokens are scoped).
        self._auth: dict[str, str] = {}
        self._basic = False

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport
    def _send_retrying(
        self, method: str, url: str, headers: Mapping[str, str], content: bytes | None
    ) -> httpx.Response:
        started = time.monotonic()
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            retry_after = None
            try:
                response = self._http.request(method, url, headers=headers, content=content)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code not in RETRY_STATUS:
                    return response
                last = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
            if attempt == self.retry.attempts:
                break
            delay = self.retry.delay(attempt, retry_after)
            console.err.print(
                f"registry {self.registry}: {method} {_path(url)}: {last}; "
                f"retrying in {delay:.1f} s (attempt {attempt + 1}/{self.retry.attempts})"
            )
            time.sleep(delay)
        elapsed = time.monotonic() - started
        raise RegistryError(
            f"registry {self.registry} failed {method} {_path(url)}: {last} "
            f"({self.retry.attempts} attempts over {elapsed:.0f} s)",
            "check that the registry is up and reachable, then re-run: publishing is idempotent",
        )

    def _request(
        self,
        method: str,
        path: str,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        # A path of this registry's, or a whole URL (an upload's Location).
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        for attempt in (1, 2):
            sent = dict(headers or {})
            auth = self._auth.get("*" if self._basic else scope)
            if auth:
                sent["Authorization"] = auth
            response = self._send_retrying(method, url, sent, content)
            if response.status_code == 401 and attempt == 1:
                self._authenticate(response, scope)
                continue
            if response.status_code in (401, 403):
                raise self._refused(response.status_code, scope)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _authenticate(self, response: httpx.Response, scope: str) -> None:
        """Answer a 401's challenge: Basic with our credentials, or a token from the realm."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme, params = _challenge(header)
        if scheme == "basic":
            if self.credentials is None:
                raise self._refused(401, scope)
            self._basic = True
            self._auth["*"] = self.credentials.basic()
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(
                f"registry {self.registry} asked for unsupported authentication {header!r}"
            )
        # One `scope` parameter per scope (a cross-repository mount asks for two).
        query: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", one) for one in scope.split()
        ]
        if "service" in params:
            query.append(("service", params["service"]))
        token_headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        token_url = str(httpx.URL(params["realm"]).copy_merge_params(query))
        answer = self._send_retrying("GET", token_url, token_headers, None)
        if answer.status_code in (401, 403):
            raise self._refused(answer.status_code, scope)
        if answer.status_code != 200:
            raise RegistryError(
                f"token server of {self.registry} answered HTTP {answer.status_code} for {scope}"
            )
        try:
            body = answer.json()
            token = body.get("token") or body.get("access_token")
        except (json.JSONDecodeError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server of {self.registry} returned no token for {scope}")
        self._auth[scope] = f"Bearer {token}"

    def _refused(self, status: int, scope: str) -> CredentialsError:
        what = _describe_scope(scope)
        if self.credentials is None:
            return CredentialsError(
                f"registry {self.registry} requires credentials to {what}, and none are set "
                f"(HTTP {status})",
                f"set {_wanted(self.registry)} in the environment",
            )
        variables = "/".join(self.credentials.variables)
        if status == 401:
            return CredentialsError(
                f"registry {self.registry} refused the credentials in {variables} "
                f"(user {self.credentials.username!r}) to {what} (HTTP 401)",
                f"check {self.credentials.variables[1]}: wrong, expired or revoked",
            )
        return CredentialsError(
            f"registry {self.registry} denied user {self.credentials.username!r} "
            f"(from {variables}) permission to {what} (HTTP 403)",
            "give the token read/write access to the repository, or use another account",
        )

    def _fail(self, response: httpx.Response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = response.json().get("errors") or []
            if errors:
                detail = f": {errors[0].get('code', '')} {errors[0].get('message', '')}".rstrip()
        except (json.JSONDecodeError, AttributeError, IndexError):
            pass
        return RegistryError(
            f"registry {self.registry} answered HTTP {response.status_code} to {what}{detail}"
        )

    # ------------------------------------------------------------------ API
    def ping(self, repository: str, push: bool = False) -> None:
        """Check that we may read (or write) `repository`: raises CredentialsError if not."""
        response = self._request("GET", "/v2/", _scope(repository, push))
        if response.status_code != 200:
            raise self._fail(response, "GET /v2/")

    def _read_manifest(self, method: str, repository: str, reference: str) -> httpx.Response | None:
        """HEAD or GET a manifest by tag or digest: the answer, or None for a 404."""
        path = f"/v2/{repository}/manifests/{reference}"
        headers = {"Accept": MANIFEST_ACCEPT}
        response = self._request(method, path, _scope(repository), headers=headers)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"{method} {path}")
        return response

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """HEAD a tag or digest: its digest, or None when it does not exist."""
        response = self._read_manifest("HEAD", repository, reference)
        if response is None:
            return None
        digest = str(response.headers.get("Docker-Content-Digest", ""))
        if DIGEST_RE.match(digest):
            return digest
        manifest = self.manifest(repository, reference)  # some registries omit the header
        return manifest.digest if manifest else None

    def manifest(self, repository: str, reference: str) -> Manifest | None:
        """GET a manifest or index by tag or digest; None when it does not exist."""
        response = self._read_manifest("GET", repository, reference)
        if response is None:
            return None
        manifest = Manifest.from_bytes(response.content, response.headers.get("Content-Type"))
        expected = reference if DIGEST_RE.match(reference) else None
        expected = expected or response.headers.get("Docker-Content-Digest")
        if expected and expected != manifest.digest:
            raise RegistryError(
                f"registry {self.registry} returned {repository}:{reference} with digest "
                f"{manifest.digest}, expected {expected}"
            )
        return manifest

    def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> str:
        """PUT the exact bytes of `manifest` under a tag (or its digest); returns the digest."""
        path = f"/v2/{repository}/manifests/{reference}"
        response = self._request(
            "PUT",
            path,
            _scope(repository, push=True),
            headers={"Content-Type": manifest.media_type},
            content=manifest.body,
        )
        if response.status_code not in (200, 201):
            raise self._fail(response, f"PUT {path}")
        digest = str(response.headers.get("Docker-Content-Digest", manifest.digest))
        if digest != manifest.digest:
            raise RegistryError(
                f"registry {self.registry} stored {repository}:{reference} as {digest}, "
                f"expected {manifest.digest}"
            )
        return digest

    def blob(self, repository: str, digest: str) -> bytes:
        path = f"/v2/{repository}/blobs/{digest}"
        response = self._request("GET", path, _scope(repository))
        if response.status_code != 200:
            raise self._fail(response, f"GET {path}")
        if sha256_digest(response.content) != digest:
            raise RegistryError(f"registry {self.registry} returned corrupt blob {digest}")
        return response.content

    def has_blob(self, repository: str, digest: str) -> bool:
        path = f"/v2/{repository}/blobs/{digest}"
        response = self._request("HEAD", path, _scope(repository, push=True))
        if response.status_code not in (200, 404):
            raise self._fail(response, f"HEAD {path}")
        return response.status_code == 200

    def push_blob(self, repository: str, digest: str, data: bytes) -> bool:
        """Upload a blob unless the repository has it (monolithic: POST, then PUT with the
        digest); whether anything was sent."""
        if self.has_blob(repository, digest):
            return False
        scope = _scope(repository, push=True)
        start = self._request("POST", f"/v2/{repository}/blobs/uploads/", scope)
        location = start.headers.get("Location")
        if start.status_code != 202 or not location:
            raise self._fail(start, f"POST /v2/{repository}/blobs/uploads/")
        url = httpx.URL(self.base_url).join(location).copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        done = self._request("PUT", str(url), scope, headers=headers, content=data)
        if done.status_code != 201:
            raise self._fail(done, f"PUT /v2/{repository}/blobs/uploads/… ({digest[:19]}…)")
        return True

    def mount_blob(self, repository: str, digest: str, source_repository: str) -> bool:
        """Ask the registry to mount a blob of another of its repositories (no data moves);
        whether it did (a registry may decline and open an upload instead, left unused)."""
        path = f"/v2/{repository}/blobs/uploads/?mount={digest}&from={source_repository}"
        scopes = f"{_scope(repository, push=True)} {_scope(source_repository)}"
        response = self._request("POST", path, scopes)
        if response.status_code not in (201, 202):
            raise self._fail(response, f"POST {path}")
        return response.status_code == 201

    def push_layout(self, repository: str, layout: OciLayout, tags: Sequence[str] = ()) -> Manifest:
        """Push what an OCI layout holds (its image or index, children first, every blob the
        repository lacks) by digest, then under each of `tags`; the top manifest."""
        top = self._push_tree(repository, layout, layout.top)
        for tag in tags:
            self.put_manifest(repository, tag, top)
        return top

    def _push_tree(self, repository: str, layout: OciLayout, descriptor: Descriptor) -> Manifest:
        manifest = layout.manifest(descriptor)
        if manifest.is_index:
            for child in manifest.descriptors:
                self._push_tree(repository, layout, child)
        else:
            for blob in (manifest.config, *manifest.layers):
                self.push_blob(repository, blob.digest, layout.blob(blob.digest))
        if self.manifest_digest(repository, manifest.digest) != manifest.digest:
            self.put_manifest(repository, manifest.digest, manifest)
        return manifest

    def image_config(self, repository: str, manifest: Manifest) -> dict[str, Any]:
        """An image manifest's config blob, decoded (platform, labels, history)."""
        config = json.loads(self.blob(repository, manifest.config.digest))
        if not isinstance(config, dict):
            raise RegistryError(f"config of {manifest.digest} in {repository} is not an object")
        return config

    def platform_images(self, repository: str, manifest: Manifest) -> Iterator[PlatformImage]:
        """Each runnable image of an index (or the one image of a manifest) with its labels."""
        if not manifest.is_index:
            config = self.image_config(repository, manifest)
            yield PlatformImage(
                str(config_platform(config)), manifest.digest, config_labels(config)
            )
            return
        for descriptor in manifest.platform_descriptors:
            child = self.manifest(repository, descriptor.digest)
            if child is None:
                raise RegistryError(
                    f"index {manifest.digest} in {self.registry}/{repository} lists "
                    f"{descriptor.digest}, which the registry does not have"
                )
            labels = config_labels(self.image_config(repository, child))
            yield PlatformImage(str(descriptor.platform), descriptor.digest, labels)

    def summary(self, repository: str, reference: str) -> ImageSummary | None:
        manifest = self.manifest(repository, reference)
        if manifest is None:
            return None
        images = list(self.platform_images(repository, manifest))
        attestations = sum(1 for d in manifest.descriptors if d.is_attestation)
        return ImageSummary(manifest.digest, manifest.media_type, images, attestations)

    def labels(self, repository: str, reference: str) -> tuple[str, dict[str, str]] | None:
        """(digest, labels of its first image) for a tag; None if the tag is absent."""
        manifest = self.manifest(repository, reference)
        if manifest is None:
            return None
        for image in self.platform_images(repository, manifest):
            return manifest.digest, dict(image.labels)
        return manifest.digest, {}


def _scope(repository: str, push: bool = False) -> str:
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


def _describe_scope(scope: str) -> str:
    # Of several scopes (a mount), the first is the repository written to.
    _, repository, actions = [*scope.split()[0].split(":"), "", ""][:3]
    verb = "push to" if "push" in actions else "read"
    return f"{verb} {repository}"


def _path(url: str) -> str:
    parsed = httpx.URL(url)
    return parsed.path
