"""The publish plan's pure part, without the lab: `review` reads build and smoke records against
each other, version.json and the matrix, and says what may be published and what refuses it.
No registry, no Docker: these run wherever the test suite runs (pull requests included)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from fixtures.lab import REPO_ROOT

from pipeline.core.errors import UsageError
from pipeline.core.project import Project
from pipeline.publish.options import PublishOptions
from pipeline.publish.plan import auths_for, review
from pipeline.records import BuildRecord, CheckResult, SmokeRecord
from pipeline.records.publish import PublishRecord, load_publish_record

VERSION = json.loads((REPO_ROOT / "version.json").read_text())
COMMIT = VERSION["llama_cpp"]["commit"]
FAILED_CHAT = CheckResult("chat", False, 1.0)
DIGESTS = {"linux/amd64": "sha256:" + "a" * 64, "linux/arm64": "sha256:" + "b" * 64}


def build(backend: str, platform: str, **changes: object) -> BuildRecord:
    record = BuildRecord(
        backend=backend,
        platform=platform,
        image="127.0.0.1:5000/acme/llama-server",
        ref=f"127.0.0.1:5000/acme/llama-server@{DIGESTS[platform]}",
        digest=DIGESTS[platform],
        output="push-by-digest",
        commit=COMMIT,
        version=VERSION["version"],
        size_bytes=None,
        seconds=1.0,
        cpu_variants="all",
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def smoke(record: BuildRecord, tier: str = "no-gpu", **changes: object) -> SmokeRecord:
    passed = SmokeRecord(
        image=record.ref,
        digest=record.digest,
        backend=record.backend,
        platform=record.platform,
        passed=True,
        seconds=1.0,
        checks=(CheckResult("health", True, 0.1),),
        tier=tier,
    )
    return replace(passed, **changes)  # type: ignore[arg-type]


@pytest.fixture
def options(tmp_path: Path) -> PublishOptions:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "version.json", root / "version.json")
    return PublishOptions.named(Project(root), env={}, no_sign=True)


def tiers(builds: list[BuildRecord], *names: str) -> list[SmokeRecord]:
    """A passed smoke record of each build in each tier named."""
    return [smoke(b, tier) for tier in names for b in builds]


def cpu_release() -> tuple[list[BuildRecord], list[SmokeRecord]]:
    builds = [build("cpu", p) for p in DIGESTS]
    return builds, tiers(builds, "no-gpu", "real", "cpus")


def test_a_smoke_tested_release_passes_review(options: PublishOptions) -> None:
    builds, smokes = cpu_release()
    checked = review(options, builds, smokes)
    assert checked.refusals == ()
    (group,) = checked.groups
    assert group.backend.name == "cpu"
    assert [s.platform for s in group.sources] == ["linux/amd64", "linux/arm64"]


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda b, s: (b, s[1:]), "cpu linux/amd64 (sha256:aaaaaaaaaaaa…) has no smoke report"),
        (lambda b, s: (b, s[:2]), "cpu linux/amd64 (sha256:aaaaaaaaaaaa…), tier real, has no"),
        (
            lambda b, s: (b, [replace(s[0], passed=False, checks=(FAILED_CHAT,)), s[1]]),
            "failed its smoke test (chat)",
        ),
        (
            lambda b, s: (b, [replace(s[0], digest="sha256:" + "0" * 64), s[1]]),
            "its smoke report tested another digest",
        ),
        (lambda b, s: ([replace(b[0], output="load"), b[1]], s), "so no registry holds it"),
        (lambda b, s: ([replace(b[0], version="0.0.9"), b[1]], s), "version.json says"),
        (lambda b, s: ([b[0]], s), "missing linux/arm64"),
        (
            lambda b, s: ([replace(b[0], cpu_variants="host"), b[1]], s),
            "--cpu-variants host, for the building machine's CPU only",
        ),
        (lambda b, s: ([*b, b[0]], s), "two build reports for cpu linux/amd64"),
    ],
    ids=[
        "no-smoke",
        "no-real",
        "failed",
        "other-digest",
        "unpushed",
        "stale",
        "partial",
        "host",
        "twice",
    ],
)
def test_what_refuses_a_publish_is_named(
    options: PublishOptions, spoil: object, expected: str
) -> None:
    builds, smokes = spoil(*cpu_release())  # type: ignore[operator]
    refusals = review(options, builds, smokes).refusals
    assert any(expected in refusal.message for refusal in refusals), refusals
    # The same release unspoilt passes: the refusal comes from the spoiling alone.
    assert review(options, *cpu_release()).refusals == ()


def test_an_image_with_every_cpu_variant_needs_the_cpus_tier(options: PublishOptions) -> None:
    """matrix.yaml: cpu's publish_requires_by_cpu_variants {all: [cpus]}. An image with one
    kernel set (CI's x86-64-v3) leaves ggml no choice to prove, and needs no cpus tier."""
    builds = [build("cpu", p) for p in DIGESTS]
    without_cpus = tiers(builds, "no-gpu", "real")
    refusals = [r.message for r in review(options, builds, without_cpus).refusals]
    assert len(refusals) == 1 and "tier cpus, has no smoke report" in refusals[0], refusals
    assert "cpu linux/arm64" in refusals[0] and "cpu linux/amd64" in refusals[0]
    one_set = [replace(b, cpu_variants="x86-64-v3") for b in builds]
    assert review(options, one_set, tiers(one_set, "no-gpu", "real")).refusals == ()
    # Required means passed: a failed cpus tier refuses too.
    failed = [replace(s, passed=False, checks=(FAILED_CHAT,)) for s in tiers(builds, "cpus")]
    refusals = [r.message for r in review(options, builds, [*without_cpus, *failed]).refusals]
    assert any("failed its smoke test (chat)" in r for r in refusals), refusals


def test_gpu_backends_need_their_gpu_tier_unless_the_release_had_no_gpu_runner(
    options: PublishOptions,
) -> None:
    builds = [build("cuda13", p) for p in DIGESTS]
    smokes = tiers(builds, "no-gpu", "real")
    (refusal,) = review(options, builds, smokes).refusals
    assert "tier gpu, has no smoke report" in refusal.message
    without = replace(options, no_gpu_runner=("cuda13",))
    checked = review(without, builds, smokes)
    assert checked.refusals == ()
    assert "published on its no-gpu smoke tier only" in " ".join(checked.notes)
    assert review(options, builds, [*smokes, *tiers(builds, "gpu")]).refusals == ()
    # Each GPU backend by its own runner: the AMD runner's absence is rocm's alone.
    rocm = [build("rocm", "linux/amd64")]
    (refusal,) = review(without, rocm, tiers(rocm, "no-gpu", "real")).refusals
    assert "rocm linux/amd64" in refusal.message and "tier gpu, has no smoke" in refusal.message
    no_amd = replace(options, no_gpu_runner=("rocm",))
    checked = review(no_amd, rocm, tiers(rocm, "no-gpu", "real"))
    assert checked.refusals == () and "rocm: published on its no-gpu" in " ".join(checked.notes)
    (refusal,) = review(no_amd, builds, smokes).refusals  # cuda13 still needs its gpu tier
    assert "cuda13 linux/amd64" in refusal.message


def test_the_default_backend_comes_first_and_backends_can_be_chosen(
    options: PublishOptions,
) -> None:
    builds, smokes = cpu_release()
    vulkan = [build("vulkan", p) for p in DIGESTS]
    everything = review(options, [*vulkan, *builds], [*smokes, *tiers(vulkan, "no-gpu", "real")])
    assert [g.backend.name for g in everything.groups] == ["cpu", "vulkan"]
    only = replace(options, backends=(options.matrix.backend("vulkan"),))
    assert [g.backend.name for g in review(only, [*vulkan, *builds], smokes).groups] == ["vulkan"]
    rocm = replace(options, backends=(options.matrix.backend("rocm"),))
    with pytest.raises(UsageError, match="no build reports for backend"):
        review(rocm, builds, smokes)


def test_a_publish_record_written_before_the_refactor_still_loads() -> None:
    """tests/data/records-0.1.0/publish.json: written by the publish code of 13e29dc (its
    PublishOutcome.record and write_publish_record, a plain dict before publish.json had a typed
    record) for a two-platform cpu release; read by the one loader, written back the same."""
    data = REPO_ROOT / "tests" / "data" / "records-0.1.0"
    record = load_publish_record(data)
    assert isinstance(record, PublishRecord) and record.verified and not record.dry_run
    (backend,) = record.backends
    assert backend.backend == "cpu" and backend.index and backend.index.startswith("sha256:")
    assert [t.tag for t in backend.tags] == ["0.1.0", "0.1", "0", "latest", "sha-0c1e570"]
    assert record.to_json() == json.loads((data / "publish.json").read_text())


def test_registry_credentials_go_to_their_own_registry_only(tmp_path: Path) -> None:
    """A build record naming another registry gets no credentials from REGISTRY_USERNAME/
    PASSWORD: they belong to REGISTRY_HOST, else version.json's image's registry."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO_ROOT / "version.json", root / "version.json")
    secrets = {"REGISTRY_USERNAME": "publisher", "REGISTRY_PASSWORD": "pw"}
    options = PublishOptions.named(Project(root), env=secrets, no_sign=True)
    builds, _ = cpu_release()
    foreign = [replace(b, image="evil.example/acme/llama-server") for b in builds]
    auths = auths_for(options.target, foreign, options.access)
    assert set(auths) == {options.target.registry} == {"docker.io"}
    moved = PublishOptions.named(
        Project(root), env={**secrets, "REGISTRY_HOST": "127.0.0.1:5000"}, no_sign=True
    )
    assert set(auths_for(moved.target, builds, moved.access)) == {"127.0.0.1:5000"}


def test_no_gpu_runner_names_backends_or_means_every_one(options: PublishOptions) -> None:
    """`--no-gpu-runner` bare: no GPU runner at all; `--no-gpu-runner rocm`: none with an AMD
    GPU (the NVIDIA images still need their gpu tier); an unknown name is refused."""
    root = options.project
    every = PublishOptions.named(root, env={}, no_sign=True, no_gpu_runner=True)
    assert not any(every.gpu_runner(name) for name in every.matrix.backends)
    amd = PublishOptions.named(root, env={}, no_sign=True, no_gpu_runner="rocm")
    assert amd.no_gpu_runner == ("rocm",) and amd.gpu_runner("cuda13")
    with pytest.raises(UsageError, match="opencl"):
        PublishOptions.named(root, env={}, no_sign=True, no_gpu_runner="opencl")
