"""Publishing real two-platform images to a real registry (Debian's docker-registry).

The images are tiny (a file and the OCI labels, linux/amd64 + linux/arm64, pushed per
platform like `nox -s build -- <arch> --push-by-digest`); build and smoke reports for them are
written into a temporary project, and `python -m pipeline publish` runs against it. What the
registry holds afterwards is read back with plain httpx, not through the code under test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.lab import TEST_CPU_VARIANTS, build_lock, copy_project
from fixtures.registry import FaultProxy, LabRelease, LocalRegistry, TokenServer
from fixtures.signing import KeyPair

from pipeline import cli
from pipeline.core.project import Project
from pipeline.oci.cosign import SMOKE_PREDICATE
from pipeline.oci.image import MANIFEST_ACCEPT
from pipeline.oci.registry import Credentials, RegistryClient, RetryPolicy
from pipeline.publish import PublishOutcome, publish
from pipeline.publish.options import PublishOptions
from pipeline.records import (
    BuildRecord,
    CheckResult,
    SmokeRecord,
    load_build_records,
    load_smoke_records,
    write_record,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.25, max_delay=2.0)


def write_project(
    root: Path,
    release: LabRelease,
    *,
    image: str = "docker.io/acme/llama-server",
    ref: str | None = None,
    backends: tuple[str, ...] = ("cpu",),
    smoke: dict[str, Any] | None = None,
    output: str = "push-by-digest",
    attested: bool = True,
) -> Path:
    """A project dir: version.json for `release` and its build + smoke records (replaced),
    written by the records module's own writer. `smoke` overrides fields of a smoke record
    (`missing: True` leaves it out)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "version.json").write_text(
        json.dumps(
            {
                "version": release.version,
                "llama_cpp": {
                    "repository": "https://github.com/ggml-org/llama.cpp",
                    "commit": release.commit,
                    "ref": ref,
                },
                "image": image,
            }
        )
    )
    reports = Project(root).reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    for old in reports.glob("*.json"):
        old.unlink()
    for backend in backends:
        for platform, digest in release.manifests.items():
            arch = platform.split("/")[1]
            build = BuildRecord(
                backend=backend,
                platform=platform,
                image=release.repository,
                ref=f"{release.repository}@{digest}",
                digest=digest,
                output=output,
                commit=release.commit,
                version=release.version,
                size_bytes=None,
                seconds=1.0,
                # What build's --attest adds: the pushed per-platform index.
                index_digest=release.digests[platform] if attested else None,
            )
            write_record(reports, build)
            changes = dict((smoke or {}).get(f"{backend}-{arch}", {}))
            if changes.pop("missing", False):
                continue
            fields: dict[str, Any] = {
                "image": build.ref,
                "digest": digest,
                "backend": backend,
                "platform": platform,
                "passed": True,
                "seconds": 2.0,
                "checks": (CheckResult("health", True, 0.1),),
            }
            write_record(reports, SmokeRecord(**(fields | changes)))
            # The real tier (publish requires it of every backend) passed on the same digest.
            write_record(reports, SmokeRecord(**(fields | {"tier": "real"})))
    return root


def publish_project(root: Path, options: PublishOptions) -> PublishOutcome:
    """publish as its CLI runs it: the project's build and smoke records, loaded."""
    reports = Project(root).reports_dir
    return publish(options, load_build_records(reports), load_smoke_records(reports))


def run_publish(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root: Path, *args: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    code = cli.main(["publish", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tag_digest(host: str, repository: str, tag: str, auth: tuple[str, str] | None = None) -> str:
    """What `repository:tag` points to, asked of the registry directly (None if absent)."""
    response = httpx.head(
        f"http://{host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": MANIFEST_ACCEPT},
        auth=auth,
    )
    if response.status_code == 404:
        return ""
    response.raise_for_status()
    return str(response.headers["Docker-Content-Digest"])


COSIGN_TAG_RE = re.compile(r"^sha256-[0-9a-f]{64}(\.sig|\.att)?$")


def all_tags(host: str, repository: str) -> list[str]:
    response = httpx.get(f"http://{host}/v2/{repository}/tags/list")
    if response.status_code == 404:
        return []
    response.raise_for_status()
    return list(response.json()["tags"] or [])


def tags_of(host: str, repository: str) -> dict[str, str]:
    """The release's tags (cosign's signature and attestation tags left out)."""
    tags = [tag for tag in all_tags(host, repository) if not COSIGN_TAG_RE.match(tag)]
    return {tag: tag_digest(host, repository, tag) for tag in tags}


def signed_digests(host: str, repository: str) -> set[str]:
    """The digests cosign attached a signature or attestations to (registries without the
    referrers API get a `sha256-<hex>` tag per subject)."""
    return {
        "sha256:" + tag.removeprefix("sha256-")[:64]
        for tag in all_tags(host, repository)
        if COSIGN_TAG_RE.match(tag)
    }


def uploaded_digests(writes: list[tuple[str, str, int]]) -> set[str]:
    """The digests of the blobs whose data was sent (a finished upload names its digest)."""
    found = set()
    for method, path, _ in writes:
        if method == "PUT" and "/blobs/uploads/" in path and "digest=" in path:
            found.add(urllib.parse.unquote(path.split("digest=", 1)[1].split("&")[0]))
    return found


def image_blobs(host: str, repository: str, digests: Iterable[str]) -> set[str]:
    """Config and layer digests of the image manifests `digests` (indexes followed)."""
    blobs: set[str] = set()
    for digest in digests:
        manifest = index_of(host, repository, digest)
        if "manifests" in manifest:
            blobs |= image_blobs(host, repository, [m["digest"] for m in manifest["manifests"]])
        else:
            blobs |= {
                manifest["config"]["digest"],
                *(layer["digest"] for layer in manifest["layers"]),
            }
    return blobs


def index_of(host: str, repository: str, tag: str) -> dict[str, Any]:
    response = httpx.get(
        f"http://{host}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}
    )
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def report(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "build" / "reports" / "publish.json").read_text())
    return data


def actions(root: Path, backend: str = "cpu") -> dict[str, str]:
    for plan in report(root)["backends"]:
        if plan["backend"] == backend:
            return {t["tag"]: t["action"] for t in plan["tags"]}
    raise AssertionError(f"no plan for {backend}")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, cosign_keys: KeyPair) -> None:
    """No credentials of the developer's or the lab's; publishes sign with the session's key."""
    for name in (
        "DOCKERHUB_USERNAME",
        "DOCKERHUB_TOKEN",
        "REGISTRY_USERNAME",
        "REGISTRY_PASSWORD",
        "REGISTRY_HOST",
        "REGISTRY_TOKEN_HOSTS",
        "GITHUB_REF_TYPE",
        "GITHUB_REF_NAME",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in cosign_keys.signing_env().items():
        monkeypatch.setenv(name, value)


def test_releases_prerelease_and_a_lower_version_keep_floating_tags_forward(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host, repo = lab_registry.host, "seq/llama-server"
    target = ["--image", f"{host}/{repo}"]
    root = tmp_path / "project"

    # 1.0.0: every tag is new. Timed: one backend, two platforms, same registry (CI's case).
    write_project(root, test_releases["1.0.0"], ref="b4000")
    mark = len(lab_registry.requests())
    started = time.monotonic()
    code, out, err = run_publish(monkeypatch, capsys, root, *target)
    seconds = time.monotonic() - started
    assert code == 0, err
    # Same registry as the digests: the images' blobs are mounted across repositories, never
    # uploaded (what is uploaded is cosign's: signatures and attestations).
    writes = lab_registry.writes_since(mark)
    release_blobs = image_blobs(host, "src", test_releases["1.0.0"].digests.values())
    assert release_blobs and not uploaded_digests(writes) & release_blobs
    # The access log is read at all (the `== []` checks here rest on it): mounts were logged.
    assert any("mount=" in path for _, path, _ in writes), writes
    first = report(root)["backends"][0]["index"]
    # Signed before any tag moved: the index, and each platform image attested.
    platforms = set(test_releases["1.0.0"].manifests.values())
    assert {first, *platforms} <= signed_digests(host, repo)
    sha = test_releases["1.0.0"].commit[:7]
    assert tags_of(host, repo) == dict.fromkeys(
        ["1.0.0", "1.0", "1", "latest", "b4000", f"sha-{sha}"], first
    )
    index = index_of(host, repo, "latest")
    platforms = sorted(
        f"{m['platform']['os']}/{m['platform']['architecture']}"
        for m in index["manifests"]
        if m.get("annotations", {}).get("vnd.docker.reference.type") != "attestation-manifest"
    )
    assert platforms == ["linux/amd64", "linux/arm64"]
    attestations = [
        m for m in index["manifests"] if m["platform"]["os"] == "unknown"
    ]  # the provenance of each platform made it into the release
    assert len(attestations) == 2
    assert report(root)["verified"] is True
    mounts = sum("mount=" in path for _, path, _ in writes)
    with capsys.disabled():
        print(
            f"\nFIGURE publish 1 backend x 2 platforms, new repository: {seconds:.2f} s, "
            f"{len(writes)} writes ({mounts} blob mounts, 0 blob uploads)"
        )

    # 1.1.0: floating tags move forward, 1.0 stays where it is (not in this release).
    write_project(root, test_releases["1.1.0"])
    code, out, err = run_publish(monkeypatch, capsys, root, *target)
    assert code == 0, err
    second = report(root)["backends"][0]["index"]
    assert actions(root)["1"] == "move" and actions(root)["latest"] == "move"
    tags = tags_of(host, repo)
    assert tags["1.1.0"] == tags["1.1"] == tags["1"] == tags["latest"] == second
    assert tags["1.0.0"] == tags["1.0"] == first

    # 1.0.1 after 1.1.0: 1.0 moves forward to it, 1 and latest stay on the newer 1.1.0.
    write_project(root, test_releases["1.0.1"])
    code, out, err = run_publish(monkeypatch, capsys, root, *target)
    assert code == 0, err
    third = report(root)["backends"][0]["index"]
    assert actions(root) == {
        "1.0.1": "create",
        "1.0": "move",
        "1": "leave",
        "latest": "leave",
        f"sha-{test_releases['1.0.1'].commit[:7]}": "create",
    }
    tags = tags_of(host, repo)
    assert tags["1.0.1"] == tags["1.0"] == third
    assert tags["1"] == tags["latest"] == second
    reasons = {t["tag"]: t["reason"] for t in report(root)["backends"][0]["tags"]}
    assert reasons["latest"] == reasons["1"] == "stays on newer 1.1.0"
    assert "leave" in out

    # A prerelease gets its exact tag only.
    write_project(root, test_releases["2.0.0-rc.1"])
    code, out, err = run_publish(monkeypatch, capsys, root, *target)
    assert code == 0, err
    assert list(actions(root)) == ["2.0.0-rc.1"]
    tags = tags_of(host, repo)
    assert tags["latest"] == tags["1"] == second
    assert "2" not in tags and "2.0" not in tags

    # Unchanged re-publish of 1.1.0: every tag unchanged, nothing written to the registry.
    write_project(root, test_releases["1.1.0"])
    mark = len(lab_registry.requests())
    started = time.monotonic()
    code, out, err = run_publish(monkeypatch, capsys, root, *target)
    seconds = time.monotonic() - started
    assert code == 0, err
    assert set(actions(root).values()) == {"unchanged"}
    assert lab_registry.writes_since(mark) == []
    assert lab_registry.blob_uploads_since(mark) == []
    with capsys.disabled():
        print(f"\nFIGURE unchanged re-publish: {seconds:.2f} s, 0 writes, 0 blob uploads")


def test_immutable_tag_with_another_digest_is_refused_and_force_overrides(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host, repo = lab_registry.host, "immutable/llama-server"
    target = ["--image", f"{host}/{repo}"]
    root = tmp_path / "project"
    write_project(root, test_releases["1.1.0"])
    assert run_publish(monkeypatch, capsys, root, *target)[0] == 0
    before = tags_of(host, repo)

    # Another build of the same version and commit: 1.1.0 and sha-… already exist.
    write_project(root, test_releases["1.1.0+rebuild"])
    mark = len(lab_registry.requests())
    code, out, err = run_publish(monkeypatch, capsys, root, *target)
    assert code == 12
    assert f"{host}/{repo}:1.1.0" in err and "--force" in err
    assert actions(root)["1.1.0"] == "conflict" and "conflict" in out
    assert err.count("\n") == 1  # one line, no traceback
    assert tags_of(host, repo) == before
    assert lab_registry.writes_since(mark) == []

    code, _out, err = run_publish(monkeypatch, capsys, root, *target, "--force")
    assert code == 0, err
    assert f"--force: overwriting immutable tag {host}/{repo}:1.1.0" in " ".join(err.split())
    forced = report(root)["backends"][0]["index"]
    assert forced != before["1.1.0"]
    assert set(tags_of(host, repo).values()) == {forced}
    assert actions(root)["latest"] == "move"


def test_other_backends_get_suffixed_tags(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host, repo = lab_registry.host, "backends/llama-server"
    root = write_project(
        tmp_path / "project",
        test_releases["1.0.0"],
        backends=("cpu", "vulkan"),
        ref="b4000",
        attested=False,
    )
    code, _out, err = run_publish(monkeypatch, capsys, root, "--image", f"{host}/{repo}")
    assert code == 0, err
    sha = test_releases["1.0.0"].commit[:7]
    index = index_of(host, repo, "vulkan")
    # Bare image manifests joined: exactly the two platforms, no attestations.
    assert sorted(m["digest"] for m in index["manifests"]) == sorted(
        test_releases["1.0.0"].manifests.values()
    )
    assert sorted(tags_of(host, repo)) == sorted(
        [
            *("1.0.0", "1.0", "1", "latest", "b4000", f"sha-{sha}"),
            *("1.0.0-vulkan", "1.0-vulkan", "1-vulkan", "vulkan", "b4000-vulkan"),
            f"sha-{sha}-vulkan",
        ]
    )


def test_dry_run_prints_the_plan_and_pushes_nothing(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host, repo = lab_registry.host, "dry/llama-server"
    target = ["--image", f"{host}/{repo}"]
    root = write_project(tmp_path / "project", test_releases["1.1.0"])
    assert run_publish(monkeypatch, capsys, root, *target)[0] == 0
    write_project(root, test_releases["1.0.1"])
    mark = len(lab_registry.requests())
    code, out, err = run_publish(monkeypatch, capsys, root, *target, "--dry-run")
    assert code == 0, err
    assert lab_registry.writes_since(mark) == []
    assert "1.0.1" not in tags_of(host, repo)
    plan = report(root)
    assert plan["dry_run"] is True and plan["verified"] is False
    index = plan["backends"][0]["index"]
    flat = " ".join(out.split())
    assert f"index {index}" in flat
    for platform, digest in test_releases["1.0.1"].digests.items():
        assert f"{platform}: {test_releases['1.0.1'].repository}@{digest}" in flat
    assert actions(root) == {
        "1.0.1": "create",
        "1.0": "create",
        "1": "leave",
        "latest": "leave",
        f"sha-{test_releases['1.0.1'].commit[:7]}": "create",
    }
    for tag in plan["backends"][0]["tags"]:
        assert tag["target"] == index and tag["reason"]


@pytest.mark.parametrize(
    ("smoke", "expected"),
    [
        ({"cpu-arm64": {"missing": True}}, "cpu linux/arm64"),
        (
            {"cpu-amd64": {"passed": False, "checks": (CheckResult("completion", False, 0.1),)}},
            "failed its smoke test (completion)",
        ),
        ({"cpu-arm64": {"digest": "sha256:" + "0" * 64}}, "tested another digest"),
    ],
    ids=["missing", "failed", "other-digest"],
)
def test_digests_without_a_passed_smoke_report_are_refused(
    smoke: dict[str, Any],
    expected: str,
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host, repo = lab_registry.host, "unsmoked/llama-server"
    root = write_project(tmp_path / "project", test_releases["1.0.0"], smoke=smoke)
    mark = len(lab_registry.requests())
    code, _out, err = run_publish(monkeypatch, capsys, root, "--image", f"{host}/{repo}")
    assert code == 12
    assert "refusing to publish" in err and expected in err
    assert lab_registry.requests()[mark:] == []  # refused before talking to the registry


def test_unpushed_or_stale_builds_and_a_wrong_release_tag_are_refused(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    image = ["--image", f"{lab_registry.host}/refused/llama-server"]
    root = write_project(tmp_path / "loaded", test_releases["1.0.0"], output="load")
    code, _, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 12 and "--push-by-digest" in err

    root = write_project(tmp_path / "tag", test_releases["1.0.0"])
    code, _, err = run_publish(monkeypatch, capsys, root, *image, "--release-tag", "v1.0.1")
    assert code == 3 and "'v1.0.1' does not match version.json's version 1.0.0" in err
    monkeypatch.setenv("GITHUB_REF_TYPE", "tag")
    monkeypatch.setenv("GITHUB_REF_NAME", "v9.9.9")
    code, _, err = run_publish(monkeypatch, capsys, root, *image, "--dry-run")
    assert code == 3 and "v9.9.9" in err
    monkeypatch.setenv("GITHUB_REF_NAME", "v1.0.0")
    assert run_publish(monkeypatch, capsys, root, *image, "--dry-run")[0] == 0

    # Reports of another version than version.json's (a stale build directory).
    root = write_project(tmp_path / "stale", test_releases["1.0.0"])
    data = json.loads((root / "version.json").read_text())
    data["version"] = "1.0.1"
    (root / "version.json").write_text(json.dumps(data))
    monkeypatch.delenv("GITHUB_REF_TYPE")
    code, _, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 12 and "version.json says 1.0.1" in err

    root = write_project(tmp_path / "partial", test_releases["1.0.0"])
    (root / "build" / "reports" / "build-cpu-arm64.json").unlink()
    code, _, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 12 and "missing linux/arm64" in err

    # A build for the building machine's CPU only (a local try-out) is never released.
    root = write_project(tmp_path / "host", test_releases["1.0.0"])
    report = root / "build" / "reports" / "build-cpu-amd64.json"
    data = json.loads(report.read_text())
    data["cpu_variants"] = "host"
    report.write_text(json.dumps(data))
    code, _, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 12 and "--cpu-variants host, for the building machine's CPU only" in err


def _config_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("publish-docker-config-*")}


def test_credentials_wrong_missing_and_right(
    test_releases: dict[str, LabRelease],
    make_registry: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    secret = "s3cret-pa55word-xyz"
    registry: LocalRegistry = make_registry(user=("publisher", secret))
    image = ["--image", f"{registry.host}/private/llama-server"]
    root = write_project(tmp_path / "project", test_releases["1.0.0"])
    before = _config_dirs()

    code, out, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 11
    assert f"registry {registry.host} requires credentials" in err
    assert "REGISTRY_USERNAME/REGISTRY_PASSWORD" in err

    # --image names a registry other than version.json's: the credentials are for it.
    monkeypatch.setenv("REGISTRY_HOST", registry.host)
    monkeypatch.setenv("REGISTRY_USERNAME", "publisher")
    monkeypatch.setenv("REGISTRY_PASSWORD", "wrong-" + secret)
    code, out, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 11
    assert f"registry {registry.host} refused the credentials in " in err
    assert "REGISTRY_PASSWORD" in err and "wrong-" not in out + err
    assert err.count("\n") == 1

    monkeypatch.setenv("REGISTRY_PASSWORD", secret)
    code, out, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 0, err
    assert secret not in out + err
    digest = tag_digest(registry.host, "private/llama-server", "latest", ("publisher", secret))
    assert digest == report(root)["backends"][0]["index"]
    # The docker config holding the credentials is gone.
    assert _config_dirs() == before

    monkeypatch.delenv("REGISTRY_USERNAME")
    code, out, err = run_publish(monkeypatch, capsys, root, *image)
    assert code == 11 and "REGISTRY_PASSWORD is set but REGISTRY_USERNAME is not" in err


@pytest.mark.parametrize("stop_at", ["imagetools", "floating-tag"])
def test_registry_stopped_mid_push_and_restarted_recovers(
    stop_at: str,
    test_releases: dict[str, LabRelease],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: None,
) -> None:
    """The registry goes down as a manifest PUT arrives and is back 1 s later: retries win."""
    repo = "flaky/llama-server"
    release = test_releases["1.0.0"]
    root = write_project(tmp_path / "project", release, image=f"{fault_proxy.host}/{repo}")
    # imagetools pushes the first (immutable) tag; the floating ones go through our client.
    tag = "1.0.0" if stop_at == "imagetools" else "latest"
    fault_proxy.stop_on(rf"^PUT /v2/{repo}/manifests/{tag} ", restart_after=1.0)
    options = PublishOptions.named(Project(root), retry=FAST_RETRY, env=dict(os.environ))
    outcome = publish_project(root, options)
    assert fault_proxy.stopped_on == [f"PUT /v2/{repo}/manifests/{tag} HTTP/1.1"]
    index = outcome.plan.backends[0].index.digest
    tags = tags_of(fault_proxy.host, repo)
    assert tags == dict.fromkeys(
        ["1.0.0", "1.0", "1", "latest", f"sha-{release.commit[:7]}"], index
    )


def test_registry_stopped_for_good_fails_clearly_and_a_rerun_completes(
    test_releases: dict[str, LabRelease],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    repo = "down/llama-server"
    release = test_releases["1.0.0"]
    root = write_project(tmp_path / "project", release, image=f"{fault_proxy.host}/{repo}")
    fault_proxy.stop_on(rf"^PUT /v2/{repo}/manifests/1\.0 ", restart_after=None)
    from pipeline.core.errors import RegistryError

    with pytest.raises(RegistryError) as failure:
        publish_project(
            root, PublishOptions.named(Project(root), retry=FAST_RETRY, env=dict(os.environ))
        )
    message = failure.value.line()
    assert f"registry {fault_proxy.host} failed PUT /v2/{repo}/manifests/1.0" in message
    # The immutable tag went first; the floating ones (sha-<commit> floats forward by version,
    # tags.yaml) were not touched.
    sha = f"sha-{release.commit[:7]}"
    assert f"tagged 1.0.0; not tagged 1.0, 1, latest, {sha}" in message

    fault_proxy.registry.start()
    tags = tags_of(fault_proxy.host, repo)
    assert sorted(tags) == ["1.0.0"]
    code, _out, err = run_publish(monkeypatch, capsys, root)
    assert code == 0, err
    assert actions(root)["1.0.0"] == "unchanged" and actions(root)["latest"] == "create"
    assert len(set(tags_of(fault_proxy.host, repo).values())) == 1


def test_publish_through_bearer_token_auth_like_docker_hub(
    test_releases: dict[str, LabRelease],
    token_registry: tuple[LocalRegistry, TokenServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    """buildx and our client both get tokens from the realm the registry names; the sources
    are in another registry (anonymous), so imagetools copies the blobs across."""
    registry, tokens = token_registry
    root = write_project(
        tmp_path / "project", test_releases["1.0.0"], image=f"{registry.host}/acme/llama-server"
    )
    monkeypatch.setenv("REGISTRY_USERNAME", "publisher")
    monkeypatch.setenv("REGISTRY_PASSWORD", "t0ken-secret")
    code, out, err = run_publish(monkeypatch, capsys, root)
    assert code == 0, err
    assert "t0ken-secret" not in out + err
    assert report(root)["verified"] is True
    assert ("publisher", "repository:acme/llama-server:pull,push") in tokens.issued
    creds = Credentials("publisher", "t0ken-secret", ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"))
    with RegistryClient(registry.host, creds) as client:
        assert (
            client.manifest_digest("acme/llama-server", "latest")
            == (report(root)["backends"][0]["index"])
        )

    monkeypatch.setenv("REGISTRY_PASSWORD", "expired")
    code, out, err = run_publish(monkeypatch, capsys, root)
    assert code == 11 and f"registry {registry.host} refused the credentials" in err


def test_the_release_chain_through_the_pipelines_own_commands(
    cpu_image: Any,
    lab_project: Project,
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    """The real cpu images, amd64 + arm64, through each stage's own command: pushed by digest
    (`pipeline build --push-by-digest --attest`), smoke-tested from the registry (smoke pulls
    the digests), refused by publish without the real tier, published and signed once the
    real tier passed, verified, re-published unchanged with no write. The real tier runs on
    amd64 only and publish takes amd64 only (`--platform`, a CI-size release): arm64's real
    tier under QEMU takes minutes, and the release workflow's replay runs it."""
    cpu_image("amd64"), cpu_image("arm64")  # the session's builds: the cache this one reuses
    host = lab_registry.host
    root = copy_project(tmp_path / "project")
    (root / "third_party").symlink_to(lab_project.third_party.parent)
    info = json.loads((root / "version.json").read_text())
    info["image"] = f"{host}/real/llama-server"
    (root / "version.json").write_text(json.dumps(info))
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    build = [
        "build",
        "amd64",
        "arm64",
        "--push-by-digest",
        "--attest",
        "--tag",
        f"{host}/real/src",
        "--cpu-variants",
        TEST_CPU_VARIANTS,
    ]
    started = time.monotonic()
    with build_lock():
        assert cli.main(build) == 0, capsys.readouterr().err[-2000:]
    push_seconds = time.monotonic() - started
    records = load_build_records(Project(root).reports_dir)
    pulled = [r.ref for r in records]
    try:
        for record in records:
            # What the record says was pushed is what the registry holds, read independently.
            index = index_of(host, "real/src", record.index_digest or "")
            assert record.digest in [m["digest"] for m in index["manifests"]]
            assert record.sbom and (Project(root).reports_dir / record.sbom).is_file()
        started = time.monotonic()
        assert cli.main(["smoke", "--platform", "amd64,arm64"]) == 0
        smoke_seconds = time.monotonic() - started
        smokes = load_smoke_records(Project(root).reports_dir)
        assert {(s.platform, s.digest) for s in smokes} == {(r.platform, r.digest) for r in records}
        capsys.readouterr()
        # matrix.yaml's publish_requires names the real tier: without it, nothing is tagged.
        code, _out, err = run_publish(monkeypatch, capsys, root, "--platform", "linux/amd64")
        assert code != 0 and "real" in err, err
        assert tag_digest(host, "real/llama-server", "latest") == ""
        started = time.monotonic()
        assert cli.main(["smoke", "--platform", "amd64", "--tier", "real"]) == 0
        real_seconds = time.monotonic() - started
        capsys.readouterr()
        started = time.monotonic()
        code, _out, err = run_publish(monkeypatch, capsys, root, "--platform", "linux/amd64")
        seconds = time.monotonic() - started
        assert code == 0, err
        assert report(root)["verified"] is True
        index = report(root)["backends"][0]["index"]
        assert tag_digest(host, "real/llama-server", "latest") == index
        assert tag_digest(host, "real/llama-server", info["version"]) == index
        started = time.monotonic()
        image = f"{host}/real/llama-server:{info['version']}"
        assert cli.main(["verify", image]) == 0, capsys.readouterr().err
        verify_seconds = time.monotonic() - started
        verdict = json.loads((Project(root).reports_dir / "verify.json").read_text())
        amd64 = {r.digest for r in records if r.platform == "linux/amd64"}
        assert {p["digest"] for p in verdict["platforms"]} == amd64
        assert all(p["sbom"].startswith("CycloneDX 1.6") for p in verdict["platforms"])
        mark = len(lab_registry.requests())
        code, _out, err = run_publish(monkeypatch, capsys, root, "--platform", "linux/amd64")
        assert code == 0, err
        assert set(actions(root).values()) == {"unchanged"}
        assert lab_registry.writes_since(mark) == []
        with capsys.disabled():
            print(
                f"\nFIGURE release chain: push cpu amd64+arm64 {push_seconds:.1f} s (warm "
                f"cache), smoke of the pulled digests {smoke_seconds:.1f} s, real tier amd64 "
                f"{real_seconds:.1f} s, publish+sign "
                f"{seconds:.1f} s, verify {verify_seconds:.1f} s; re-publish: 0 writes"
            )
    finally:
        subprocess.run(["docker", "image", "rm", *pulled], capture_output=True, check=False)


def test_a_dry_run_before_any_push_plans_and_writes_nothing(
    cpu_image: Any,
    lab_project: Project,
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    """Right after `nox -s build` (loaded, not pushed, not smoke-tested): the plan of every
    tag, the sources marked unpushed, what a real publish would refuse; nothing written."""
    built = cpu_image("amd64")
    root = copy_project(tmp_path / "project")
    write_record(Project(root).reports_dir, built)
    mark = len(lab_registry.requests())
    code, out, err = run_publish(
        monkeypatch, capsys, root, "--dry-run", "--image", f"{lab_registry.host}/preview/x"
    )
    assert code == 0, err
    flat = " ".join(out.split())
    assert "index unknown until every source is pushed" in flat
    assert f"linux/amd64: {built.source} (unpushed: output load" in flat
    assert "would refuse:" in flat and "missing linux/arm64" in flat
    assert set(actions(root).values()) == {"create"}
    assert report(root)["notes"] and report(root)["dry_run"] is True
    assert lab_registry.writes_since(mark) == []


def test_a_dry_run_without_credentials_still_plans(
    test_releases: dict[str, LabRelease],
    make_registry: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    private: LocalRegistry = make_registry(user=("publisher", "pass-word-1"))
    root = write_project(tmp_path / "project", test_releases["1.0.0"])
    code, _out, err = run_publish(
        monkeypatch, capsys, root, "--dry-run", "--image", f"{private.host}/acme/x"
    )
    assert code == 0, err
    assert set(actions(root).values()) == {"unknown"}
    assert any("requires credentials" in note for note in report(root)["notes"])
    assert private.writes_since(0) == []


def test_no_signer_and_no_cosign_each_stop_publish_before_any_write(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host, repo = lab_registry.host, "unsigned/llama-server"
    root = write_project(tmp_path / "project", test_releases["1.0.0"])
    mark = len(lab_registry.requests())
    monkeypatch.delenv("COSIGN_KEY")
    code, _out, err = run_publish(monkeypatch, capsys, root, "--image", f"{host}/{repo}")
    assert code == 12 and "no signing identity: set COSIGN_KEY" in err and err.count("\n") == 1
    monkeypatch.setenv("COSIGN_KEY", os.environ["COSIGN_PUBLIC_KEY"].replace(".pub", ".key"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no cosign here
    code, _out, err = run_publish(monkeypatch, capsys, root, "--image", f"{host}/{repo}")
    assert code == 4 and "cosign is not installed" in err and err.count("\n") == 1
    assert lab_registry.writes_since(mark) == []
    assert tags_of(host, repo) == {}


def test_verify_refuses_other_keys_unsigned_images_and_foreign_smoke(
    test_releases: dict[str, LabRelease],
    lab_registry: LocalRegistry,
    cosign_keys: KeyPair,
    other_keys: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    host = lab_registry.host
    release = test_releases["1.0.1"]
    root = write_project(tmp_path / "project", release)
    assert run_publish(monkeypatch, capsys, root, "--image", f"{host}/signed/x")[0] == 0
    assert cli.main(["verify", f"{host}/signed/x:1.0.1"]) == 0
    capsys.readouterr()
    # Signed by someone else's key.
    code = cli.main(["verify", f"{host}/signed/x:1.0.1", "--key", str(other_keys.public)])
    assert code == 16 and capsys.readouterr().err.count("\n") == 1
    # Never signed: the source the release was joined from.
    source = f"{release.repository}@{release.digests['linux/amd64']}"
    assert cli.main(["verify", source]) == 16
    assert "no signatures found" in capsys.readouterr().err
    # Signed by our key, but its only smoke attestation is about another digest.
    assert (
        run_publish(monkeypatch, capsys, root, "--image", f"{host}/forged/x", "--no-sign")[0] == 0
    )
    index = report(root)["backends"][0]["index"]
    platform_digest = release.manifests["linux/amd64"]
    forged = tmp_path / "smoke.json"
    forged.write_text(
        json.dumps(
            {
                "digest": "sha256:" + "0" * 64,
                "platform": "linux/amd64",
                "passed": True,
                "checks": [],
            }
        )
    )
    cosign = ["cosign", "--key", str(cosign_keys.key)]
    config = tmp_path / "signing-config.json"
    config.write_text(
        json.dumps(
            {
                "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
                "rekorTlogConfig": {},
                "tsaConfig": {},
            }
        )
    )
    for args in (
        ["sign", f"{host}/forged/x@{index}"],
        [
            "attest",
            "--type",
            SMOKE_PREDICATE,
            "--predicate",
            str(forged),
            f"{host}/forged/x@{platform_digest}",
        ],
    ):
        subprocess.run(
            [cosign[0], args[0], *cosign[1:], "--signing-config", str(config), "--yes", *args[1:]],
            env={**os.environ, "COSIGN_PASSWORD": cosign_keys.password},
            capture_output=True,
            check=True,
            timeout=120,
        )
    assert cli.main(["verify", f"{host}/forged/x:1.0.1"]) == 16
    err = capsys.readouterr().err
    assert "no smoke attestation is about this digest" in err and err.count("\n") == 1
