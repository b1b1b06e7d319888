"""The `real` smoke tier: a trained model (modelfiles/catalogue.yaml) asked what users ask, each
answer checked (pipeline/smoke/smoke.yaml's `real:` says what is asked and what must come back).

Where the structural tier proves every endpoint answers, this one proves the answers are right:
a factual question, a JSON schema, a GBNF grammar, a tool call, a stream with usage, a stream
cancelled mid-way, and a load held by concurrent clients (its figures go into the report).
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from pipeline.core.errors import ConfigError
from pipeline.records import REAL_TIER, Figure, SmokeRecord
from pipeline.smoke.run import (
    CheckFailed,
    Live,
    Outcome,
    Runs,
    SmokeRun,
    named,
    require,
    short,
    smoke_check,
)
from pipeline.smoke.settings import RealTier

# Streams ask for a close: llama-server drops a kept-alive connection after a stream.
CLOSE = {"Connection": "close"}
# Chat templates the tier may give the server (smoke.yaml's real.chat_template), and where.
TEMPLATES_DIR = Path(__file__).parent / "templates"
CONTAINER_TEMPLATES = "/templates"


def real_server(real: RealTier) -> tuple[str, dict[Path, str]]:
    """The real tier's llama-server arguments and the chat template's mount (host -> container),
    as smoke.yaml's `real:` asks for them."""
    name = real.chat_template
    if not name:
        return real.extra_args, {}
    host = TEMPLATES_DIR / name
    if not host.is_file():
        raise ConfigError(
            f"smoke.yaml: real.chat_template {name!r} is not a file in {TEMPLATES_DIR}",
            f"known: {', '.join(sorted(p.name for p in TEMPLATES_DIR.glob('*.jinja')))}",
        )
    container = f"{CONTAINER_TEMPLATES}/{name}"
    return f"{real.extra_args} --chat-template-file {container}", {host: container}


def run_real(run: SmokeRun) -> SmokeRecord:
    """The real tier's checks on one server container; the record (never raises on a failed
    check)."""
    real = run.settings.real
    extra_args, template_mounts = real_server(real)
    listed = named(real.checks, "smoke.yaml: real.checks")
    checks = [c for c in listed if c.runs is Runs.SERVER]
    apart = [c for c in listed if c.runs is Runs.CONTAINER]  # containers of their own
    env = {
        "LLAMA_MODEL": run.model.container_path,
        "LLAMA_SERVER_PORT": str(run.settings.server.container_port),
        "LLAMA_SERVER_EXTRA_ARGS": extra_args,
    }
    mounts = {run.model.host_path: run.model.container_path, **template_mounts}
    started, healthy = run.serve(checks, env, mounts)
    for check in apart:
        if healthy:
            run.check(check.name, partial(check.fn, run))
        else:
            run.skip([check.name], "the server never became healthy")
    return run.record(started, REAL_TIER)


def chat(
    live: Live,
    run: SmokeRun,
    question: str,
    history: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One chat completion at temperature 0 with the tier's seed (after `history`, earlier turns
    of the conversation); a 4xx or 5xx is a failed check naming the server's own message."""
    body = {
        "model": run.settings.real.alias,
        "messages": [*(history or []), {"role": "user", "content": question}],
        "temperature": 0,
        "seed": run.settings.real.seed,
        **extra,
    }
    resp = live.http.post("/v1/chat/completions", json=body)
    if resp.is_error:
        raise CheckFailed(f"the server answered HTTP {resp.status_code}: {server_message(resp)}")
    data: dict[str, Any] = resp.json()
    return data


def server_message(resp: httpx.Response) -> str:
    try:
        return short(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return short(resp.text)


def content_of(data: dict[str, Any]) -> str:
    content = data["choices"][0]["message"]["content"]
    require(isinstance(content, str), f"message content is {type(content).__name__}")
    return str(content).strip()


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where `value` breaks `schema` (the JSON Schema keywords smoke.yaml's schemas use)."""
    kinds: dict[str, type | tuple[type, ...]] = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
    }
    kind = schema.get("type")
    if kind is not None and not isinstance(value, kinds[kind]):
        return [f"{where} is {type(value).__name__}, not {kind}"]
    errors = []
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        errors.append(f"{where} is shorter than {schema['minLength']}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where} is {value!r}, not one of {schema['enum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where}.{k} is missing" for k in schema.get("required", ()) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{where}.{k} is not in the schema" for k in value if k not in properties]
        for key, sub in properties.items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{where}.{key}")
    return errors


@smoke_check("factual-answer", Runs.SERVER, named_only=True)
def check_factual(run: SmokeRun, live: Live) -> str:
    spec = run.settings.real.factual
    answers, wrong = [], []
    for ask in spec.questions:
        answer = content_of(chat(live, run, ask.question, max_tokens=spec.max_tokens))
        answers.append(short(answer, 40))
        if re.search(ask.expect, answer) is None:
            wrong.append(f"{ask.question!r} answered {short(answer)!r}, expected /{ask.expect}/")
    require(not wrong, f"{len(wrong)} of {len(spec.questions)} wrong: {'; '.join(wrong)}")
    return f"{len(spec.questions)} of {len(spec.questions)} right: {' | '.join(answers)}"


def wrong_values(value: dict[str, Any], expect: dict[str, str]) -> list[str]:
    """Which values of a structured reply are not what their expressions say (case aside)."""
    return [
        f"{key} is {value.get(key)!r}, expected /{pattern}/"
        for key, pattern in expect.items()
        if not isinstance(value.get(key), str)
        or re.fullmatch(pattern, value[key], re.IGNORECASE) is None
    ]


@smoke_check("json-schema", Runs.SERVER, named_only=True)
def check_json_schema(run: SmokeRun, live: Live) -> str:
    spec = run.settings.real.json_schema
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": spec.schema, "strict": True},
    }
    replies, problems = [], []
    for ask in spec.questions:
        data = chat(
            live, run, ask.question, max_tokens=spec.max_tokens, response_format=response_format
        )
        answer = content_of(data)
        try:
            value = json.loads(answer)
        except ValueError:
            problems.append(f"{ask.question!r}: the reply is not JSON: {short(answer)!r}")
            continue
        errors = schema_errors(value, spec.schema)
        if errors:
            problems.append(f"the reply breaks the schema: {'; '.join(errors)} ({short(answer)})")
            continue
        wrong = wrong_values(value, ask.expect)
        if wrong:
            problems.append(f"{ask.question!r}: {'; '.join(wrong)}")
        replies.append(json.dumps(value, separators=(",", ":")))
    require(not problems, f"{len(problems)} of {len(spec.questions)}: {'; '.join(problems)}")
    return f"{len(replies)} replies, schema and values right: {' '.join(replies)}"


@smoke_check("json-schema-invalid", Runs.SERVER, named_only=True)
def check_invalid_schema(run: SmokeRun, live: Live) -> str:
    # A broken schema from a client is the client's error: a 4xx naming it, and the server
    # goes on serving.
    body = {
        "model": run.settings.real.alias,
        "messages": [
            {"role": "user", "content": run.settings.real.json_schema.questions[0].question}
        ],
        "max_tokens": 8,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "broken", "schema": run.settings.real.invalid_schema},
        },
    }
    resp = live.http.post("/v1/chat/completions", json=body)
    require(
        400 <= resp.status_code < 500,
        f"an invalid schema got HTTP {resp.status_code}, expected 4xx: {server_message(resp)}",
    )
    live.http.get("/health").raise_for_status()
    return f"HTTP {resp.status_code}: {server_message(resp)}"


@smoke_check("grammar", Runs.SERVER, named_only=True)
def check_grammar(run: SmokeRun, live: Live) -> str:
    spec = run.settings.real.grammar
    matches = spec.matches
    data = chat(live, run, spec.question, max_tokens=spec.max_tokens, grammar=spec.gbnf)
    answer = content_of(data)
    require(
        re.fullmatch(matches, answer) is not None,
        f"the reply {answer!r} does not match the grammar (/{matches}/)",
    )
    return repr(answer)


@smoke_check("tool-call", Runs.SERVER, named_only=True)
def check_tool_call(run: SmokeRun, live: Live) -> str:
    spec = run.settings.real.tool_call
    tool = spec.tool
    data = chat(
        live,
        run,
        spec.question,
        history=spec.example,
        max_tokens=spec.max_tokens,
        tools=[tool],
        tool_choice="required",
    )
    choice = data["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    require(len(calls) >= 1, f"no tool_calls (finish_reason {choice.get('finish_reason')!r})")
    call = calls[0]
    name = tool["function"]["name"]
    require(call.get("type") == "function", f"tool_calls[0].type is {call.get('type')!r}")
    require(bool(call.get("id")), "tool_calls[0] has no id")
    require(call["function"]["name"] == name, f"called {call['function']['name']!r}, not {name}")
    try:
        arguments = json.loads(call["function"]["arguments"])
    except ValueError:
        raise CheckFailed(
            f"arguments are not JSON: {short(call['function']['arguments'])}"
        ) from None
    errors = schema_errors(arguments, tool["function"]["parameters"])
    require(not errors, f"arguments break the tool's schema: {'; '.join(errors)}")
    require(choice.get("finish_reason") == "tool_calls", f"finish_reason {choice['finish_reason']}")
    return f"{name}({json.dumps(arguments)})"


def stream_events(live: Live, run: SmokeRun, question: str, max_tokens: int, **extra: Any) -> Any:
    body = {
        "model": run.settings.real.alias,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "seed": run.settings.real.seed,
        "max_tokens": max_tokens,
        "stream": True,
        **extra,
    }
    return live.http.stream("POST", "/v1/chat/completions", json=body, headers=CLOSE)


@smoke_check("stream-usage", Runs.SERVER, named_only=True)
def check_stream_usage(run: SmokeRun, live: Live) -> str:
    question, max_tokens = run.settings.real.stream.question, run.settings.real.stream.max_tokens
    text: list[str] = []
    usage: dict[str, Any] | None = None
    last = ""
    options = {"stream_options": {"include_usage": True}}
    with stream_events(live, run, question, max_tokens, **options) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            last = line.removeprefix("data:").strip()
            if last == "[DONE]":
                continue
            chunk = json.loads(last)
            for choice in chunk.get("choices") or ():
                text.append(choice.get("delta", {}).get("content") or "")
            if chunk.get("usage"):
                require(not chunk.get("choices"), "the usage chunk also carries choices")
                usage = chunk["usage"]
    require(last == "[DONE]", f"the stream ended with {short(last)!r}, not [DONE]")
    require(usage is not None, "no usage chunk although stream_options.include_usage")
    assert usage is not None
    streamed = "".join(text).strip()
    require(bool(streamed), "no content was streamed")
    completion = usage["completion_tokens"]
    require(0 < completion <= max_tokens, f"usage.completion_tokens is {completion}")
    require(usage["total_tokens"] == usage["prompt_tokens"] + completion, f"usage {usage}")
    return f"{len(streamed)} characters streamed, usage {usage['prompt_tokens']}+{completion}"


@smoke_check("stream-cancel", Runs.SERVER, named_only=True)
def check_stream_cancel(run: SmokeRun, live: Live) -> str:
    question, max_tokens = run.settings.real.cancel.question, run.settings.real.cancel.max_tokens
    after = run.settings.real.cancel.after_chunks
    chunks = 0
    with stream_events(live, run, question, max_tokens) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                chunks += 1
            if chunks >= after:
                break  # leaving the block closes the connection mid-stream
    require(chunks >= after, f"the stream ended after {chunks} chunks")
    started = time.perf_counter()
    first = run.settings.real.factual.questions[0].question
    answer = content_of(chat(live, run, first, max_tokens=8))
    took = time.perf_counter() - started
    return f"hung up after {chunks} chunks; the next request answered in {took:.2f} s ({answer!r})"


@smoke_check("load", Runs.SERVER, named_only=True)
def check_load(run: SmokeRun, live: Live) -> Outcome:
    spec = run.settings.real.load
    clients, requests = spec.clients, spec.requests
    if run.settings.emulated(run.target.platform.name):
        requests = spec.requests_emulated  # every slot still busy at once; QEMU's speed aside
    scale = run.timing.request / run.settings.timing["native"].request
    deadline = time.monotonic() + spec.within * scale
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    body = {
        "model": run.settings.real.alias,
        "messages": [{"role": "user", "content": spec.question}],
        "max_tokens": spec.max_tokens,
        "temperature": 0.7,
    }

    def client(index: int) -> None:
        with httpx.Client(base_url=live.box.base_url, timeout=run.timing.request) as http:
            for request in range(requests):
                if time.monotonic() > deadline:
                    with lock:
                        errors.append(f"client {index}: out of time at request {request}")
                    return
                started = time.perf_counter()
                try:
                    resp = http.post("/v1/chat/completions", json={**body, "seed": request})
                    resp.raise_for_status()
                    completion = int(resp.json()["usage"]["completion_tokens"])
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    with lock:
                        errors.append(f"client {index}: {type(exc).__name__}: {short(exc, 80)}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens.append(completion)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    total = clients * requests
    require(not errors, f"{len(errors)} of {total} requests failed: {short(errors[:3])}")
    require(len(latencies) == total, f"{len(latencies)} of {total} requests answered")
    cuts = statistics.quantiles(latencies, n=20)
    p50, p95 = statistics.median(latencies), cuts[18]
    rate = sum(tokens) / wall
    figures = (
        Figure("requests", total, "requests"),
        Figure("errors", 0, "requests"),
        Figure("p50", round(p50, 3), "s"),
        Figure("p95", round(p95, 3), "s"),
        Figure("generation", round(rate, 1), "tokens/s"),
        Figure("wall", round(wall, 3), "s"),
    )
    detail = (
        f"{clients} clients x {requests} requests in {wall:.1f} s, 0 errors, "
        f"p50 {p50:.2f} s, p95 {p95:.2f} s, {rate:.0f} tokens/s generated"
    )
    return Outcome(detail, figures)
