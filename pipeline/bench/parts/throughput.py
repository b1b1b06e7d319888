"""throughput: prompt and generation tokens/s of our image against a native build of the same
commit (and upstream's own image, when the build part built it): same model, prompt, threads and
context, one warm-up request, then the repeats. Twice: on the generated bench model, and on the
real trained model (pipeline/modelfiles/catalogue.yaml)."""

from __future__ import annotations

import os

import httpx

from pipeline.bench.builds import build_other
from pipeline.bench.core import MB, Bench, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.core.errors import UsageError
from pipeline.matrix import load_matrix
from pipeline.modelfiles.catalogue import catalogue_model, ensure_catalogue_model
from pipeline.modelfiles.gguf import ensure_model, preset

GOAL_GENERATION_RATIO = 0.95
GOAL_REAL_GENERATION_RATIO = 0.97
REAL_MODEL = "smollm2-135m"
# One prompt for both sides, long enough that prompt processing is measurable.
PROMPT = " ".join(["hello world, the llama server answers every smoke test"] * 10)
PREDICT = 64
NATIVE_DOCKERFILE = """\
# A native build of the same commit for the throughput reference: the host's own instruction
# set (GGML_NATIVE=ON, so no GGML_BACKEND_DL), otherwise our configure flags. Same base image.
FROM debian:trixie
RUN apt-get update \\
    && apt-get install -y --no-install-recommends gcc g++ cmake ninja-build pkgconf libssl-dev \\
    && rm -rf /var/lib/apt/lists/*
COPY vendor/ /src/
RUN cmake -S /src -B /build -G Ninja {flags} \\
    && cmake --build /build --target llama-server \\
    && mkdir -p /app && cp -P /build/bin/llama-server /build/bin/*.so* /app/ \\
    && rm -rf /build
# llama-server's RUNPATH names the build tree, which is gone: its libraries are beside it.
ENV LD_LIBRARY_PATH=/app
ENTRYPOINT ["/app/llama-server"]
"""


def native_dockerfile() -> str:
    flags = dict(load_matrix().common_cmake_flags)
    flags["GGML_NATIVE"] = "ON"
    # ggml refuses NATIVE with BACKEND_DL: the one native CPU backend is linked in instead.
    flags["GGML_BACKEND_DL"] = "OFF"
    return NATIVE_DOCKERFILE.format(flags=" ".join(f"-D{k}={v}" for k, v in flags.items()))


def _completion(url: str) -> dict[str, float]:
    response = httpx.post(
        f"{url}/completion",
        json={
            "prompt": PROMPT,
            "n_predict": PREDICT,
            "cache_prompt": False,
            "ignore_eos": True,
            "temperature": 0,
            "seed": 0,
        },
        timeout=600,
    )
    response.raise_for_status()
    timings = response.json()["timings"]
    return {
        "prompt_per_second": float(timings["prompt_per_second"]),
        "predicted_per_second": float(timings["predicted_per_second"]),
        "prompt_n": float(timings["prompt_n"]),
        "predicted_n": float(timings["predicted_n"]),
    }


def measure(bench: Bench) -> Measured:
    ours_image, origin = bench.image_for("ours")
    if ours_image is None:
        raise UsageError(f"throughput needs our image ({origin})")
    project, _ = bench.sync("ours")
    native_tag = bench.tag("native", "cpu")
    if not bench.has_image(native_tag):
        context = bench.work / "native"
        context.mkdir(parents=True, exist_ok=True)
        dockerfile = context / "Dockerfile"
        dockerfile.write_text(native_dockerfile(), encoding="utf-8")
        command = [
            "docker",
            "buildx",
            "build",
            "--progress",
            "plain",
            "-f",
            str(dockerfile),
            "--load",
            "-t",
            native_tag,
            str(project.third_party),
        ]
        build_other(bench, "build-native", command)
    models = {
        "bench": ensure_model(bench.options.project, preset("bench")),
        "real": ensure_catalogue_model(catalogue_model(REAL_MODEL)),
    }
    upstream_image, upstream_origin = bench.image_for("upstream")
    sides = {"ours": ours_image, "native": native_tag}
    if upstream_image is not None:
        sides["upstream"] = upstream_image
    threads = os.cpu_count() or 2
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name, model in models.items():
        for side, image in sides.items():
            if name == "bench" and side == "upstream":
                continue  # the generated model's figures stay ours vs native, as before
            with (
                bench.locked(f"throughput {side} {name}"),
                bench.server(image, model, threads=threads) as server,
            ):
                _completion(server.base_url)  # warm-up: page the weights in, repack kernels
                runs = max(1, min(bench.options.repeats, 3))
                results.setdefault(name, {})[side] = [
                    _completion(server.base_url) for _ in range(runs)
                ]

    def figure(name: str, side: str, key: str) -> Figure:
        return Figure.of(*(r[key] for r in results[name][side]))

    def pair(key: str, title: str, name: str, other: str, goal: Goal | None = None) -> Metric:
        rate = "prompt_per_second" if title == "prompt processing" else "predicted_per_second"
        return Metric(
            key,
            title if name == "bench" else f"{title}, real model",
            "tok/s",
            figure(name, "ours", rate),
            figure(name, other, rate),
            other_label=other,
            goal=goal,
        )

    metrics = [
        pair("throughput.prompt", "prompt processing", "bench", "native"),
        pair(
            "throughput.generation",
            "generation",
            "bench",
            "native",
            Goal(">=", GOAL_GENERATION_RATIO, on="ratio"),
        ),
        pair("throughput.real.prompt", "prompt processing", "real", "native"),
        pair(
            "throughput.real.generation",
            "generation",
            "real",
            "native",
            Goal(">=", GOAL_REAL_GENERATION_RATIO, on="ratio"),
        ),
    ]
    if "upstream" in sides:
        metrics += [
            pair("throughput.real.prompt.upstream", "prompt processing", "real", "upstream"),
            pair("throughput.real.generation.upstream", "generation", "real", "upstream"),
        ]
    prompt_n = {name: int(results[name]["ours"][0]["prompt_n"]) for name in results}
    notes = (
        f"models: {models['bench'].name} ({models['bench'].stat().st_size / MB:.0f} MB, "
        f"generated; {prompt_n['bench']}-token prompt) and {REAL_MODEL} "
        f"({models['real'].stat().st_size / MB:.0f} MB, trained; {prompt_n['real']}-token "
        f"prompt); {threads} threads, {PREDICT} tokens generated (ignore_eos), timings from "
        "/completion; native = our configure flags with GGML_NATIVE=ON, built in a container on "
        "the same base"
        + ("" if "upstream" in sides else f"; upstream's image: none ({upstream_origin})"),
    )
    details = {"ours_image": ours_image, "native_image": native_tag, "runs": results}
    return Measured(tuple(metrics), notes, details)
