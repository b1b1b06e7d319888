"""pipeline.oci.registry against real registries: Debian's docker-registry on loopback ports."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fixtures.registry import FaultProxy, LabRelease, LocalRegistry, TokenServer

from pipeline.core.errors import CredentialsError, RegistryError
from pipeline.oci.image import (
    DOCKER_HUB,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_INDEX,
    ImageName,
    Manifest,
    split_reference,
)
from pipeline.oci.registry import (
    Credentials,
    RegistryClient,
    RetryPolicy,
    credentials_from_env,
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
    assert credentials_from_env("ghcr.io", {}) is None
    creds = credentials_from_env(DOCKER_HUB, {**hub, **other})
    assert creds is not None and creds.username == "hubuser"
    assert creds.variables == ("DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN")
    creds = credentials_from_env("ghcr.io", {**hub, **other})
    assert creds is not None and creds.username == "reguser"
    assert "pw" not in repr(creds) and "t0k" not in repr(credentials_from_env(DOCKER_HUB, hub))
    with pytest.raises(CredentialsError, match="REGISTRY_PASSWORD is set but REGISTRY_USERNAME"):
        credentials_from_env("ghcr.io", {"REGISTRY_PASSWORD": "pw"})
    with pytest.raises(CredentialsError, match="DOCKERHUB_USERNAME is set but DOCKERHUB_TOKEN"):
        credentials_from_env(DOCKER_HUB, {"DOCKERHUB_USERNAME": "u", **other})


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
