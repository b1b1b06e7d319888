"""The release train (.github/workflows/train.yml) replayed job by job in the lab, against a
synthetic upstream: release tags on a local copy of the pinned llama.cpp, each one a scenario
the train must handle without a person.

  b100  the pin itself: the first release (edge, then stable: nothing to compare with yet)
  b101  an upstream commit that changes nothing we run: edge, the gates pass, stable moves
  ----  no newer upstream tag, no newer Debian package: nothing to do
  ----  a newer ca-certificates in a local apt repository (a Debian suite's update stand-in):
        the stable pin rebuilt, edge, gates, stable moves; the SBOM says what changed
  b102  decode() sleeps 8 ms per batch: edge only; promotion refused on the generation gate,
        both figures printed, stable unchanged
  b103  does not compile: nothing moves; the candidate record and the output name the stage

Each refusal has its counterpart that passes: b101 (same gates, nothing slow; it compiles),
and the empty apt repository (nothing newer). The scenarios run in order, in one registry:
each one starts where the one before it left the channels.

Substitutions besides the replay's own (tests/replay.py): GitHub (the record job's push and
pull request) by tests/fixtures/github.py, Debian's update suites by tests/fixtures/apt_repo.py,
keyless signing by the session's cosign key. What the repository variable TRACK_OPTIONS
would be on a CI-size runner: the cpu backend, amd64, x86-64-v3 kernels
(tests/fixtures/lab.py). CI-size gates: the
checked-out gates.yaml with 3 throughput rounds and 1 warm-up request instead of 7 and 2 (the
confirmation, as many rounds again, stays); the rounds the release uses are exercised by
`nox -s bench` and the five identical promotions of the note, not here. TRACK_OPTIONS says
--no-reproducible: the rebuild without the layer cache costs a cold compile here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.apt_repo import LAB_SUFFIX, AptRepository
from fixtures.github import GitHubStandIn
from fixtures.lab import TEST_CPU_VARIANTS, build_lock
from fixtures.registry import LocalRegistry
from fixtures.signing import KeyPair
from replay import (
    Action,
    Job,
    checkout,
    docker_login,
    download_artifact,
    failure_report,
    job_runs,
    jobs_in_order,
    lab_cosign,
    load_workflow,
    render,
    run_job,
    runner_env,
    setup_buildx,
    setup_python,
    substitute,
    upload_artifact,
)

from pipeline.matrix import load_matrix
from pipeline.modelfiles.catalogue import MODEL_CACHE_ENV, model_cache

pytestmark = [pytest.mark.slow, pytest.mark.docker]

REPOSITORY = "acme/llama-server-images"
PIN_BUILD = 100
SLOW_MS = 8


# ------------------------------------------------------------------------ synthetic upstream


def git(path: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(path), "-c", "user.name=upstream", "-c", "user.email=u@x", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@dataclass
class Upstream:
    """A copy of the lab's llama.cpp mirror, the pin tagged b100, where tests add releases."""

    path: Path
    pin: str

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def release(self, tag: str, base: str, change: Callable[[Path], None] | None = None) -> str:
        """Tag a new commit on top of `base` (a tag) as `tag`; `change` edits the tree."""
        git(self.path, "checkout", "-q", "--detach", base)
        if change is not None:
            change(self.path)
        git(self.path, "commit", "-q", "-a", "--allow-empty", "-m", f"release {tag}")
        git(self.path, "tag", tag)
        return git(self.path, "rev-parse", "HEAD")


def slow_decode(tree: Path) -> None:
    """llama_context::decode sleeps before every batch: generation measurably slower."""
    source = tree / "src" / "llama-context.cpp"
    text = source.read_text()
    signature = "int llama_context::decode(const llama_batch_ext & batch_inp) {\n"
    assert signature in text, "upstream's decode() moved: update the slow release"
    sleep = f"    std::this_thread::sleep_for(std::chrono::milliseconds({SLOW_MS}));\n"
    text = text.replace(signature, signature + sleep, 1)
    source.write_text("#include <chrono>\n#include <thread>\n" + text)


def does_not_compile(tree: Path) -> None:
    source = tree / "src" / "llama-context.cpp"
    source.write_text('#error "this release does not compile"\n' + source.read_text())


# ---------------------------------------------------------------------------- the train line


@dataclass
class TrainRun:
    """One run of train.yml: its jobs as they ran (a job the workflow skipped is absent)."""

    jobs: dict[str, Job]
    artifacts: Path

    def output(self) -> str:
        return "\n".join(job.output() for job in self.jobs.values())

    def candidate(self) -> dict[str, Any]:
        return dict(json.loads((self.artifacts / "candidate" / "candidate.json").read_text()))


@dataclass
class Line:
    """The registry, signing key, upstream and GitHub stand-in every scenario shares."""

    registry: LocalRegistry
    user: tuple[str, str]
    keys: KeyPair
    upstream: Upstream
    github: GitHubStandIn
    apt: AptRepository
    home: Path
    image: str = "acme/llama-server"
    runs: list[TrainRun] = field(default_factory=list)
    apt_sources: str = ""

    def run(self, ref: str = "") -> TrainRun:
        """train.yml, dispatched by hand with `ref` (empty: what the schedule does)."""
        github = _github("workflow_dispatch", "refs/heads/main", "train.yml")
        return self.replay("train.yml", github, {"ref": ref}, ci_size_checkout)

    def release(self, version: str, branch: str, *, release_gates: bool = False) -> TrainRun:
        """release.yml on the tag v<version>, pushed on the record job's branch (what merging
        its pull request gives): version.json as the train recorded it. release_gates: with
        gates.yaml's own throughput rounds, not CI's."""
        recorded = self.github.branch_file(REPOSITORY, branch, "version.json")
        clean_checkout = checkout if release_gates else ci_size_checkout

        def checkout_release(job: Job, inputs: Mapping[str, str]) -> str:
            done = clean_checkout(job, inputs)
            (job.workspace / "version.json").write_text(recorded)
            return f"{done}; version.json of {branch}"

        github = _github("push", f"refs/tags/v{version}", "release.yml")
        return self.replay("release.yml", github, {}, checkout_release)

    def replay(
        self, name: str, github: dict[str, Any], inputs: dict[str, Any], checkout_action: Action
    ) -> TrainRun:
        """Every job of the workflow in order, as GitHub would run them (a job whose `if:` or
        `needs` rule it out is skipped; the first failing job stops the run)."""
        workflow = load_workflow(name)
        number = len(self.runs) + 1
        artifacts = self.home / f"run-{number}" / "artifacts"
        artifacts.mkdir(parents=True)
        variables = {
            "TRACK_OPTIONS": f"--backend cpu --platform linux/amd64 --cpu-variants "
            f"{TEST_CPU_VARIANTS} --no-reproducible",
            "APT_SOURCES": self.apt_sources,
        }
        secret_values = {
            "REGISTRY_USERNAME": self.user[0],
            "REGISTRY_PASSWORD": self.user[1],
        }
        # The workflow's env, the image in this registry, without FORCE_COLOR (plain output).
        base = {"github": github, "vars": variables, "secrets": secret_values}
        workflow_env = {
            key: substitute(render(value), base)
            for key, value in workflow["env"].items()
            if key != "FORCE_COLOR"
        } | {"IMAGE": f"{self.registry.host}/{self.image}", "REGISTRY_HOST": self.registry.host}
        uses: dict[str, Action] = {
            "actions/checkout": checkout_action,
            "actions/setup-python": setup_python,
            "docker/setup-buildx-action": setup_buildx,
            "docker/login-action": docker_login(
                lambda registry: self.registry.host if registry == "docker.io" else registry
            ),
            "sigstore/cosign-installer": lab_cosign,
            "actions/upload-artifact": upload_artifact(artifacts),
            "actions/download-artifact": download_artifact(artifacts),
        }
        # Keyless signing stands in as the session's key; the model from the lab's cache.
        lab = {MODEL_CACHE_ENV: str(model_cache()), **self.keys.signing_env()}
        per_job_env = {
            "track": {"LLAMA_CPP_REMOTE": self.upstream.url, **lab},
            "edge": lab,
            "promote": lab,
            "record": {
                "GITHUB_SERVER_URL": self.github.server_url,
                "GITHUB_API_URL": self.github.api_url,
            },
        }
        jobs: dict[str, Job] = {}
        needs: dict[str, Any] = {}
        for job_name, spec in jobs_in_order(workflow):
            wanted = _needs(spec)
            if any(needs.get(n, {}).get("result") != "success" for n in wanted):
                continue  # a job whose needs did not all succeed is skipped
            context = {
                **base,
                "inputs": inputs,
                "matrix": {},
                "env": workflow_env,
                "needs": {n: needs[n] for n in wanted},
            }
            if not job_runs(spec, context):
                needs[job_name] = {"result": "skipped", "outputs": {}}
                continue
            if job_name == "record":  # github.token: the job's own token, the stand-in's
                context["github"] = github | {"token": self.github.token}
            home = self.home / f"run-{number}" / job_name
            env = runner_env(home, github, per_job_env.get(job_name, {}))
            job = run_job(Job(job_name, spec, context, home, env), workflow_env, uses)
            jobs[job_name] = job
            needs[job_name] = {
                "result": "failure" if job.failed else "success",
                "outputs": job.outputs,
            }
        done = TrainRun(jobs, artifacts)
        self.runs.append(done)
        return done

    # What the registry says.

    def tag(self, tag: str) -> str | None:
        response = httpx.get(
            f"http://{self.registry.host}/v2/{self.image}/manifests/{tag}",
            auth=self.user,
            headers={"Accept": "application/vnd.oci.image.index.v1+json"},
            timeout=30,
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return str(response.headers["Docker-Content-Digest"])

    def channels(self) -> dict[str, str | None]:
        return {name: self.tag(name) for name in ("latest", "edge")}


CI_GATES = {"rounds": 3, "warmup": 1}  # throughput: what gates.yaml says, CI-size


def ci_size_checkout(job: Job, inputs: Mapping[str, str]) -> str:
    """actions/checkout, then gates.yaml's throughput rounds cut to CI_GATES (committed: the
    workspace is clean, as a checkout is)."""
    done = checkout(job, inputs)
    path = job.workspace / "pipeline" / "publish" / "gates.yaml"
    text = path.read_text()
    for key, value in CI_GATES.items():
        text, count = re.subn(rf"(?m)^(  {key}:) *\d+", rf"\g<1> {value}", text)
        assert count == 1, f"gates.yaml has no throughput.{key}"
    path.write_text(text)
    git = ["git", "-C", str(job.workspace), "-c", "user.name=replay", "-c", "user.email=r@x"]
    subprocess.run([*git, "commit", "-q", "-a", "--amend", "--no-edit"], check=True)
    return f"{done}; gates CI-size ({CI_GATES})"


def _github(event: str, ref: str, workflow: str) -> dict[str, Any]:
    return {
        "event_name": event,
        "ref": ref,
        "ref_name": ref.rsplit("/", 1)[-1],
        "ref_type": "tag" if ref.startswith("refs/tags/") else "branch",
        "repository": REPOSITORY,
        "sha": "0" * 40,
        "workflow": workflow.removesuffix(".yml"),
        "workflow_ref": f"{REPOSITORY}/.github/workflows/{workflow}@{ref}",
    }


def _needs(spec: Mapping[str, Any]) -> list[str]:
    value = spec.get("needs", [])
    return [value] if isinstance(value, str) else list(value)


@pytest.fixture(scope="module")
def line(
    tmp_path_factory: pytest.TempPathFactory,
    upstream_mirror: Path,
    cosign_keys: KeyPair,
    github_stand_in: GitHubStandIn,
    apt_repository: AptRepository,
    docker_engine: None,
) -> Iterator[Line]:
    root = tmp_path_factory.mktemp("train")
    upstream = root / "llama.cpp"
    subprocess.run(
        ["git", "clone", "-q", "--shared", str(upstream_mirror), str(upstream)], check=True
    )
    pin = git(upstream, "rev-parse", "HEAD")
    git(upstream, "tag", f"b{PIN_BUILD}", pin)
    github_stand_in.repository(REPOSITORY)  # the project's repository on the stand-in
    user = ("train-bot", f"replay-{secrets.token_hex(12)}")
    registry = LocalRegistry(root / "registry", user)
    registry.start()
    try:
        yield Line(registry, user, cosign_keys, Upstream(upstream, pin), github_stand_in,
                   apt_repository, root)  # fmt: skip
    finally:
        registry.stop()


def _promotion(run: TrainRun) -> dict[str, Any]:
    (path,) = (run.artifacts / "promotion").rglob("promotion.json")
    return dict(json.loads(path.read_text()))


def _gates(run: TrainRun) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in _promotion(run)["gates"]}


def _figure(label: str, run: TrainRun, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = {name: round(job.seconds) for name, job in run.jobs.items()}
    candidate = run.artifacts / "candidate" / "candidate.json"
    stages = ""
    if candidate.is_file():
        stages = "; ".join(
            f"{s['stage']} {s['seconds']:.0f} s"
            for s in json.loads(candidate.read_text())["stages"]
        )
    with capsys.disabled():
        print(f"\nFIGURE train {label}: jobs {seconds}; stages: {stages}")


# --------------------------------------------------------------------------------- scenarios


def test_the_pin_is_the_first_release(line: Line, capsys: pytest.CaptureFixture[str]) -> None:
    with build_lock():
        run = line.run()
    _figure("b100 (first release)", run, capsys)
    assert set(run.jobs) == {"track", "promote", "record"}, failure_report(
        next(iter(run.jobs.values()))
    )
    for job in run.jobs.values():
        assert not job.failed, failure_report(job)
    candidate = run.candidate()
    assert candidate["ref"] == f"b{PIN_BUILD}" and candidate["status"] == "published"
    # Every tier publish requires ran on the pushed digest, the real tier included.
    (image,) = candidate["images"]
    assert {t["tier"] for t in image["tiers"]} == {"no-gpu", "real"}
    assert all(t["passed"] for t in image["tiers"])
    index = candidate["indexes"]["cpu"]
    assert line.channels() == {"latest": index, "edge": index}
    assert line.tag(f"b{PIN_BUILD}") == index
    assert line.tag(candidate["version"]) == index
    # Nothing to compare with: the speed gates say so and pass.
    gates = _gates(run)
    assert "no stable release" in gates["generation"]["detail"]
    # The release is recorded through a pull request: version.json on its branch.
    pull = line.github.pulls[-1]
    assert pull["title"] == f"Release {candidate['version']}" and "| gate |" in pull["body"]
    pinned = json.loads(line.github.branch_file(REPOSITORY, pull["head"], "version.json"))
    assert pinned["version"] == candidate["version"]
    assert pinned["llama_cpp"]["commit"] == line.upstream.pin
    assert pinned["llama_cpp"]["ref"] == f"b{PIN_BUILD}"


def test_a_good_upstream_release_reaches_stable(
    line: Line, capsys: pytest.CaptureFixture[str]
) -> None:
    before = line.channels()
    commit = line.upstream.release("b101", f"b{PIN_BUILD}")
    with build_lock():
        run = line.run()
    _figure("b101 (good)", run, capsys)
    for job in run.jobs.values():
        assert not job.failed, failure_report(job)
    assert "record" in run.jobs
    candidate = run.candidate()
    assert (candidate["ref"], candidate["commit"]) == ("b101", commit)
    index = candidate["indexes"]["cpu"]
    assert index != before["latest"]
    assert line.channels() == {"latest": index, "edge": index}
    # CI-size: --no-reproducible (the rebuild without the layer cache compiled all 212 objects
    # again, ~10 min on 2 cores, where ccache was expected to serve them: not understood yet).
    assert candidate["reproducible"] is None
    gates = _gates(run)
    assert all(g["passed"] for g in gates.values()), gates
    # Measured side by side, with both figures.
    for name in ("generation", "prompt", "healthy"):
        assert gates[name]["candidate"] and gates[name]["stable"], gates[name]
    with capsys.disabled():
        print("\nFIGURE train b101 gates: " + _gate_line(gates))
    # `nox -s verify` shows the gates' figures attested on the promoted digest.
    (verify_json,) = (run.artifacts / "promotion").rglob("verify.json")
    verified = json.loads(verify_json.read_text())
    (platform,) = verified["platforms"]
    assert platform["digest"] == candidate["images"][0]["digest"]
    assert re.search(r"generation: passed: candidate [\d.]+ tokens/s", platform["promotion"])


def test_a_release_tag_promotes_what_edge_proved_without_building(
    line: Line, capsys: pytest.CaptureFixture[str]
) -> None:
    """release.yml on the tag of the train's recorded release (its pull request merged): edge
    already proved the pin at that version, so nothing is built; the candidate is identical to
    stable, the gates pass and no tag moves."""
    before = line.channels()
    pull = line.github.pulls[-1]
    version = pull["title"].removeprefix("Release ")
    run = line.release(version, pull["head"])
    _figure(f"release.yml v{version}", run, capsys)
    assert set(run.jobs) == {"edge", "promote"}, sorted(run.jobs)  # no build job ran
    for job in run.jobs.values():
        assert not job.failed, failure_report(job)
    candidate = json.loads((run.artifacts / "candidate" / "candidate.json").read_text())
    assert candidate["reason"] == "proven on edge" and candidate["version"] == version
    assert candidate["indexes"]["cpu"] == before["latest"]
    (image,) = candidate["images"]
    assert {t["tier"] for t in image["tiers"]} == {"no-gpu", "real"}  # read from attestations
    gates = _gates(run)
    assert all(g["passed"] for g in gates.values()), gates
    with capsys.disabled():
        print("\nFIGURE identical candidate (release.yml) gates: " + _gate_line(gates))
    assert line.channels() == before


# The note's five promotions of a candidate identical to stable, with the release's own gates
# (gates.yaml's rounds): about 8 min on a quiet machine, so asked for, not in CI's run.
RELEASE_GATES_ENV = "LLAMA_TEST_RELEASE_GATES"
IDENTICAL_PROMOTIONS = 5


def test_an_identical_candidate_passes_the_release_gates_every_time(
    line: Line, capsys: pytest.CaptureFixture[str]
) -> None:
    """Noise must not refuse a good candidate: release.yml promotes the candidate identical to
    stable IDENTICAL_PROMOTIONS times with gates.yaml's own rounds; every gate passes each time,
    and the figures' spread is printed."""
    if os.environ.get(RELEASE_GATES_ENV) != "1":
        pytest.skip(
            f"{IDENTICAL_PROMOTIONS} promotions with the release's gates take ~8 min of a quiet "
            f"machine: set {RELEASE_GATES_ENV}=1 and run this file alone"
        )
    pull = line.github.pulls[-1]
    version = pull["title"].removeprefix("Release ")
    ratios: dict[str, list[float]] = {}
    for attempt in range(1, IDENTICAL_PROMOTIONS + 1):
        before = line.channels()
        run = line.release(version, pull["head"], release_gates=True)
        for job in run.jobs.values():
            assert not job.failed, f"promotion {attempt}: {failure_report(job)}"
        gates = _gates(run)
        with capsys.disabled():
            print(f"\nFIGURE identical promotion {attempt} (release gates): {_gate_line(gates)}")
        assert all(g["passed"] for g in gates.values()), (attempt, gates)
        assert line.channels() == before
        for name, gate in gates.items():
            if gate["ratio"] is not None:  # the tiers gate has none: passed or not
                ratios.setdefault(name, []).append(float(gate["ratio"]))
    with capsys.disabled():
        for name, values in sorted(ratios.items()):
            print(f"FIGURE identical promotions {name}: ratios {values}, spread "
                  f"{max(values) - min(values):.3f}")  # fmt: skip


def _gate_line(gates: dict[str, dict[str, Any]]) -> str:
    return "; ".join(
        f"{n} {g['candidate']} vs {g['stable']} ({g['ratio']})" for n, g in sorted(gates.items())
    )


def test_nothing_newer_means_nothing_to_do(line: Line) -> None:
    """The counterpart of the packaging rebuild: the apt source is there, with nothing newer."""
    before = line.channels()
    line.apt_sources = line.apt.line
    run = line.run()
    assert set(run.jobs) == {"track"} and not run.jobs["track"].failed, failure_report(
        run.jobs["track"]
    )
    assert "nothing to do" in run.output()
    assert line.channels() == before


def test_a_newer_debian_package_rebuilds_the_stable_pin(
    line: Line, capsys: pytest.CaptureFixture[str]
) -> None:
    before = line.channels()
    builder = load_matrix().backends["cpu"].builder_image
    newer = line.apt.publish_newer("ca-certificates", builder)
    assert newer.endswith(LAB_SUFFIX)
    with build_lock():
        run = line.run()
    _figure("packaging (ca-certificates)", run, capsys)
    for job in run.jobs.values():
        assert not job.failed, failure_report(job)
    candidate = run.candidate()
    assert candidate["reason"].startswith("packaging: ca-certificates"), candidate["reason"]
    assert newer in candidate["reason"]
    assert candidate["ref"] == "b101"  # the stable pin, not a newer upstream
    index = candidate["indexes"]["cpu"]
    assert index != before["latest"]
    assert line.channels() == {"latest": index, "edge": index}
    # What changed in the SBOM: the one package, nothing else.
    old, new = (_sbom_packages(line, digest) for digest in (before["latest"], index))
    changed = {name: (old.get(name), new.get(name)) for name in old.keys() | new.keys()}
    changed = {name: pair for name, pair in changed.items() if pair[0] != pair[1]}
    assert list(changed) == ["ca-certificates"] and changed["ca-certificates"][1] == newer
    with capsys.disabled():
        print(f"\nFIGURE train packaging rebuild: SBOM changed {changed}")


def _sbom_packages(line: Line, index: str | None) -> dict[str, str]:
    """package -> version: the Debian packages in the SBOM of the cpu amd64 image the run that
    published `index` built (the SBOM its attestation carries)."""
    run = next(
        r
        for r in line.runs
        if (r.artifacts / "candidate" / "candidate.json").is_file()  # nothing to do: none
        and (r.candidate().get("indexes") or {}).get("cpu") == index
    )
    (sbom,) = (run.artifacts / "candidate").glob("*/build/reports/sbom-cpu-amd64.cdx.json")
    components = json.loads(sbom.read_text()).get("components", [])
    return {
        str(c["name"]): str(c["version"])
        for c in components
        if str(c.get("purl", "")).startswith("pkg:deb/")
    }


def test_a_slower_upstream_release_stays_on_edge(
    line: Line, capsys: pytest.CaptureFixture[str]
) -> None:
    before = line.channels()
    line.upstream.release("b102", "b101", slow_decode)
    with build_lock():
        run = line.run()
    _figure("b102 (slow)", run, capsys)
    assert not run.jobs["track"].failed, failure_report(run.jobs["track"])
    candidate = run.candidate()
    index = candidate["indexes"]["cpu"]
    assert line.tag("edge") == index and line.tag("b102") == index  # on edge: it works
    promote = run.jobs["promote"]
    assert promote.failed and "record" not in run.jobs
    output = promote.output()
    line_ = re.search(
        r"gate generation: FAILED: candidate ([\d.]+) tokens/s, stable ([\d.]+)", output
    )
    assert line_, output[-3000:]
    assert float(line_[1]) < 0.95 * float(line_[2])
    assert re.search(r"refused: [a-z, ]*generation", output), output[-3000:]
    gates = _gates(run)
    assert not gates["generation"]["passed"] and gates["tiers"]["passed"]
    with capsys.disabled():
        print("\nFIGURE train b102 gates: " + _gate_line(gates))
    # No stable tag moved; edge stays on the candidate.
    assert line.channels() == {"latest": before["latest"], "edge": index}


def test_an_upstream_release_that_does_not_compile_moves_nothing(
    line: Line, capsys: pytest.CaptureFixture[str]
) -> None:
    before = line.channels()
    line.upstream.release("b103", "b101", does_not_compile)
    with build_lock():
        run = line.run()
    _figure("b103 (does not compile)", run, capsys)
    track = run.jobs["track"]
    assert track.failed and set(run.jobs) == {"track"}
    candidate = run.candidate()
    assert candidate["status"] == "failed" and candidate["ref"] == "b103"
    assert candidate["failed_stage"] == "build cpu linux/amd64"
    (stage,) = [s for s in candidate["stages"] if s["exit_code"] != 0]
    assert any("does not compile" in line_ for line_ in stage["tail"]), stage["tail"]
    assert "build cpu linux/amd64 failed" in track.output()
    assert line.channels() == before and line.tag("b103") is None
