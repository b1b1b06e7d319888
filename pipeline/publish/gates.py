"""The gates of a promotion (gates.yaml, beside this file): the candidate held against the current
stable release, side by side, in one run on one machine, each gate with both figures.

- tiers: every image of the candidate passed every tier publish requires, on every platform;
- size: each platform's compressed image at most `size.max_ratio` of stable's;
- generation, prompt: the real model's tokens/s on the cpu image at least
  `throughput.min_ratio` of stable's (median of interleaved rounds, see gates.yaml);
- healthy: seconds to /health at most `healthy.max_ratio` of stable's (medians of turns).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.core.console import err
from pipeline.core.datafile import load_yaml
from pipeline.core.errors import SmokeError
from pipeline.core.fields import Fields
from pipeline.matrix import Matrix, host_platform
from pipeline.modelfiles.catalogue import catalogue_model, ensure_catalogue_model
from pipeline.oci.engine import ServerContainer, ServerExited, docker_client, local_image, pull
from pipeline.oci.registry import Credentials
from pipeline.records.candidate import CandidateImage, CandidateRecord
from pipeline.records.promotion import Gate

GATES_FILE = Path(__file__).with_name("gates.yaml")
HEALTHY_WITHIN_S = 300
CONTAINER_MODEL = "/models/model.gguf"


@dataclass(frozen=True)
class Gates:
    model: str
    backend: str
    rounds: int
    warmup: int
    confirm: bool
    n_predict: int
    prompt: str
    min_throughput_ratio: float
    max_size_ratio: float
    starts: int
    max_healthy_ratio: float


def load_gates(path: Path = GATES_FILE) -> Gates:
    top = Fields(
        load_yaml(path), path.name, ("schema", "model", "backend", "throughput", "size", "healthy")
    )
    if top.raw("schema", None) != 1:
        top.fail("expected schema: 1")
    speed = top.sub(
        "throughput", ("rounds", "warmup", "confirm", "n_predict", "prompt", "min_ratio")
    )
    healthy = top.sub("healthy", ("starts", "max_ratio"))
    return Gates(
        model=top.text("model"),
        backend=top.text("backend"),
        rounds=speed.integer("rounds", minimum=3),
        warmup=speed.integer("warmup", minimum=0),
        confirm=speed.boolean("confirm"),
        n_predict=speed.integer("n_predict", minimum=8),
        prompt=speed.text("prompt"),
        min_throughput_ratio=speed.number("min_ratio", above=0, at_most=1),
        max_size_ratio=top.sub("size", ("max_ratio",)).number("max_ratio", above=1),
        starts=healthy.integer("starts", minimum=1),
        max_healthy_ratio=healthy.number("max_ratio", above=1),
    )


# ------------------------------------------------------------------------------- the gates


def tiers_gate(candidate: CandidateRecord, matrix: Matrix) -> Gate:
    """Every image of the candidate passed every tier its backend requires (the gpu tier only
    where the candidate ran it: a train without a GPU publishes on publish_without_gpu)."""
    problems = []
    for image in candidate.images:
        ran = {t.tier: t for t in image.tiers}
        smoke = matrix.backend(image.backend).smoke
        required = smoke.required("gpu" in ran, image.cpu_variants) or ("gpu",)
        for tier in required:
            result = ran.get(tier)
            if result is None or not result.passed:
                failed = f" ({', '.join(result.failed)})" if result and result.failed else ""
                state = "missing" if result is None else "failed"
                problems.append(f"{image.backend} {image.platform} {tier} {state}{failed}")
    passed = bool(candidate.images) and not problems
    total = sum(len(i.tiers) for i in candidate.images)
    detail = "; ".join(problems) or f"{total} tier runs on {len(candidate.images)} images passed"
    return Gate("tiers", passed, None, None, None, "all required tiers passed", "", detail)


def size_gates(
    candidate: CandidateRecord, stable: Sequence[CandidateImage], max_ratio: float
) -> list[Gate]:
    """Per backend: the largest compressed-size ratio over its platforms."""
    gates = []
    by_key = {(s.backend, s.platform): s for s in stable}
    for backend in sorted({i.backend for i in candidate.images}):
        worst: tuple[float, CandidateImage, CandidateImage] | None = None
        for image in (i for i in candidate.images if i.backend == backend):
            old = by_key.get((backend, image.platform))
            if old is None or not old.compressed_bytes or not image.compressed_bytes:
                continue
            ratio = image.compressed_bytes / old.compressed_bytes
            if worst is None or ratio > worst[0]:
                worst = (ratio, image, old)
        if worst is None:
            gates.append(_no_stable(f"size {backend}"))
            continue
        ratio, image, old = worst
        gates.append(
            Gate(
                f"size {backend}",
                ratio <= max_ratio,
                round(image.compressed_bytes or 0, 0) / 1e6,
                round(old.compressed_bytes or 0, 0) / 1e6,
                round(ratio, 4),
                f"<= {max_ratio:.2f}",
                "MB",
                f"compressed, {image.platform} (the largest ratio of the backend's platforms)",
            )
        )
    return gates


def _no_stable(name: str) -> Gate:
    return Gate(name, True, None, None, None, "-", "", "no stable release to compare with")


# ------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Sides:
    """The two images measured against each other, as `docker run` takes them."""

    candidate: str
    stable: str


def _present(client: Any, ref: str, credentials: Credentials | None) -> str:
    if local_image(client, ref) is None:
        pull(client, ref, host_platform(), credentials)
    return ref


def _server(client: Any, image: str, model: Path) -> ServerContainer:
    return ServerContainer(
        client,
        image,
        env={"LLAMA_MODEL": CONTAINER_MODEL},
        mounts={model: CONTAINER_MODEL},
        container_port=8080,
    )


def _timings(box: ServerContainer, gates: Gates) -> tuple[float, float]:
    """(prompt, generation) tokens/s of one completion, as llama-server timed it."""
    body = {
        "prompt": gates.prompt,
        "n_predict": gates.n_predict,
        "temperature": 0,
        "seed": 1,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    reply = httpx.post(f"{box.base_url}/completion", json=body, timeout=300)
    data = reply.raise_for_status().json()
    timings = data["timings"]
    return float(timings["prompt_per_second"]), float(timings["predicted_per_second"])


def _ratio_gate(
    name: str, candidate: list[float], stable: list[float], limit: float, higher_is_better: bool
) -> Gate:
    ratios = [c / s for c, s in zip(candidate, stable, strict=True)]
    ratio = statistics.median(ratios)
    passed = ratio >= limit if higher_is_better else ratio <= limit
    unit = "tokens/s" if higher_is_better else "s"
    spread = f"rounds' ratios {min(ratios):.3f}..{max(ratios):.3f}"
    return Gate(
        name,
        passed,
        round(statistics.median(candidate), 2),
        round(statistics.median(stable), 2),
        round(ratio, 4),
        f"{'>=' if higher_is_better else '<='} {limit:.2f}",
        unit,
        f"median of {len(ratios)} interleaved rounds; {spread}",
    )


def measure(sides: Sides, gates: Gates, credentials: Credentials | None) -> list[Gate]:
    """The throughput and healthy gates, the two images side by side on this machine."""
    client = docker_client()
    model = ensure_catalogue_model(catalogue_model(gates.model))
    for ref in (sides.candidate, sides.stable):
        _present(client, ref, credentials)
    starts: dict[str, list[float]] = {"candidate": [], "stable": []}
    for turn in range(gates.starts):  # healthy: started in turns, one at a time
        order = ("candidate", "stable") if turn % 2 == 0 else ("stable", "candidate")
        for side in order:
            with _server(client, getattr(sides, side), model) as box:
                starts[side].append(_wait(box))
    limit = gates.min_throughput_ratio
    with (
        _server(client, sides.candidate, model) as candidate,
        _server(client, sides.stable, model) as stable,
    ):
        boxes = {"candidate": candidate, "stable": stable}
        for box in boxes.values():
            _wait(box)
            for _ in range(gates.warmup):
                _timings(box, gates)
        speeds = _rounds(boxes, gates, gates.rounds)
        throughput = _throughput_gates(speeds, limit)
        if gates.confirm and any(not g.passed for g in throughput):
            # A refusal is confirmed by as many rounds again, judged on all of them together:
            # a burst of load on the machine cannot refuse a good candidate by itself.
            err.print("[dim]promote: a throughput gate failed: measuring again to confirm[/dim]")
            more = _rounds(boxes, gates, gates.rounds)
            speeds = {side: speeds[side] + more[side] for side in speeds}
            throughput = _throughput_gates(speeds, limit)
    healthy = _ratio_gate(
        "healthy", starts["candidate"], starts["stable"], gates.max_healthy_ratio, False
    )
    return [*throughput, healthy]


def _rounds(
    boxes: dict[str, ServerContainer], gates: Gates, rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """(prompt, generation) tokens/s of each side, round after round, the order alternating."""
    speeds: dict[str, list[tuple[float, float]]] = {side: [] for side in boxes}
    for round_ in range(rounds):
        order = ("candidate", "stable") if round_ % 2 == 0 else ("stable", "candidate")
        for side in order:
            speeds[side].append(_timings(boxes[side], gates))
        err.print(
            f"[dim]promote: round {round_ + 1}: generation "
            f"{speeds['candidate'][-1][1]:.1f} vs {speeds['stable'][-1][1]:.1f} tokens/s[/dim]"
        )
    return speeds


def _throughput_gates(speeds: dict[str, list[tuple[float, float]]], limit: float) -> list[Gate]:
    prompt = {side: [p for p, _ in runs] for side, runs in speeds.items()}
    generation = {side: [g for _, g in runs] for side, runs in speeds.items()}
    return [
        _ratio_gate("generation", generation["candidate"], generation["stable"], limit, True),
        _ratio_gate("prompt", prompt["candidate"], prompt["stable"], limit, True),
    ]


def _wait(box: ServerContainer) -> float:
    try:
        return box.wait_healthy(box.base_url, HEALTHY_WITHIN_S)
    except (ServerExited, TimeoutError) as exc:
        tail = " | ".join(box.log_tail(3))
        raise SmokeError(f"{box.image}: {exc}", f"last log lines: {tail}") from None
