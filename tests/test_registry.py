"""pipeline.oci.registry against real registries: Debian's docker-registry on loopback ports."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures.lab import require_lab
from fixtures.registry import (
    FaultProxy,
    LabRelease,
    LocalRegistry,
    TokenServer,
    non_loopback_address,
)

from pipeline import cli
from pipeline.core.errors import CredentialsError, RegistryError, UsageError
from pipeline.oci.credentials import RegistryAccess, credentials_from_env
from pipeline.oci.image import (
    DOCKER_HUB,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_INDEX,
    ImageName,
    Manifest,
    sha256_digest,
    split_reference,
)
from pipeline.oci.registry import (
    Credentials,
    RegistryClient,
    RetryPolicy,
    is_loopback,
)

FAST = RetryPolicy(attempts=4, base_delay=0.1, max_delay=0.5)


# ---------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize(
    ("name", "registry", "repository"),
    [
        ("docker.io/acme/llama-server", DOCKER_HUB, "acme/llama-server"),
        ("acme/llama-server", DOCKER_HUB, "acme/llama-server"),
        ("debian", DOCKER_HUB, "library/debian"),
        ("index.docker.io/acme/x", DOCKER_HUB, "acme/x"),
        ("ghcr.io/acme/team/llama-server", "ghcr.io", "acme/team/llama-server"),
        ("127.0.0.1:5000/x/y", "127.0.0.1:5000", "x/y"),
        ("localhost/x", "localhost", "x"),
    ],
)
def test_image_names_are_normalised_like_docker(name: str, registry: str, repository: str) -> None:
    assert ImageName.parse(name) == ImageName(registry, repository)


def test_references_split_into_name_and_tag_or_digest() -> None:
    digest = "sha256:" + "c" * 64
    assert split_reference(f"127.0.0.1:5000/x@{digest}") == (
        ImageName("127.0.0.1:5000", "x"),
        digest,
    )
    assert split_reference("127.0.0.1:5000/x:1.0") == (ImageName("127.0.0.1:5000", "x"), "1.0")
    assert split_reference("127.0.0.1:5000/x") == (ImageName("127.0.0.1:5000", "x"), "latest")
    with pytest.raises(RegistryError):
        split_reference("x@sha256:short")


def test_loopback_registries_speak_plain_http() -> None:
    assert is_loopback("127.0.0.1:5000") and is_loopback("127.3.2.1") and is_loopback("[::1]:80")
    assert is_loopback("localhost:5000")
    assert not is_loopback("ghcr.io") and not is_loopback("10.0.0.1:5000")
    assert RegistryClient("127.0.0.1:5000").base_url == "http://127.0.0.1:5000"
    assert RegistryClient(DOCKER_HUB).base_url == "https://registry-1.docker.io"
    assert RegistryClient("ghcr.io").base_url == "https://ghcr.io"


def test_credentials_come_from_the_environment_in_pairs() -> None:
    hub = {"DOCKERHUB_USERNAME": "hubuser", "DOCKERHUB_TOKEN": "t0k"}
    other = {"REGISTRY_USERNAME": "reguser", "REGISTRY_PASSWORD": "pw"}
    assert credentials_from_env("ghcr.io", {}, "ghcr.io") is None
    creds = credentials_from_env(DOCKER_HUB, {**hub, **other}, DOCKER_HUB)
    assert creds is not None and creds.username == "hubuser"
    assert creds.variables == ("DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN")
    creds = credentials_from_env("ghcr.io", {**hub, **other}, "ghcr.io")
    assert creds is not None and creds.username == "reguser"
    hub_only = credentials_from_env(DOCKER_HUB, hub, DOCKER_HUB)
    assert "pw" not in repr(creds) and "t0k" not in repr(hub_only)
    with pytest.raises(CredentialsError, match="REGISTRY_PASSWORD is set but REGISTRY_USERNAME"):
        credentials_from_env("ghcr.io", {"REGISTRY_PASSWORD": "pw"}, "ghcr.io")
    with pytest.raises(CredentialsError, match="DOCKERHUB_USERNAME is set but DOCKERHUB_TOKEN"):
        credentials_from_env(DOCKER_HUB, {"DOCKERHUB_USERNAME": "u", **other}, DOCKER_HUB)


def test_registry_credentials_belong_to_one_registry(tmp_path: Path) -> None:
    """REGISTRY_USERNAME/PASSWORD go to REGISTRY_HOST (default: version.json's image's
    registry) and to no other; DOCKERHUB_* to Docker Hub; config.json's entries to the
    registry each is filed under."""
    pair = {"REGISTRY_USERNAME": "reguser", "REGISTRY_PASSWORD": "pw"}
    config = tmp_path / "docker"
    config.mkdir()
    (config / "config.json").write_text(
        json.dumps({"auths": {"ghcr.io": {"auth": base64.b64encode(b"cfguser:s3").decode()}}})
    )
    env = {**pair, "DOCKER_CONFIG": str(config)}
    access = RegistryAccess.from_env(DOCKER_HUB, env)
    assert access.home == DOCKER_HUB
    creds = access.credentials(DOCKER_HUB)
    assert creds is not None and creds.username == "reguser"
    for foreign in ("evil.example", "127.0.0.1:5000", "registry-1.docker.io.evil.example"):
        assert access.credentials(foreign) is None, foreign
    # config.json's entry is for ghcr.io: it goes there, REGISTRY_* do not.
    creds = access.credentials("ghcr.io")
    assert creds is not None and creds.username == "cfguser"
    moved = RegistryAccess.from_env(DOCKER_HUB, {**env, "REGISTRY_HOST": "GHCR.io"})
    creds = moved.credentials("ghcr.io")
    assert moved.home == "ghcr.io" and creds is not None and creds.username == "reguser"
    assert moved.credentials(DOCKER_HUB) is None
    # Docker Hub's aliases are Docker Hub.
    assert RegistryAccess.from_env("x.io", {"REGISTRY_HOST": "index.docker.io"}).home == DOCKER_HUB
    for bad in ("ghcr.io/acme", "evil host", "a\nb", "-x"):
        with pytest.raises(UsageError) as caught:
            RegistryAccess.from_env(DOCKER_HUB, {"REGISTRY_HOST": bad})
        assert caught.value.exit_code == 2 and "REGISTRY_HOST" in caught.value.line()
    with pytest.raises(UsageError, match="REGISTRY_TOKEN_HOSTS"):
        RegistryAccess.from_env(DOCKER_HUB, {"REGISTRY_TOKEN_HOSTS": "auth.example, bad host"})
    hosts = RegistryAccess.from_env(DOCKER_HUB, {"REGISTRY_TOKEN_HOSTS": "Auth.Example:8443,x.io"})
    assert hosts.token_hosts == ("auth.example", "x.io")


# ---------------------------------------------------------------------------- real registry


@pytest.mark.docker
def test_reads_indexes_platform_manifests_and_labels(
    test_releases: dict[str, LabRelease], lab_registry: LocalRegistry
) -> None:
    release = test_releases["1.0.0"]
    with RegistryClient(lab_registry.host) as client:
        for platform, digest in release.digests.items():
            arch = platform.split("/")[1]
            assert client.manifest_digest("src", f"1.0.0-{arch}") == digest
            summary = client.summary("src", digest)
            assert summary is not None
            assert summary.media_type == MEDIA_OCI_INDEX
            assert summary.platforms == [platform]
            assert summary.attestations == 1  # the provenance BuildKit attached
            labels = summary.images[0].labels
            assert labels["org.opencontainers.image.revision"] == release.commit
            assert labels["org.opencontainers.image.version"] == "1.0.0"
            labels = client.labels("src", digest)
            assert labels is not None and labels[0] == digest
            assert labels[1]["org.opencontainers.image.version"] == "1.0.0"
        assert client.manifest_digest("src", "no-such-tag") is None
        assert client.manifest("nothing/here", "latest") is None


@pytest.mark.docker
def test_docker_manifest_lists_are_read_and_written_byte_exact(
    test_releases: dict[str, LabRelease], lab_registry: LocalRegistry
) -> None:
    """A Docker-media-type list (what older tools push) round-trips with its own digest."""
    release = test_releases["1.1.0"]
    with RegistryClient(lab_registry.host) as client:
        entries: list[dict[str, Any]] = []
        for digest in release.digests.values():
            index = client.manifest("src", digest)
            assert index is not None
            for d in index.platform_descriptors:
                assert d.platform is not None
                entries.append(
                    {
                        "mediaType": d.media_type,
                        "digest": d.digest,
                        "size": d.size,
                        "platform": {"os": d.platform.os, "architecture": d.platform.architecture},
                    }
                )
        body = json.dumps(
            {"schemaVersion": 2, "mediaType": MEDIA_DOCKER_LIST, "manifests": entries}, indent=3
        ).encode()
        manifest = Manifest.from_bytes(body)
        assert client.put_manifest("src", "docker-list", manifest) == manifest.digest
        got = client.manifest("src", "docker-list")
        assert got is not None and got.body == body and got.media_type == MEDIA_DOCKER_LIST
        summary = client.summary("src", "docker-list")
        assert summary is not None and sorted(summary.platforms) == sorted(release.digests)


@pytest.mark.docker
def test_basic_auth_wrong_missing_and_right(make_registry: Any) -> None:
    registry: LocalRegistry = make_registry(user=("alice", "correct horse"))
    right = Credentials("alice", "correct horse", ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    wrong = Credentials("alice", "battery staple", ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    with RegistryClient(registry.host, right) as client:
        client.ping("team/app")
        assert client.manifest_digest("team/app", "latest") is None
    with RegistryClient(registry.host, wrong) as client, pytest.raises(CredentialsError) as err:
        client.manifest_digest("team/app", "latest")
    line = err.value.line()
    assert f"registry {registry.host} refused the credentials in REGISTRY_USERNAME/" in line
    assert "battery" not in line
    with RegistryClient(registry.host) as client, pytest.raises(CredentialsError) as err:
        client.ping("team/app")
    assert "requires credentials to read team/app, and none are set" in err.value.line()
    assert "REGISTRY_USERNAME/REGISTRY_PASSWORD" in err.value.line()


@pytest.mark.docker
def test_5xx_answers_are_retried(
    fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    fault_proxy.fail_next(2)
    statuses: list[int] = []
    hooks = {"response": [lambda response: statuses.append(response.status_code)]}
    with RegistryClient(fault_proxy.host, retry=FAST, event_hooks=hooks) as client:
        assert client.manifest_digest("x/y", "latest") is None
    assert statuses == [503, 503, 404]
    assert "HTTP 503; retrying" in capsys.readouterr().err


@pytest.mark.docker
def test_retries_are_bounded_and_the_failure_is_one_clear_line(fault_proxy: FaultProxy) -> None:
    fault_proxy.registry.stop()
    started = time.monotonic()
    with RegistryClient(fault_proxy.host, retry=FAST) as client, pytest.raises(RegistryError) as e:
        client.manifest_digest("x/y", "latest")
    assert time.monotonic() - started < 5
    line = e.value.line()
    assert f"registry {fault_proxy.host} failed HEAD /v2/x/y/manifests/latest" in line
    assert "4 attempts" in line and "\n" not in line


@pytest.mark.docker
def test_a_registry_restarted_within_the_backoff_is_recovered(make_registry: Any) -> None:
    registry: LocalRegistry = make_registry()
    registry.stop()
    restart = threading.Timer(0.5, registry.start)
    restart.start()
    try:
        policy = RetryPolicy(attempts=6, base_delay=0.2, max_delay=1.0)
        with RegistryClient(registry.host, retry=policy) as client:
            assert client.manifest_digest("x/y", "latest") is None
    finally:
        restart.join()


@pytest.mark.docker
def test_bearer_token_flow_like_docker_hub(
    token_registry: tuple[LocalRegistry, TokenServer],
) -> None:
    registry, tokens = token_registry
    variables = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD")
    with RegistryClient(registry.host, Credentials("publisher", "t0ken-secret", variables)) as c:
        c.ping("team/app", push=True)
        assert c.manifest_digest("team/app", "latest") is None
    assert ("publisher", "repository:team/app:pull,push") in tokens.issued
    assert ("publisher", "repository:team/app:pull") in tokens.issued

    wrong = Credentials("publisher", "not-the-token", variables)
    with RegistryClient(registry.host, wrong) as client, pytest.raises(CredentialsError) as err:
        client.manifest_digest("team/app", "latest")
    assert f"registry {registry.host} refused the credentials in REGISTRY_USERNAME/" in (
        err.value.line()
    )
    # Anonymous: the token server hands out a token without rights, the registry says no.
    with RegistryClient(registry.host) as client, pytest.raises(CredentialsError) as err:
        client.manifest_digest("team/app", "latest")
    assert "requires credentials to read team/app" in err.value.line()


# ---------------------------------------------------------------------------- where credentials go
ALICE = ("alice", "correct horse")
ALICE_ENV = {"REGISTRY_USERNAME": ALICE[0], "REGISTRY_PASSWORD": ALICE[1]}


class Sent:
    """Every request a client sends, as (host, whether it carried an Authorization header):
    an httpx event hook, so what is seen is what went out on the socket."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bool]] = []

    @property
    def hooks(self) -> dict[str, list[Any]]:
        return {
            "request": [lambda r: self.requests.append((r.url.host, "authorization" in r.headers))]
        }

    def authorized_hosts(self) -> set[str]:
        return {host for host, authorized in self.requests if authorized}


@pytest.mark.docker
def test_registry_credentials_never_go_to_another_registry(make_registry: Any) -> None:
    """Two registries that would both take alice's password: the one REGISTRY_HOST names gets
    it; the other one, named by a build record or an image reference, is asked anonymously."""
    home: LocalRegistry = make_registry(user=ALICE)
    other: LocalRegistry = make_registry(user=ALICE)
    access = RegistryAccess.from_env(DOCKER_HUB, {**ALICE_ENV, "REGISTRY_HOST": home.host})
    sent = Sent()
    with RegistryClient.for_access(home.host, access, event_hooks=sent.hooks) as client:
        client.ping("team/app", push=True)
    assert sent.authorized_hosts() == {"127.0.0.1"}
    sent = Sent()
    with (
        RegistryClient.for_access(other.host, access, event_hooks=sent.hooks) as client,
        pytest.raises(CredentialsError) as err,
    ):
        client.ping("team/app")
    assert sent.requests and not sent.authorized_hosts()
    line = err.value.line()
    assert "requires credentials to read team/app, and none are set" in line
    assert f"REGISTRY_HOST={other.host}" in line and ALICE[1] not in line


@pytest.mark.docker
def test_a_token_realm_on_another_host_gets_no_credentials_unless_named(
    make_token_registry: Any,
) -> None:
    """The realm says `localhost`, the registry is reached at 127.0.0.1: another host name,
    so the password is not sent there until REGISTRY_TOKEN_HOSTS names it."""
    registry, tokens = make_token_registry(realm_host="localhost")
    creds = Credentials("publisher", "t0ken-secret", ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    with RegistryClient(registry.host, creds) as client, pytest.raises(CredentialsError) as err:
        client.ping("team/app")
    assert tokens.requests == 0
    line = err.value.line()
    assert "token realm on another host, localhost" in line and "REGISTRY_TOKEN_HOSTS" in line
    with RegistryClient(registry.host, creds, token_hosts=("localhost",)) as client:
        client.ping("team/app", push=True)
    assert ("publisher", "repository:team/app:pull,push") in tokens.issued
    # Anonymous: nothing to leak, the realm is asked (and gives no rights).
    with RegistryClient(registry.host) as client, pytest.raises(CredentialsError) as err:
        client.manifest_digest("team/app", "latest")
    assert "none are set" in err.value.line() and tokens.requests > 0


@pytest.mark.docker
def test_a_token_realm_over_plain_http_off_loopback_is_refused(
    make_token_registry: Any,
) -> None:
    address = non_loopback_address()
    require_lab(address is not None, "a non-loopback IPv4 address on this machine")
    assert address is not None
    registry, tokens = make_token_registry(address=address)
    creds = Credentials("publisher", "t0ken-secret", ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    for credentials in (creds, None):
        with (
            RegistryClient(registry.host, credentials, token_hosts=(address,)) as client,
            pytest.raises(RegistryError) as err,
        ):
            client.ping("team/app")
        assert f"token realm 'http://{address}:" in err.value.line()
        assert "not HTTPS" in err.value.line() and err.value.exit_code == 10
    assert tokens.requests == 0


@pytest.mark.docker
def test_no_basic_credentials_over_plain_http_off_loopback(make_registry: Any) -> None:
    address = non_loopback_address()
    require_lab(address is not None, "a non-loopback IPv4 address on this machine")
    registry: LocalRegistry = make_registry(user=ALICE, address=address)
    creds = Credentials(*ALICE, ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    sent = Sent()
    with (
        RegistryClient(registry.host, creds, plain_http=True, event_hooks=sent.hooks) as client,
        pytest.raises(CredentialsError) as err,
    ):
        client.ping("team/app")
    assert sent.requests and not sent.authorized_hosts()
    assert "over plain HTTP" in err.value.line() and ALICE[1] not in err.value.line()


@pytest.mark.docker
def test_an_upload_location_on_another_origin_gets_no_credentials(make_registry: Any) -> None:
    """The registry hands out upload URLs on `localhost` (distribution's http.host) while it
    is reached at 127.0.0.1: the upload is not sent alice's password."""
    registry: LocalRegistry = make_registry(user=ALICE, external="http://localhost:{port}")
    creds = Credentials(*ALICE, ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    sent = Sent()
    data = b"a blob"
    with (
        RegistryClient(registry.host, creds, event_hooks=sent.hooks) as client,
        pytest.raises(CredentialsError) as err,
    ):
        client.push_blob("team/app", sha256_digest(data), data)
    assert ("localhost", False) in sent.requests
    assert sent.authorized_hosts() == {"127.0.0.1"}
    assert "to another origin (localhost)" in err.value.line()


# ---------------------------------------------------------------------------- malformed answers
def _http(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


INDEX = "application/vnd.oci.image.index.v1+json"
MALFORMED = {
    "errors-object": (
        "GET /v2/x/y/manifests/",
        _http(
            "400 Bad Request",
            b'{"errors": {"code": "MANIFEST_INVALID", "message": "no"}}',
            "Content-Type: application/json",
        ),
        "answered HTTP 400",
    ),
    "errors-strings": (
        "GET /v2/x/y/manifests/",
        _http("400 Bad Request", b'{"errors": ["boom"]}', "Content-Type: application/json"),
        "answered HTTP 400",
    ),
    "bad-gzip": (
        "GET /v2/x/y/manifests/",
        _http("200 OK", b"this is not gzip", "Content-Encoding: gzip", f"Content-Type: {INDEX}"),
        "DecodingError",
    ),
    "redirect-loop": (
        "GET /v2/x/y/manifests/",
        _http("302 Found", b"", "Location: /v2/x/y/manifests/latest"),
        "TooManyRedirects",
    ),
    "not-utf8": (
        "GET /v2/x/y/manifests/",
        _http("200 OK", b"\xff\xfe{}", f"Content-Type: {INDEX}"),
        "manifest is not JSON",
    ),
    "deep-json": (
        "GET /v2/x/y/manifests/",
        _http("200 OK", b"[" * 100_000 + b"]" * 100_000, f"Content-Type: {INDEX}"),
        "manifest is not JSON",
    ),
    "descriptor-size": (
        "GET /v2/x/y/manifests/",
        _http(
            "200 OK",
            json.dumps(
                {"mediaType": INDEX, "manifests": [{"digest": "sha256:" + "a" * 64, "size": "big"}]}
            ).encode(),
            f"Content-Type: {INDEX}",
        ),
        "has the size 'big'",
    ),
    "descriptor-not-a-mapping": (
        "GET /v2/x/y/manifests/",
        _http("200 OK", json.dumps({"manifests": ["sha256:x"]}).encode(), f"Content-Type: {INDEX}"),
        "not a descriptor",
    ),
    "manifests-not-a-list": (
        "GET /v2/x/y/manifests/",
        _http("200 OK", json.dumps({"manifests": {"a": 1}}).encode(), f"Content-Type: {INDEX}"),
        "'manifests' is not a list",
    ),
    "realm-not-a-url": (
        "GET /v2/x/y/manifests/",
        _http("401 Unauthorized", b"", 'WWW-Authenticate: Bearer realm="http://[::1:bad/token"'),
        "which is no URL",
    ),
}


@pytest.mark.docker
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_registry_answer_is_one_registry_error(
    case: str, fault_proxy: FaultProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the command line: `verify` reads the image's index first, and the registry's
    answer is malformed: exit 10, one line, no traceback."""
    pattern, response, words = MALFORMED[case]
    fault_proxy.answer(pattern, response)
    key = tmp_path / "cosign.pub"  # never read: the registry's answer stops verify first
    key.write_text("")
    code = cli.main(["verify", f"{fault_proxy.host}/x/y:latest", "--key", str(key)])
    err = capsys.readouterr().err
    assert code == 10, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err and fault_proxy.answered >= 1, err


@pytest.mark.docker
@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe not utf-8", b'{"token": "abc\\r\\nX-Evil: 1"}', b"[1]", b'{"token": 5}'],
    ids=["not-utf8", "line-break", "a-list", "not-a-string"],
)
def test_a_token_server_answer_that_is_no_token_is_one_registry_error(
    body: bytes, fault_proxy: FaultProxy
) -> None:
    realm = f"http://{fault_proxy.host}/token"
    fault_proxy.answer(
        "GET /v2/ ", _http("401 Unauthorized", b"", f'WWW-Authenticate: Bearer realm="{realm}"')
    )
    fault_proxy.answer("GET /token", _http("200 OK", body, "Content-Type: application/json"))
    with RegistryClient(fault_proxy.host) as client, pytest.raises(RegistryError) as err:
        client.ping("x/y")
    assert "returned no token" in err.value.line()


@pytest.mark.docker
def test_an_upload_location_that_is_no_url_is_one_registry_error(fault_proxy: FaultProxy) -> None:
    fault_proxy.answer(
        "POST /v2/x/y/blobs/uploads/", _http("202 Accepted", b"", "Location: http://[::1:bad/up")
    )
    data = b"blob"
    with RegistryClient(fault_proxy.host) as client, pytest.raises(RegistryError) as err:
        client.push_blob("x/y", sha256_digest(data), data)
    assert "no URL" in err.value.line()
