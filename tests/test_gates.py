"""The promotion gates' decisions, without the lab: gates.yaml read and checked, the tiers and
size gates on candidate records, the throughput verdict on measured rounds (median of the
per-round ratios), and the line a refusal prints. The measuring itself runs in
tests/test_train.py, against real servers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.matrix import load_matrix
from pipeline.publish.gates import (
    GATES_FILE,
    _ratio_gate,
    _throughput_gates,
    load_gates,
    size_gates,
    tiers_gate,
)
from pipeline.records.candidate import CandidateImage, CandidateRecord, TierResult

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def image(
    tiers: tuple[TierResult, ...] = (),
    platform: str = "linux/amd64",
    compressed: int | None = 50_000_000,
    digest: str = DIGEST,
) -> CandidateImage:
    return CandidateImage("cpu", platform, digest, tiers, compressed)


def candidate(*images: CandidateImage) -> CandidateRecord:
    return CandidateRecord(
        ref="b101",
        commit="c" * 40,
        version="0.1.2",
        repository="127.0.0.1:5000/acme/llama-server",
        reason="upstream b101",
        status="published",
        seconds=1.0,
        images=images,
        indexes={"cpu": OTHER},
    )


PASSED = (TierResult("no-gpu", True, 10.0), TierResult("real", True, 30.0))


def test_the_shipped_gates_file_reads() -> None:
    gates = load_gates()
    assert gates.rounds >= 3 and gates.confirm and gates.min_throughput_ratio == 0.95
    assert gates.max_size_ratio == 1.10 and gates.max_healthy_ratio == 1.5
    assert len(gates.prompt.split()) > 150  # long enough to time prompt processing


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("rounds: 7", "rounds: 1"), "rounds"),
        (("min_ratio: 0.95", "min_ratio: 1.5"), "min_ratio"),
        (("schema: 1", "schema: 2"), "schema: 1"),
        (("confirm: true", "confirm: maybe"), "confirm"),
        (("\nhealthy:\n", "\nhealthy_typo:\n"), "healthy_typo"),
    ],
)
def test_a_bad_gates_file_is_refused_with_its_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = GATES_FILE.read_text()
    assert change[0] in text
    path = tmp_path / "gates.yaml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError, match=message):
        load_gates(path)


def test_tiers_gate_passes_only_when_every_required_tier_passed() -> None:
    matrix = load_matrix()
    assert tiers_gate(candidate(image(PASSED)), matrix).passed
    missing = tiers_gate(candidate(image(PASSED[:1])), matrix)
    assert not missing.passed and "cpu linux/amd64 real missing" in missing.detail
    failed = (PASSED[0], TierResult("real", False, 30.0, ("facts",)))
    refused = tiers_gate(candidate(image(failed)), matrix)
    assert not refused.passed and "real failed (facts)" in refused.detail
    assert not tiers_gate(candidate(), matrix).passed  # no image: nothing was proven
    # An image with every CPU variant (its build record's, or edge's label) needs the cpus tier.
    every = replace(image(PASSED), cpu_variants="all")
    gate = tiers_gate(candidate(every), matrix)
    assert not gate.passed and "cpu linux/amd64 cpus missing" in gate.detail
    cpus = (*PASSED, TierResult("cpus", True, 370.0, ()))
    assert tiers_gate(candidate(replace(every, tiers=cpus)), matrix).passed


def test_size_gate_takes_the_largest_ratio_of_a_backends_platforms() -> None:
    ours = candidate(
        image(PASSED, "linux/amd64", 52_000_000),
        image(PASSED, "linux/arm64", 60_000_000),
    )
    stable = [image((), "linux/amd64", 50_000_000), image((), "linux/arm64", 50_000_000)]
    (gate,) = size_gates(ours, stable, 1.10)
    assert not gate.passed and gate.ratio == 1.2 and "linux/arm64" in gate.detail
    (within,) = size_gates(ours, stable[:1], 1.10)  # arm64 has nothing to compare with
    assert within.passed and within.ratio == 1.04
    (first,) = size_gates(ours, [], 1.10)
    assert first.passed and "no stable release" in first.detail


def test_throughput_is_judged_on_the_median_of_per_round_ratios() -> None:
    # One noisy round (stable slowed down by a burst of load) does not decide either way.
    good = {
        "candidate": [(500.0, 60.0), (500.0, 61.0), (500.0, 59.0), (500.0, 20.0), (500.0, 60.0)],
        "stable": [(500.0, 60.0), (500.0, 60.0), (500.0, 60.0), (500.0, 60.0), (500.0, 61.0)],
    }
    generation, prompt = _throughput_gates(good, 0.95)
    assert generation.passed and prompt.passed and generation.ratio == pytest.approx(1.0, 0.02)
    slow = {
        "candidate": [(500.0, 45.0), (500.0, 44.0), (500.0, 46.0), (500.0, 90.0), (500.0, 45.0)],
        "stable": good["stable"],
    }
    generation, prompt = _throughput_gates(slow, 0.95)
    assert not generation.passed and prompt.passed
    assert generation.candidate == 45.0 and generation.stable == 60.0
    line = generation.line()
    assert line.startswith("gate generation: FAILED: candidate 45 tokens/s, stable 60 tokens/s")
    assert "must be >= 0.95" in line and "median of 5 interleaved rounds" in line


def test_healthy_gate_is_lower_is_better() -> None:
    assert _ratio_gate("healthy", [1.0, 1.1, 0.9], [1.0, 1.0, 1.0], 1.5, False).passed
    slow = _ratio_gate("healthy", [2.0, 2.1, 1.9], [1.0, 1.0, 1.0], 1.5, False)
    assert not slow.passed and slow.limit == "<= 1.50" and slow.unit == "s"
