"""Publishing real two-platform images to a real registry (Debian's docker-registry).

The images are tiny (a file and the OCI labels, linux/amd64 + linux/arm64, pushed per
platform like `nox -s build -- <arch> --push-by-digest`); build and smoke reports for them are
written into a temporary project, and `python -m pipeline publish` runs against it. What the
registry holds afterwards is read back with plain httpx, not through the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FaultProxy, LabRelease, LocalRegistry, TokenServer

from pipeline import cli
from pipeline.config import Project
from pipeline.publish import PublishOptions, publish
from pipeline.registry import MANIFEST_ACCEPT, Credentials, RegistryClient, RetryPolicy

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
    """A project dir: version.json for `release` and its build + smoke reports (replaced)."""
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
    reports = root / "build" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    for old in reports.glob("*.json"):
        old.unlink()
    for backend in backends:
        for platform, digest in release.manifests.items():
            arch = platform.split("/")[1]
            build: dict[str, Any] = {
                "schema": 1,
                "backend": backend,
                "platform": platform,
                "image": release.repository,
                "ref": f"{release.repository}@{digest}",
                "digest": digest,
                "output": output,
                "commit": release.commit,
                "version": release.version,
                "size_bytes": None,
                "seconds": 1.0,
            }
            if attested:  # what build.py's --attest adds: the pushed per-platform index
                build["index_digest"] = release.digests[platform]
            (reports / f"build-{backend}-{arch}.json").write_text(json.dumps(build))
            report = {
                "schema": 1,
                "image": build["ref"],
                "digest": digest,
                "backend": backend,
                "platform": platform,
                "passed": True,
                "seconds": 2.0,
                "checks": [{"name": "health", "passed": True, "seconds": 0.1}],
            }
            report.update((smoke or {}).get(f"{backend}-{arch}", {}))
            if report.get("missing"):
                continue
            (reports / f"smoke-{backend}-{arch}.json").write_text(json.dumps(report))
    return root


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


def tags_of(host: str, repository: str) -> dict[str, str]:
    response = httpx.get(f"http://{host}/v2/{repository}/tags/list")
    if response.status_code == 404:
        return {}
    response.raise_for_status()
    return {tag: tag_digest(host, repository, tag) for tag in response.json()["tags"] or []}


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
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DOCKERHUB_USERNAME",
        "DOCKERHUB_TOKEN",
        "REGISTRY_USERNAME",
        "REGISTRY_PASSWORD",
        "GITHUB_REF_TYPE",
        "GITHUB_REF_NAME",
    ):
        monkeypatch.delenv(name, raising=False)


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
    # Same registry as the digests: blobs are mounted across repositories, never uploaded.
    assert lab_registry.blob_uploads_since(mark) == []
    writes = lab_registry.writes_since(mark)
    # The access log is read at all (the `== []` checks here rest on it): mounts were logged.
    assert any("mount=" in path for _, path, _ in writes), writes
    first = report(root)["backends"][0]["index"]
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
            {"cpu-amd64": {"passed": False, "checks": [{"name": "completion", "passed": False}]}},
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
    options = PublishOptions(retry=FAST_RETRY)
    outcome = publish(Project(root), options, env=dict(os.environ))
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
    from pipeline.errors import RegistryError

    with pytest.raises(RegistryError) as failure:
        publish(Project(root), PublishOptions(retry=FAST_RETRY), env=dict(os.environ))
    message = failure.value.line()
    assert f"registry {fault_proxy.host} failed PUT /v2/{repo}/manifests/1.0" in message
    # Immutable tags went first; the floating ones were not touched.
    assert "tagged 1.0.0, sha-" in message and "not tagged 1.0, 1, latest" in message

    fault_proxy.registry.start()
    tags = tags_of(fault_proxy.host, repo)
    assert sorted(tags) == sorted(["1.0.0", f"sha-{release.commit[:7]}"])
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


def test_publish_the_real_cpu_images(
    cpu_image: Any,
    lab_registry: LocalRegistry,
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: None,
) -> None:
    """The checkout's real cpu images (amd64 + arm64): pushed per platform, smoke-tested for
    real (`python -m pipeline smoke`), published, re-published unchanged."""
    host = lab_registry.host
    info = json.loads((repo_root / "version.json").read_text())
    root = tmp_path / "project"
    reports = root / "build" / "reports"
    reports.mkdir(parents=True)
    info["image"] = f"{host}/real/llama-server"
    (root / "version.json").write_text(json.dumps(info))
    pushed_tags = []
    for arch in ("amd64", "arm64"):
        result = cpu_image(arch)
        local = f"{host}/real/src:cpu-{arch}"
        subprocess.run(["docker", "tag", result.ref, local], check=True, capture_output=True)
        pushed_tags.append(local)
        subprocess.run(["docker", "push", "-q", local], check=True, capture_output=True)
        digest = tag_digest(host, "real/src", f"cpu-{arch}")
        build = result.to_json() | {
            "image": f"{host}/real/src",
            "ref": local,
            "digest": digest,
            "output": "push-by-digest",
        }
        (reports / f"build-cpu-{arch}.json").write_text(json.dumps(build))
    try:
        monkeypatch.setenv("PIPELINE_ROOT", str(root))
        for arch in ("amd64", "arm64"):
            local = f"{host}/real/src:cpu-{arch}"
            assert cli.main(["smoke", local, "--platform", f"linux/{arch}"]) == 0
        capsys.readouterr()
        started = time.monotonic()
        code, _out, err = run_publish(monkeypatch, capsys, root)
        seconds = time.monotonic() - started
        assert code == 0, err
        assert report(root)["verified"] is True
        index = report(root)["backends"][0]["index"]
        assert tag_digest(host, "real/llama-server", "latest") == index
        assert tag_digest(host, "real/llama-server", info["version"]) == index
        mark = len(lab_registry.requests())
        code, _out, err = run_publish(monkeypatch, capsys, root)
        assert code == 0, err
        assert set(actions(root).values()) == {"unchanged"}
        assert lab_registry.writes_since(mark) == []
        with capsys.disabled():
            print(f"\nFIGURE real cpu amd64+arm64 publish: {seconds:.2f} s; re-publish: 0 writes")
    finally:
        subprocess.run(["docker", "image", "rm", *pushed_tags], capture_output=True, check=False)
