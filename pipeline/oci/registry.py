"""A small client of the registry HTTP API v2 (what Docker Hub, GHCR and distribution speak).

Reads manifests and indexes (with the Accept headers registries need to return OCI and Docker
lists), reads config blobs for their labels, and writes manifests to tags. Authentication
follows Docker's registry auth spec: an anonymous request, then the challenge in the 401's
`WWW-Authenticate` answered with HTTP Basic or with a bearer token fetched from the realm it
names (Docker Hub's flow). Transient failures are retried with bounded backoff; refused or
missing credentials become one CredentialsError naming the registry and the variables.

Credentials go to this registry's own origin only: never Basic over plain HTTP to a host that
is not loopback, a token realm only over HTTPS (plain HTTP for a loopback registry and realm)
and only on the registry's own host or one named for it (pipeline/oci/credentials.py), never
with a request to another origin (an upload's Location, a redirect). Whatever a registry
answers, a malformed answer is one RegistryError (exit 10), never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from pipeline.core import console
from pipeline.core.errors import CredentialsError, RegistryError
from pipeline.oci.credentials import (
    DOCKER_HUB_CONFIG_KEY,
    HUB_PAIR,
    KNOWN_TOKEN_HOSTS,
    REGISTRY_HOST_ENV,
    REGISTRY_PAIR,
    TOKEN_HOSTS_ENV,
    Credentials,
    RegistryAccess,
)
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

__all__ = [
    "DOCKER_HUB_CONFIG_KEY",
    "Credentials",
    "ImageSummary",
    "PlatformImage",
    "RegistryAccess",
    "RegistryClient",
    "RetryPolicy",
    "is_loopback",
]

DOCKER_HUB_API = "registry-1.docker.io"

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
# What a bearer token may hold (RFC 6750's b64token, and the dots and padding of a JWT): a
# token with anything else (a line break) would make a header of its own.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9\-._~+/]+=*\Z")
# httpx's event hooks, passed through: how a caller (a test) watches each response.
EventHooks = Mapping[str, Sequence[Callable[..., object]]]


def _host_name(host: str) -> str:
    """`host:port` or `[v6]:port` without the port."""
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Docker talks plain HTTP to loopback registries by default; so do we (127.0.0.0/8, ::1)."""
    name = _host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
    """One registry, one set of credentials (or none). Use as a context manager.

    `token_hosts`: hosts besides the registry's own that may receive its credentials to issue
    tokens (Docker Hub's is known)."""

    def __init__(
        self,
        registry: str,
        credentials: Credentials | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        plain_http: bool | None = None,
        token_hosts: Collection[str] = (),
        event_hooks: EventHooks | None = None,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self.retry = retry or RetryPolicy()
        host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        insecure = is_loopback(registry) if plain_http is None else plain_http
        self.base_url = f"{'http' if insecure else 'https'}://{host}"
        self._origin = _origin(httpx.URL(self.base_url))
        self.token_hosts = frozenset(
            {_host_name(host), *KNOWN_TOKEN_HOSTS.get(registry, ()), *token_hosts}
        )
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
            headers={"User-Agent": "llama-server-images-publish"},
            event_hooks={k: list(v) for k, v in (event_hooks or {}).items()},
        )
        # Per scope: the Authorization header value that worked (bearer tokens are scoped).
        self._auth: dict[str, str] = {}
        self._basic = False

    @classmethod
    def for_access(cls, registry: str, access: RegistryAccess, **options: Any) -> RegistryClient:
        """A client of `registry` with the credentials that belong to it, and no others."""
        credentials = access.credentials(registry)
        return cls(registry, credentials, token_hosts=access.token_hosts, **options)

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
            except (httpx.RequestError, httpx.InvalidURL) as exc:
                # A redirect loop, a body that does not decode, a Location that is no URL:
                # the same again next time, so not retried.
                raise RegistryError(
                    f"registry {self.registry}: {method} {_path(url)}: unusable answer "
                    f"({type(exc).__name__}: {exc})",
                    "the registry (or a proxy before it) answers wrongly: check its address",
                ) from None
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
        own = _origin(_url(url, self.registry)) == self._origin
        for attempt in (1, 2):
            sent = dict(headers or {})
            auth = self._auth.get("*" if self._basic else scope)
            if auth and own:  # credentials and tokens go to this registry's origin only
                sent["Authorization"] = auth
            response = self._send_retrying(method, url, sent, content)
            if response.status_code == 401 and not own:
                raise CredentialsError(
                    f"registry {self.registry} sent {method} {_path(url)} to another origin "
                    f"({_url(url, self.registry).host}), which asks for credentials: they "
                    f"are only sent to {self.registry}",
                    "configure the registry to answer on its own address",
                )
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
            if self.base_url.startswith("http:") and not is_loopback(self.registry):
                raise CredentialsError(
                    f"registry {self.registry} asks for a password over plain HTTP; "
                    f"{'/'.join(self.credentials.variables)} are not sent unencrypted",
                    "reach the registry over HTTPS",
                )
            self._basic = True
            self._auth["*"] = self.credentials.basic()
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(
                f"registry {self.registry} asked for unsupported authentication {header!r}"
            )
        realm = self._realm(params["realm"])
        # One `scope` parameter per scope (a cross-repository mount asks for two).
        query: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", one) for one in scope.split()
        ]
        if "service" in params:
            query.append(("service", params["service"]))
        token_headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        token_url = str(realm.copy_merge_params(query))
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
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not _TOKEN_RE.match(token):
            raise RegistryError(f"token server of {self.registry} returned no token for {scope}")
        self._auth[scope] = f"Bearer {token}"

    def _realm(self, realm: str) -> httpx.URL:
        """The token realm a challenge names, if it may be asked: HTTPS (plain HTTP only from
        a loopback registry to a loopback realm) and, when credentials go with the request,
        on this registry's host or one named for it."""
        url = _url(realm, self.registry)
        host = url.host or ""
        if url.scheme != "https" and not (
            url.scheme == "http" and is_loopback(self.registry) and is_loopback(host)
        ):
            raise RegistryError(
                f"registry {self.registry} names the token realm {realm!r}, which is not HTTPS: "
                "refused",
                "a registry's token server must be reached over HTTPS",
            )
        if self.credentials is not None and host not in self.token_hosts:
            raise CredentialsError(
                f"registry {self.registry} names a token realm on another host, {host}: "
                f"{'/'.join(self.credentials.variables)} are not sent there",
                f"if {host} issues {self.registry}'s tokens, name it in {TOKEN_HOSTS_ENV}",
            )
        return url

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
        """The registry's error answer as one line, with its first `errors` entry when it
        gives one in the spec's shape (anything else in the body is left out)."""
        detail = ""
        try:
            errors = response.json().get("errors")
        except (ValueError, AttributeError, RecursionError):
            errors = None
        first = errors[0] if isinstance(errors, list) and errors else None
        if isinstance(first, dict):
            code, message = first.get("code", ""), first.get("message", "")
            detail = f": {code} {message}"[:300].rstrip() if isinstance(code, str) else ""
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
        try:
            url = httpx.URL(self.base_url).join(location).copy_merge_params({"digest": digest})
        except httpx.InvalidURL:
            raise RegistryError(
                f"registry {self.registry} gave an upload location that is no URL: {location!r}"
            ) from None
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
        try:
            config = json.loads(self.blob(repository, manifest.config.digest))
        except (ValueError, RecursionError):
            config = None
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


def _wanted(registry: str) -> str:
    if registry == DOCKER_HUB:
        return "/".join(HUB_PAIR)
    return f"{'/'.join(REGISTRY_PAIR)} with {REGISTRY_HOST_ENV}={registry}"


def _describe_scope(scope: str) -> str:
    # Of several scopes (a mount), the first is the repository written to.
    _, repository, actions = [*scope.split()[0].split(":"), "", ""][:3]
    verb = "push to" if "push" in actions else "read"
    return f"{verb} {repository}"


def _url(text: str, registry: str) -> httpx.URL:
    try:
        return httpx.URL(text)
    except httpx.InvalidURL:
        raise RegistryError(
            f"registry {registry} answered with {text!r}, which is no URL"
        ) from None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _path(url: str) -> str:
    try:
        return httpx.URL(url).path
    except httpx.InvalidURL:
        return url[:80]
