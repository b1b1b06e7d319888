"""The workflows replayed, job by job, through their own `run:` steps (tests/replay.py says how
and names what stands in for GitHub).

release.yml, in the lab, with these substitutions besides the runner's (see tests/replay.py):
- the matrix: its cpu entries (amd64 and arm64); CPU_VARIANTS: x86-64-v3 (one set), in budget;
- docker.io, wherever the workflow's env names it: a local registry with htpasswd auth, and
  secrets.REGISTRY_USERNAME/PASSWORD: its user;
- GitHub (sync's remote): the lab's upstream mirror (LLAMA_CPP_REMOTE, build jobs only);
- keyless signing (the OIDC token, Sigstore's services): a key pair of the test's own
  (COSIGN_KEY and COSIGN_PUBLIC_KEY in the publish job's env), so verify checks that key.
The events: a push of the tag v<version> (what releases); the publish job once more as a
`workflow_dispatch` with dry-run, on the same build artifacts, before the tag push's own.

ci.yml, on a machine without the lab: CI=true, LLAMA_LAB naming a directory that does not
exist, none of the lab's variables; both jobs must pass.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.lab import TEST_CPU_VARIANTS, build_lock
from fixtures.registry import LocalRegistry
from fixtures.signing import KeyPair
from replay import (
    REPO_ROOT,
    Action,
    Job,
    actions_cache,
    checkout,
    docker_login,
    download_artifact,
    expand_matrix,
    failure_report,
    job_figures,
    job_runs,
    jobs_in_order,
    lab_cosign,
    load_workflow,
    run_job,
    runner_env,
    setup_buildx,
    setup_python,
    substitute,
    upload_artifact,
)

from pipeline.modelfiles.catalogue import MODEL_CACHE_ENV, model_cache

REPOSITORY = "acme/llama-server-images"


def github_context(event: str, ref: str, workflow: str) -> dict[str, Any]:
    ref_type = "tag" if ref.startswith("refs/tags/") else "branch"
    return {
        "event_name": event,
        "ref": ref,
        # The commit the run is of: this checkout's (on a replayed runner, whose workspace is
        # a copy of the files without .git, the one its GITHUB_SHA names).
        "sha": os.environ.get("GITHUB_SHA")
        or subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "ref_name": ref.rsplit("/", 1)[-1],
        "ref_type": ref_type,
        "repository": REPOSITORY,
        "workflow": workflow.removesuffix(".yml"),
        "workflow_ref": f"{REPOSITORY}/.github/workflows/{workflow}@{ref}",
    }


def registry_get(registry: LocalRegistry, path: str, auth: tuple[str, str]) -> Any:
    accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    response = httpx.get(
        f"http://{registry.host}/v2/{path}", auth=auth, headers={"Accept": accept}, timeout=30
    )
    response.raise_for_status()
    return response


def tags_of(registry: LocalRegistry, repository: str, auth: tuple[str, str]) -> list[str]:
    try:
        tags = registry_get(registry, f"{repository}/tags/list", auth).json().get("tags")
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:
            return []
        raise
    return sorted(tags or [])


def tag_digest(registry: LocalRegistry, repository: str, tag: str, auth: tuple[str, str]) -> str:
    return str(
        registry_get(registry, f"{repository}/manifests/{tag}", auth).headers[
            "Docker-Content-Digest"
        ]
    )


@pytest.mark.slow
def test_the_release_workflow_replayed_in_the_lab(
    cpu_image: Callable[[str], Any],
    make_registry: Callable[..., LocalRegistry],
    cosign_keys: KeyPair,
    upstream_mirror: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cpu_image("amd64"), cpu_image("arm64")  # the session's builds: BuildKit's cache is warm
    user = ("release-bot", f"replay-{secrets.token_hex(12)}")
    registry = make_registry(user=user)
    workflow = load_workflow("release.yml")
    version = json.loads((REPO_ROOT / "version.json").read_text())["version"]

    def local(registry_name: str) -> str:
        return registry.host if registry_name == "docker.io" else registry_name

    workflow_env = {
        name: re.sub(r"^docker\.io(?=/|$)", registry.host, str(value))
        for name, value in workflow["env"].items()
    } | {"CPU_VARIANTS": TEST_CPU_VARIANTS}
    image = workflow_env["IMAGE"].removeprefix(f"{registry.host}/")
    cache = workflow_env["CACHE_REPOSITORY"].removeprefix(f"{registry.host}/")
    assert image != workflow_env["IMAGE"], "the workflow's IMAGE is not on docker.io"

    caches = tmp_path / "actions-cache"
    restore_cache, save_cache = actions_cache(caches)

    def uses(artifacts: Path) -> dict[str, Action]:
        """The `uses:` equivalents of one workflow run, its artifacts kept in `artifacts`."""
        artifacts.mkdir(parents=True, exist_ok=True)
        return {
            "actions/cache/restore": restore_cache,
            "actions/cache/save": save_cache,
            "actions/checkout": checkout,
            "actions/setup-python": setup_python,
            "docker/setup-buildx-action": setup_buildx,
            "docker/login-action": docker_login(local),
            "sigstore/cosign-installer": lab_cosign,
            "actions/upload-artifact": upload_artifact(artifacts),
            "actions/download-artifact": download_artifact(artifacts),
        }

    secret_values = {"REGISTRY_USERNAME": user[0], "REGISTRY_PASSWORD": user[1]}
    per_job_env = {
        # The model for the real tier from the lab's cache (a runner downloads it).
        "build": {
            "LLAMA_CPP_REMOTE": f"file://{upstream_mirror}",
            MODEL_CACHE_ENV: str(model_cache()),
        },
        "publish": cosign_keys.signing_env(),
        "edge": cosign_keys.signing_env(),
    }

    def replay(
        name: str,
        spec: Mapping[str, Any],
        github: dict[str, Any],
        inputs: dict[str, Any],
        artifacts: Path,
    ) -> list[Job]:
        matrices = expand_matrix(spec["strategy"]["matrix"]) if "strategy" in spec else [{}]
        jobs = []
        for matrix in matrices:
            if matrix and matrix.get("backend") != "cpu":
                continue  # the replay's budget: the cpu entries of the matrix
            context = {
                "github": github,
                "inputs": inputs,
                "matrix": matrix,
                "secrets": secret_values,
                "env": workflow_env,
                "vars": {},
                "needs": {},
            }
            label = substitute(str(spec.get("name", name)), context)
            home = tmp_path / "runners" / f"{github['event_name']}-{label.replace(' ', '-')}"
            env = runner_env(home, github, per_job_env.get(name, {}))
            job = run_job(Job(label, spec, context, home, env), workflow_env, uses(artifacts))
            assert not job.failed, failure_report(job)
            jobs.append(job)
        return jobs

    tag_push = github_context("push", f"refs/tags/v{version}", "release.yml")
    dispatch = github_context("workflow_dispatch", "refs/heads/main", "release.yml")
    ordered = dict(jobs_in_order(workflow))
    assert list(ordered) == ["edge", "promote", "build", "gpu-smoke", "amd-gpu-smoke", "publish"]
    build_spec, publish_spec = ordered["build"], ordered["publish"]
    # Edge never saw this release (the registry is empty): no candidate, so it is built.
    (edge,) = replay("edge", ordered["edge"], tag_push, {}, tmp_path / "artifacts-tag-push")
    assert "edge holds no cpu image" in edge.output() and not edge.outputs.get("candidate")
    after_edge = {"edge": {"result": "success", "outputs": edge.outputs}}
    assert not job_runs(ordered["promote"], {"needs": after_edge})
    assert job_runs(build_spec, {"needs": after_edge})
    with build_lock():
        builds = replay("build", build_spec, tag_push, {}, tmp_path / "artifacts-tag-push")
    assert {job.context["matrix"]["arch"] for job in builds} == {"amd64", "arm64"}
    # No GPU runner here (vars.GPU_RUNNER, vars.AMD_GPU_RUNNER unset): the gpu tiers' jobs are
    # skipped, and publish runs after them, with --no-gpu-runner for their backends.
    skipped = {"result": "skipped"}
    needs = {"build": {"result": "success"}, "gpu-smoke": skipped, "amd-gpu-smoke": skipped}
    for gpu_job in ("gpu-smoke", "amd-gpu-smoke"):
        assert not job_runs(ordered[gpu_job], {"vars": {}, "needs": {"build": needs["build"]}})
    assert job_runs(publish_spec, {"vars": {}, "needs": needs})

    # What the build jobs pushed and smoke-tested: one digest per platform, the same in both
    # reports, in the registry, with the build cache beside it.
    artifacts = tmp_path / "artifacts-tag-push"
    records = [json.loads(p.read_text()) for p in artifacts.glob("reports-*/build-*.json")]
    smokes = [json.loads(p.read_text()) for p in artifacts.glob("reports-*/smoke-*.json")]
    assert len(records) == 2 and len(smokes) == 4  # per platform: the no-gpu and real tiers
    pushed = {r["platform"]: r["digest"] for r in records}
    for tier in ("no-gpu", "real"):
        tested = [s for s in smokes if s["tier"] == tier]
        assert {s["platform"]: s["digest"] for s in tested} == pushed, tier
    assert all(s["passed"] for s in smokes)
    assert all(
        len(list(artifacts.glob(f"reports-cpu-{a}/sbom-*.cdx.json"))) == 1
        for a in ("amd64", "arm64")
    )
    assert tags_of(registry, cache, user) == ["cpu-amd64", "cpu-arm64"]
    # Each build job saved its compiler cache for the next runner: the mount's entries.
    saved = sorted(d.name for d in caches.iterdir())
    assert [re.sub(r"-[0-9a-f]{40}$", "", name) for name in saved] == [
        "ccache-cpu-amd64",
        "ccache-cpu-arm64",
    ], saved
    for name in saved:
        arch = name.split("-")[2]
        entries = [p for p in (caches / name / f"cpu-{arch}").rglob("*") if p.is_file()]
        assert len(entries) > 100, (name, len(entries))

    # A dry-run dispatch of the publish job: the plan, and nothing tagged.
    dispatched = tmp_path / "artifacts-dispatch"
    shutil.copytree(artifacts, dispatched)
    (dry,) = replay("publish", publish_spec, dispatch, {"dry-run": True}, dispatched)
    assert tags_of(registry, image, user) == []
    plan = json.loads((dry.workspace / "build" / "reports" / "publish.json").read_text())
    assert plan["dry_run"] is True
    (planned,) = plan["backends"]
    assert {t["tag"]: t["action"] for t in planned["tags"]}[version] == "create"
    assert any(r.skipped and "Verify" in r.name for r in dry.results)

    # The tag push's publish: tags published and signed, verify passing.
    (publish,) = replay("publish", publish_spec, tag_push, {}, artifacts)
    verify_step = next(r for r in publish.results if "Verify" in r.name)
    assert not verify_step.skipped
    reports = publish.workspace / "build" / "reports"
    verdict = json.loads((reports / "verify.json").read_text())
    assert {p["digest"] for p in verdict["platforms"]} == set(pushed.values())
    assert all(p["smoke"] and p["sbom"] for p in verdict["platforms"]), verdict
    published = json.loads((reports / "publish.json").read_text())
    index = next(b["index"] for b in published["backends"] if b["backend"] == "cpu")
    assert verdict["digest"] == index and verdict["signature"], verdict
    assert planned["index"] == index  # the dry run named the index the release then tagged
    tags = tags_of(registry, image, user)
    assert {"latest", version} <= set(tags)
    assert tag_digest(registry, image, version, user) == index
    # The registry has no referrers API: cosign keeps the index's signature under a tag.
    assert any(t.startswith(f"sha256-{index.removeprefix('sha256:')}") for t in tags), tags
    with capsys.disabled():
        print(
            f"\nFIGURE release.yml replay: {job_figures(builds)}; publish dry-run "
            f"{dry.seconds:.0f} s; {job_figures([publish])}"
        )


@pytest.mark.slow
def test_the_ci_workflow_replayed_on_a_machine_without_the_lab(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workflow = load_workflow("ci.yml")
    github = github_context("pull_request", "refs/pull/1/merge", "ci.yml")
    uses: dict[str, Action] = {
        "actions/checkout": checkout,
        "actions/setup-python": setup_python,
    }
    no_lab = {"LLAMA_LAB": str(tmp_path / "no-lab")}
    assert not Path(no_lab["LLAMA_LAB"]).exists()
    jobs = []
    for name, spec in jobs_in_order(workflow):
        context = {"github": github, "inputs": {}, "matrix": {}, "secrets": {}}
        home = tmp_path / "runners" / name
        env = runner_env(home, github, no_lab)
        assert not any(k.startswith(("LAB_", "COSIGN_")) for k in env), "lab variables leaked"
        job = run_job(Job(name, spec, context, home, env), {}, uses)
        assert not job.failed, failure_report(job)
        jobs.append(job)
    tests = next(job for job in jobs if job.name == "tests")
    summary = re.findall(r"=+ (.*(?:passed|failed|error).*) in [\d.]+s", tests.output())
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], summary
    passed = int(re.search(r"(\d+) passed", summary[-1])[1])  # type: ignore[index]
    assert passed > 100, summary[-1]
    with capsys.disabled():
        print(f"\nFIGURE ci.yml replay without the lab: {job_figures(jobs)}; {summary[-1]}")


def test_the_replay_reads_expressions_and_matrices_as_github_does() -> None:
    """The replay's own rules, against what GitHub documents."""
    from replay import evaluate, should_run

    context = {"inputs": {"dry-run": True}, "matrix": {"arch": "arm64"}}
    assert evaluate("inputs.dry-run != true", context) is False
    assert evaluate("inputs.dry-run != true", {"inputs": {}}) is True  # null != true
    assert evaluate("matrix.arch == 'arm64'", context) is True
    assert substitute("linux/${{ matrix.arch }} ${{ inputs.none }}", context) == "linux/arm64 "
    assert should_run("always()", context, failed=True) is True
    assert should_run(None, context, failed=True) is False
    assert should_run("${{ inputs.dry-run }}", context, failed=False) is True
    assert evaluate("vars.GPU_RUNNER != ''", {"vars": {}}) is False  # unset: '' on GitHub
    assert evaluate("vars.GPU_RUNNER != ''", {"vars": {"GPU_RUNNER": "gpu-1"}}) is True
    needs = {"needs": {"a": {"result": "success"}, "b": {"result": "skipped"}}}
    condition = "!cancelled() && needs.a.result == 'success' && needs.b.result != 'failure'"
    assert evaluate(condition, needs) is True
    assert evaluate("needs.b.result == 'success' || needs.a.result == 'success'", needs) is True
    combos = expand_matrix(
        {
            "backend": ["cpu", "vulkan"],
            "arch": ["amd64", "arm64"],
            "include": [{"arch": "amd64", "runner": "x"}, {"arch": "riscv64", "runner": "y"}],
        }
    )
    assert len(combos) == 5
    assert {c.get("runner") for c in combos if c["arch"] == "amd64"} == {"x"}
    assert {"arch": "riscv64", "runner": "y"} in combos
    with pytest.raises(pytest.fail.Exception, match="cannot evaluate"):
        evaluate("contains(github.ref, 'v')", context)


def test_private_variables_never_reach_a_replayed_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSIGN_PASSWORD", "not-for-runners")
    monkeypatch.setenv("REGISTRY_PASSWORD", "not-for-runners")
    monkeypatch.setenv("LLAMA_LAB", "/opt/llama-lab")
    github = github_context("push", "refs/tags/v1.0.0", "release.yml")
    env = runner_env(tmp_path, github, {})
    assert "not-for-runners" not in env.values()
    assert "LLAMA_LAB" not in env and env["GITHUB_REF_TYPE"] == "tag"
    assert env["CI"] == "true" and env["GITHUB_REF_NAME"] == "v1.0.0"
    assert not any(str(REPO_ROOT) in p for p in env["PATH"].split(os.pathsep))
