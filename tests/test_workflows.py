"""The GitHub workflows: actionlint and zizmor clean, and the release shape issue 5 asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOWS = Path(__file__).resolve().parent.parent / ".github" / "workflows"
USES_RE = re.compile(r"^\s*(?:-\s*)?uses:\s*(\S+?)@(\S+)(?:\s+#\s*(\S+))?\s*$", re.M)


def tool(name: str) -> str:
    """The tool from the test extra, next to this interpreter (the venv's bin), or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def load(name: str) -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def test_actionlint_is_clean() -> None:
    result = subprocess.run(
        [tool("actionlint"), "-no-color", *sorted(map(str, WORKFLOWS.glob("*.yml")))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_is_clean_even_pedantic() -> None:
    result = subprocess.run(
        [tool("zizmor"), "--offline", "--persona=pedantic", "--no-progress", str(WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["release.yml", "ci.yml", "train.yml"])
def test_actions_are_pinned_by_full_commit_sha_with_the_version_noted(name: str) -> None:
    text = (WORKFLOWS / name).read_text()
    uses = USES_RE.findall(text)
    assert uses
    for action, ref, comment in uses:
        assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{action}@{ref} is not pinned by commit"
        assert re.fullmatch(r"v\d+\.\d+\.\d+", comment or ""), f"{action}: no version comment"


# Keyless signing needs the job's OIDC token: the jobs that sign or attest, and only they.
SIGNING_JOBS = {
    ("release.yml", "publish"),
    ("release.yml", "promote"),
    ("train.yml", "track"),
    ("train.yml", "promote"),
}
# The one job that writes to the repository: the train's pull request recording a release.
WRITING_JOBS = {("train.yml", "record"): {"contents": "write", "pull-requests": "write"}}


@pytest.mark.parametrize("name", ["release.yml", "ci.yml", "train.yml"])
def test_least_privilege_and_concurrency(name: str) -> None:
    workflow = load(name)
    assert workflow["permissions"] == {}
    assert "group" in workflow["concurrency"]
    for job_name, job in workflow["jobs"].items():
        signs = (name, job_name) in SIGNING_JOBS
        wanted = {"contents": "read", "id-token": "write"} if signs else {"contents": "read"}
        wanted = WRITING_JOBS.get((name, job_name), wanted)
        assert job.get("permissions") == wanted, job_name
        assert job.get("timeout-minutes"), job_name
        for step in job["steps"]:
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


def test_one_publisher_at_a_time_across_both_workflows() -> None:
    """release.yml and train.yml both move tags: one concurrency group for every ref."""
    groups = {name: load(name)["concurrency"] for name in ("release.yml", "train.yml")}
    assert {g["group"] for g in groups.values()} == {"publish"}
    assert all(g["cancel-in-progress"] is False for g in groups.values())


def test_train_shape() -> None:
    workflow = load("train.yml")
    assert workflow["on"]["schedule"] and workflow["on"]["workflow_dispatch"]["inputs"]["ref"]
    jobs = workflow["jobs"]
    assert jobs["promote"]["needs"] == "track" and jobs["record"]["needs"] == "promote"
    assert "needs.track.outputs.candidate" in jobs["promote"]["if"]
    runs = {
        name: "\n".join(str(s.get("run", "")) for s in job["steps"]) for name, job in jobs.items()
    }
    assert "nox -s track" in runs["track"] and "nox -s promote" in runs["promote"]
    assert "nox -s verify" in runs["promote"]
    # The token never reaches a command line: git reads it through a credential helper, curl
    # its header from stdin (printf is a shell builtin).
    assert "GH_TOKEN" in jobs["record"]["steps"][-1]["env"]
    uses = re.findall(r".*\$\{GH_TOKEN\}.*", runs["record"])
    assert len(uses) == 2, uses
    assert "credential.helper=" in uses[0] and uses[1].strip().startswith("printf "), uses


def test_release_promotes_what_edge_proved_and_builds_only_the_rest() -> None:
    jobs = load("release.yml")["jobs"]
    assert "--from-edge" in "\n".join(str(s.get("run", "")) for s in jobs["edge"]["steps"])
    assert jobs["promote"]["needs"] == "edge" and jobs["build"]["needs"] == "edge"
    assert jobs["promote"]["if"] == "${{ needs.edge.outputs.candidate == 'true' }}"
    assert jobs["build"]["if"] == "${{ needs.edge.outputs.candidate != 'true' }}"


def test_release_shape() -> None:
    workflow = load("release.yml")
    assert workflow["on"]["push"]["tags"] == ["v*"]
    assert workflow["on"]["workflow_dispatch"]["inputs"]["dry-run"]["type"] == "boolean"
    assert workflow["concurrency"]["cancel-in-progress"] is False
    build = workflow["jobs"]["build"]
    matrix = build["strategy"]["matrix"]
    assert matrix["arch"] == ["amd64", "arm64"]
    runners = {entry["arch"]: entry["runner"] for entry in matrix["include"]}
    assert runners == {"amd64": "ubuntu-24.04", "arm64": "ubuntu-24.04-arm"}
    runs = "\n".join(str(step.get("run", "")) for step in build["steps"])
    assert "nox -s sync" in runs
    assert re.search(
        r'nox -s build -- "\$\{ARCH\}" --backend "\$\{BACKEND\}" --push-by-digest', runs
    )
    assert "--attest" in runs and "type=registry" in runs
    assert "nox -s smoke" in runs
    assert any(
        "pip install" in str(s.get("run", "")) and "nox" in str(s.get("run", ""))
        for s in build["steps"]
    )
    publish = workflow["jobs"]["publish"]
    assert publish["needs"] == ["build", "gpu-smoke", "amd-gpu-smoke"]
    publish_runs = "\n".join(str(step.get("run", "")) for step in publish["steps"])
    assert 'nox -s publish -- "$@"' in publish_runs and "--dry-run" in publish_runs
    assert "--no-gpu-runner" in publish_runs
    # Secrets reach publish through the environment only.
    step = next(s for s in publish["steps"] if "nox -s publish" in str(s.get("run", "")))
    assert set(step["env"]) >= {"REGISTRY_USERNAME", "REGISTRY_PASSWORD"}
    assert "secrets." not in str(step["run"])
    assert "nox -s verify" in publish_runs
    installer = next(s for s in publish["steps"] if "cosign-installer" in str(s.get("uses")))
    assert re.fullmatch(r"v\d+\.\d+\.\d+", installer["with"]["cosign-release"])


def test_release_builds_the_backends_it_can_publish_and_gpu_smokes_the_gpu_ones() -> None:
    """publish refuses digests without the smoke tiers matrix.yaml requires, so the release
    builds exactly the backends publishable without a GPU runner (publish_requires, or
    publish_without_gpu), on each of their platforms; the gpu-smoke job runs the gpu tier of
    those that have one, on the runner vars.GPU_RUNNER names, and publish waits for it."""
    from pipeline.matrix import load_matrix

    matrix = load_matrix()
    jobs = load("release.yml")["jobs"]
    build = jobs["build"]["strategy"]["matrix"]
    publishable = [n for n, b in matrix.backends.items() if b.smoke.required(False) is not None]
    assert build["backend"] == publishable
    # Each backend on its own platforms only.
    built = {
        (b, a)
        for b in build["backend"]
        for a in build["arch"]
        if {"backend": b, "arch": a} not in build.get("exclude", [])
    }
    assert built == {(n, p.arch) for n in publishable for p in matrix.backend(n).platforms}
    with_gpu_tier = [n for n in publishable if matrix.backend(n).smoke.needs_gpu]
    # NVIDIA's GPUs through the container toolkit; AMD's as devices (the gpu tier's `devices`).
    nvidia = [n for n in with_gpu_tier if not matrix.backend(n).smoke.tiers["gpu"].devices]
    amd = [n for n in with_gpu_tier if n not in nvidia]
    for job, backends, runner in (
        ("gpu-smoke", nvidia, "GPU_RUNNER"),
        ("amd-gpu-smoke", amd, "AMD_GPU_RUNNER"),
    ):
        assert jobs[job]["strategy"]["matrix"]["backend"] == backends
        assert f"vars.{runner}" in jobs[job]["if"]
        assert jobs[job]["runs-on"] == f"${{{{ vars.{runner} }}}}"
        runs = "\n".join(str(step.get("run", "")) for step in jobs[job]["steps"])
        assert "--tier gpu" in runs
        # publish is told which backends had no runner when this one is not configured.
        step = next(s for s in jobs["publish"]["steps"] if "nox -s publish" in str(s))
        assert step["env"][runner] == f"${{{{ vars.{runner} }}}}"
        assert f'if [ -z "${{{runner}}}" ]' in step["run"]
        assert ",".join(backends) in step["run"]
    assert set(jobs["publish"]["needs"]) == {"build", "gpu-smoke", "amd-gpu-smoke"}


def test_ci_runs_lint_and_tests_on_pull_requests() -> None:
    workflow = load("ci.yml")
    assert "pull_request" in workflow["on"]
    runs = [str(step.get("run", "")) for job in workflow["jobs"].values() for step in job["steps"]]
    assert any("nox -s lint" in run for run in runs)
    assert any("nox -s tests" in run for run in runs)
