"""`rpc-split` (the real tier): the real model split over worker containers by llama.cpp's RPC
backend (`docker run IMAGE rpc-worker`, the server's LLAMA_RPC_WORKERS), all on a Docker network
of their own, as compose.yaml's `rpc` profile runs them.

Proven: each worker holds part of the model (the server's log names each one's buffer); the
answers at temperature 0 are those one node gives; a worker killed mid-stream ends the client's
stream within the request bound with an error, not a hang; and once the worker is back, the
server (restart policy on-failure, as in compose.yaml) answers again, the same answer.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from typing import Any

import httpx

from pipeline.core.errors import SmokeError
from pipeline.oci.engine import ServerContainer, ServerExited, private_network
from pipeline.records import Figure
from pipeline.smoke.real import CLOSE, chat, content_of, stream_events
from pipeline.smoke.run import (
    CheckFailed,
    Live,
    Outcome,
    Runs,
    SmokeRun,
    require,
    short,
    smoke_check,
)

WORKER_PORT = 50052  # the entrypoint's default (LLAMA_RPC_PORT)
SERVER_PORT = 8080
# llama.cpp's loader, one line per device holding weights: "RPC0[host:port] model buffer size".
BUFFER_RE = re.compile(r"(RPC\d+)\[([^\]]+)\] model buffer size = +([\d.]+) MiB")
LISTENING_RE = re.compile(r"rpc-worker: ggml-rpc-server on \S+")


def _answers(run: SmokeRun, box: ServerContainer) -> tuple[list[str], float]:
    """The first questions' answers at temperature 0, and generation tokens/s over them."""
    real = run.settings.real
    answers, tokens, seconds = [], 0, 0.0
    with httpx.Client(base_url=box.base_url, timeout=run.timing.request) as http:
        live = Live(box, http)
        for ask in real.factual.questions[: real.rpc.questions]:
            data = chat(live, run, ask.question, max_tokens=real.factual.max_tokens)
            answers.append(content_of(data))
            timings = data.get("timings") or {}
            tokens += int(timings.get("predicted_n", 0))
            seconds += float(timings.get("predicted_ms", 0.0)) / 1000
    return answers, (tokens / seconds if seconds else 0.0)


def _worker_listening(run: SmokeRun, box: ServerContainer) -> None:
    deadline = time.monotonic() + run.timing.healthy
    while LISTENING_RE.search(box.logs()) is None:
        state, code = box.status()
        if state in ("exited", "dead"):
            raise CheckFailed(f"a worker exited with code {code}: {short(box.log_tail(3))}")
        if time.monotonic() > deadline:
            raise CheckFailed(f"a worker did not start within {run.timing.healthy:.0f} s")
        time.sleep(0.2)


def _killed_mid_stream(run: SmokeRun, server: ServerContainer, worker: ServerContainer) -> str:
    """Kill `worker` while the server streams an answer; how the client's stream ended."""
    cancel = run.settings.real.cancel
    chunks, ended, killed = 0, "the stream finished normally", False
    started = time.perf_counter()
    with httpx.Client(base_url=server.base_url, timeout=run.timing.request) as http:
        try:
            with stream_events(Live(server, http), run, cancel.question, cancel.max_tokens) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data:") and '"error"' in line:
                        ended = f"an error event: {short(line, 80)}"
                        break
                    if line.strip() == "data: [DONE]":
                        break
                    if line.startswith("data:"):
                        chunks += 1
                    if chunks == cancel.after_chunks and not killed:
                        worker.container.kill()
                        killed = True
                else:
                    ended = "the stream ended without [DONE]"
        except httpx.TimeoutException:
            raise CheckFailed(
                f"the stream hung: nothing for {run.timing.request:.0f} s after a worker died"
            ) from None
        except httpx.HTTPError as exc:
            ended = f"{type(exc).__name__}"
    require(killed, f"the stream ended after {chunks} chunks, before a worker died")
    require(ended != "the stream finished normally", "the stream finished as if nothing happened")
    return f"{ended} after {time.perf_counter() - started:.1f} s"


def _start_workers(run: SmokeRun, network: str, stack: ExitStack) -> list[ServerContainer]:
    """`rpc.workers` worker containers on `network`, each listening (removed with `stack`)."""
    workers = []
    for i in range(1, run.settings.real.rpc.workers + 1):
        name = f"{network}-worker-{i}"
        workers.append(
            stack.enter_context(run.container(command=["rpc-worker"], network=network, name=name))
        )
        _worker_listening(run, workers[-1])
    return workers


def _workers_reached(run: SmokeRun, network: str, names: list[str]) -> str:
    """Under QEMU: the emulated workers start and the server's RPC backend reaches each one
    (`--rpc … --list-devices` lists their memory). Splitting the model too would take minutes
    of three emulated processes talking over TCP per token; the split itself is proven on the
    native platform, with the same code."""
    addresses = ",".join(f"{name}:{WORKER_PORT}" for name in names)
    command = ["--rpc", addresses, "--list-devices"]
    with run.container(command=command, network=network) as lister:
        code = lister.wait_exit(run.timing.exit)
        listing = lister.logs()
    reached = [
        n
        for n in names
        if re.search(rf"RPC\d+\s*: {re.escape(n)}:{WORKER_PORT} \(\d+ MiB", listing)
    ]
    require(code == 0 and reached == names, f"exit {code}; reached {reached}: {short(listing)}")
    return f"emulated: {len(names)} workers started, the server's RPC backend reached each one"


@smoke_check("rpc-split", Runs.CONTAINER, named_only=True)
def check_rpc_split(run: SmokeRun) -> Outcome:
    rpc = run.settings.real.rpc
    if run.settings.emulated(run.target.platform.name):
        with private_network(run.client, "smoke-rpc") as network, ExitStack() as stack:
            names = [str(w.name) for w in _start_workers(run, network, stack)]
            return Outcome(_workers_reached(run, network, names))
    env = {"LLAMA_MODEL": run.model.container_path, "LLAMA_SERVER_EXTRA_ARGS": rpc.extra_args}
    mounts = {run.model.host_path: run.model.container_path}
    with run.container(env=env, mounts=mounts, container_port=SERVER_PORT) as one:
        one.wait_healthy(one.base_url, run.timing.healthy)
        alone, alone_speed = _answers(run, one)
    with private_network(run.client, "smoke-rpc") as network, ExitStack() as stack:
        workers = _start_workers(run, network, stack)
        names = [str(w.name) for w in workers]
        addresses = ",".join(f"{name}:{WORKER_PORT}" for name in names)
        server = stack.enter_context(
            run.container(
                env={**env, "LLAMA_RPC_WORKERS": addresses},
                mounts=mounts,
                container_port=SERVER_PORT,
                network=network,
                restart="on-failure",
            )
        )
        try:
            server.wait_healthy(server.base_url, run.timing.healthy)
        except (ServerExited, TimeoutError) as exc:
            raise CheckFailed(f"split server: {exc}; log: {short(server.log_tail(3))}") from None
        held = {host: float(mib) for _, host, mib in BUFFER_RE.findall(server.logs())}
        missing = [n for n in names if not any(host.startswith(n) for host in held)]
        require(not missing, f"no model buffer on {missing}; the server's log has {held}")
        split, split_speed = _answers(run, server)
        require(split == alone, f"split answered {short(split)}, one node {short(alone)}")
        interrupted = _killed_mid_stream(run, server, workers[-1])
        workers[-1].container.start()
        _recovered(run, server)
        again, _ = _answers(run, server)
        require(again == alone, f"after recovery answered {short(again)}, one node {short(alone)}")
    parts = ", ".join(
        f"worker-{host.split('-worker-')[-1].split(':')[0]} {mib:.1f} MiB"
        for host, mib in held.items()
    )
    detail = (
        f"weights on {rpc.workers} workers ({parts}); {len(split)} answers as on one node; "
        f"{split_speed:.1f} vs {alone_speed:.1f} tokens/s alone; a worker killed mid-stream: "
        f"{interrupted}; answered again once it returned"
    )
    figures = (
        Figure("split_tokens_per_second", round(split_speed, 2), "tokens/s"),
        Figure("one_node_tokens_per_second", round(alone_speed, 2), "tokens/s"),
    )
    return Outcome(detail, figures)


def _recovered(run: SmokeRun, server: ServerContainer) -> None:
    """The server healthy again (Docker restarts it on failure while its worker was gone)."""
    deadline = time.monotonic() + run.timing.healthy
    last: Any = None
    while time.monotonic() < deadline:
        try:
            with httpx.Client(timeout=2.0, headers=CLOSE) as http:
                if http.get(f"{server.base_url}/health").status_code == 200:
                    return
        except (httpx.HTTPError, ServerExited, SmokeError) as exc:
            last = exc
        time.sleep(0.5)
    raise CheckFailed(
        f"the server did not answer again within {run.timing.healthy:.0f} s after its worker "
        f"returned ({last}); log: {short(server.log_tail(3))}"
    )
