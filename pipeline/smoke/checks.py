"""The structural tiers' checks (no-gpu, gpu): the image's files and labels, the live server's
endpoints and entrypoint knobs, the process's uid, Docker's HEALTHCHECK, the backend's device
in its log; short-lived containers for the entrypoint's other paths (no model, --version, a
model from the local Hub by LLAMA_HF_REPO). Each registered with `smoke_check`
(pipeline/smoke/run.py), run in the order written here.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from pipeline.oci.elf import closure_gaps, describe_gaps
from pipeline.oci.engine import ServerContainer, ServerExited, free_port, image_tree
from pipeline.oci.image import LABEL_REVISION
from pipeline.smoke.hubserver import HubServer
from pipeline.smoke.run import CheckFailed, Live, Runs, SmokeRun, require, short, smoke_check


def _hf_token() -> str:
    # llama-server only sends tokens shaped like the Hub's (hf_ + at least 34 alphanumerics).
    alphabet = string.ascii_letters + string.digits
    return "hf_" + "".join(secrets.choice(alphabet) for _ in range(36))


# ------------------------------------------------------------------ server checks


@smoke_check("backend-device", Runs.SERVER)
def check_backend_device(run: SmokeRun, live: Live) -> str:
    # A GPU image that quietly falls back to its CPU kernels still answers every request:
    # only the server's own log says where the model went.
    log = live.box.logs()
    shown = []
    for pattern in run.tier.device_log:
        match = pattern.search(log)
        if match is None:
            backend = run.backend.name
            raise CheckFailed(f"the {backend} server's log never shows /{pattern.pattern}/")
        shown.append(match.group(0).strip())
    return "; ".join(shown)


@smoke_check("models", Runs.SERVER)
def check_models(run: SmokeRun, live: Live) -> str:
    http = live.http
    data = http.get("/v1/models").raise_for_status().json()
    ids = [m["id"] for m in data["data"]]
    require(len(ids) == 1, f"/v1/models lists {ids}, expected one model")
    require(isinstance(ids[0], str) and bool(ids[0]), f"model id {ids[0]!r}")
    return f"lists {ids[0]}"


@smoke_check("completion", Runs.SERVER)
def check_completion(run: SmokeRun, live: Live) -> str:
    http = live.http
    n = int(run.settings.requests.n_predict)
    body = {
        "prompt": run.settings.requests.prompt,
        "n_predict": n,
        # A random-weight model may sample end-of-text at once; the count is what we test.
        "ignore_eos": True,
        "seed": 42,
        "cache_prompt": False,
    }
    data = http.post("/completion", json=body).raise_for_status().json()
    got = data["tokens_predicted"]
    require(isinstance(data["content"], str), f"content is {type(data['content']).__name__}")
    require(got == n, f"tokens_predicted is {got}, requested {n}")
    return f"{got} tokens predicted, as requested"


@smoke_check("chat", Runs.SERVER)
def check_chat(run: SmokeRun, live: Live) -> str:
    http = live.http
    n = int(run.settings.requests.n_predict)
    data = http.post("/v1/chat/completions", json=chat_body(run, n, stream=False))
    data = data.raise_for_status().json()
    choice = data["choices"][0]
    require(choice["message"]["role"] == "assistant", f"role {choice['message']['role']!r}")
    require(isinstance(choice["message"]["content"], str), "message content is not a string")
    usage = data["usage"]
    require(usage["prompt_tokens"] > 0, f"usage.prompt_tokens is {usage['prompt_tokens']}")
    require(
        usage["completion_tokens"] == n,
        f"usage.completion_tokens is {usage['completion_tokens']}, requested {n}",
    )
    tokens = f"{usage['prompt_tokens']}+{usage['completion_tokens']}"
    return f"choices[0] from the assistant, usage {tokens} tokens"


@smoke_check("chat-stream", Runs.SERVER)
def check_chat_stream(run: SmokeRun, live: Live) -> str:
    http = live.http
    n = int(run.settings.requests.n_predict)
    deltas = 0
    events: list[str] = []
    body = chat_body(run, n, stream=True)
    # llama-server drops a kept-alive connection after a stream (while announcing
    # keep-alive): ask for a close so the pool never hands that socket to the next check.
    close = {"Connection": "close"}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=close) as resp:
        resp.raise_for_status()
        ctype = resp.headers.get("content-type", "")
        require(ctype.startswith("text/event-stream"), f"content-type {ctype!r}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line.removeprefix("data:").strip()
            events.append(payload)
            if payload == "[DONE]":
                continue
            chunk = json.loads(payload)
            if chunk.get("choices") and "delta" in chunk["choices"][0]:
                deltas += 1
    require(deltas > 0, f"no chunk with choices[0].delta in {len(events)} events")
    require(bool(events) and events[-1] == "[DONE]", f"stream ended with {short(events[-1:])}")
    return f"{deltas} delta chunks, terminated by [DONE]"


def chat_body(run: SmokeRun, n: int, *, stream: bool) -> dict[str, Any]:
    return {
        "model": run.settings.server.alias,
        "messages": [{"role": "user", "content": run.settings.requests.chat_message}],
        "max_tokens": n,
        "ignore_eos": True,
        "seed": 42,
        "stream": stream,
    }


@smoke_check("embeddings", Runs.SERVER)
def check_embeddings(run: SmokeRun, live: Live) -> str:
    http = live.http
    body = {
        "input": run.settings.requests.embed_input,
        "model": run.settings.server.alias,
    }
    data = http.post("/v1/embeddings", json=body).raise_for_status().json()
    vectors = data["data"]
    require(len(vectors) == 1, f"{len(vectors)} vectors for one input")
    width = len(vectors[0]["embedding"])
    require(
        width == run.model.info.n_embd,
        f"vector width {width}, model n_embd {run.model.info.n_embd}",
    )
    require(all(isinstance(x, float) for x in vectors[0]["embedding"]), "non-float values")
    return f"one vector of width {width} (n_embd)"


@smoke_check("tokenize-roundtrip", Runs.SERVER)
def check_tokenize(run: SmokeRun, live: Live) -> str:
    http = live.http
    text = run.settings.requests.roundtrip
    tokens = http.post("/tokenize", json={"content": text}).raise_for_status().json()["tokens"]
    require(bool(tokens) and all(isinstance(t, int) for t in tokens), f"tokens {short(tokens)}")
    back = http.post("/detokenize", json={"tokens": tokens}).raise_for_status().json()["content"]
    # SPM adds a leading space marker to the first word; detokenizing keeps it.
    require(back.removeprefix(" ") == text, f"{text!r} came back as {back!r}")
    return f"{len(tokens)} tokens, round-trip exact"


@smoke_check("metrics", Runs.SERVER)
def check_metrics(run: SmokeRun, live: Live) -> str:
    # Served by default (the entrypoint's --metrics; LLAMA_METRICS=0 turns it off).
    resp = live.http.get("/metrics")
    require(resp.status_code == 200, f"/metrics answered {resp.status_code}, served by default")
    require("llamacpp:" in resp.text, "no llamacpp: metrics in the body")
    return "/metrics served by default (Prometheus text, llamacpp: metrics)"


@smoke_check("entrypoint-model", Runs.SERVER)
def check_entrypoint_model(run: SmokeRun, live: Live) -> str:
    http = live.http
    props = http.get("/props").raise_for_status().json()
    path = props.get("model_path")
    require(
        path == run.model.container_path,
        f"model_path {path!r}, LLAMA_MODEL was {run.model.container_path!r}",
    )
    return f"LLAMA_MODEL={path} loaded"


@smoke_check("entrypoint-port", Runs.SERVER)
def check_entrypoint_port(run: SmokeRun, live: Live) -> str:
    http = live.http
    port = run.settings.server.container_port
    require(http.get("/health").status_code == 200, "no answer on the LLAMA_SERVER_PORT mapping")
    return f"listens on LLAMA_SERVER_PORT={port} (not the default 8080)"


@smoke_check("entrypoint-extra-args", Runs.SERVER)
def check_extra_args(run: SmokeRun, live: Live) -> str:
    http = live.http
    alias = run.settings.server.alias
    props = http.get("/props").raise_for_status().json()
    require(
        props.get("model_alias") == alias,
        f"model_alias {props.get('model_alias')!r}, expected {alias!r}",
    )
    ids = [m["id"] for m in http.get("/v1/models").raise_for_status().json()["data"]]
    require(ids == [alias], f"/v1/models lists {ids}, expected [{alias!r}]")
    return f"applied: {run.settings.server.extra_args}"


@smoke_check("llama-arg-env", Runs.SERVER)
def check_llama_arg_env(run: SmokeRun, live: Live) -> str:
    # llama-server's own LLAMA_ARG_* variables reach it through the entrypoint untouched.
    wanted = int(run.settings.server.env["LLAMA_ARG_CTX_SIZE"])
    props = live.http.get("/props").raise_for_status().json()
    n_ctx = props["default_generation_settings"]["n_ctx"]
    require(n_ctx == wanted, f"/props n_ctx is {n_ctx}, LLAMA_ARG_CTX_SIZE asked {wanted}")
    return f"LLAMA_ARG_CTX_SIZE={wanted}: /props n_ctx {n_ctx}"


@smoke_check("web-ui", Runs.SERVER)
def check_web_ui(run: SmokeRun, live: Live) -> str:
    resp = live.http.get("/")
    if not run.backend.web_ui:
        require(resp.status_code == 404, f"GET / answered {resp.status_code}, no UI built")
        return "no web UI (matrix.yaml web_ui: false): / answers 404"
    require(resp.status_code == 200, f"GET / answered HTTP {resp.status_code}, not the UI")
    ctype = resp.headers.get("content-type", "")
    require(ctype.startswith("text/html"), f"GET / is {ctype!r}, not HTML")
    # Every script and stylesheet the page loads must be served too.
    assets = sorted(set(re.findall(r'(?:src|href)="\.?(/[^"?#]+\.(?:js|css))"', resp.text)))
    require(bool(assets), f"the page names no script or stylesheet: {short(resp.text)}")
    missing = [a for a in assets if live.http.get(a).status_code != 200]
    require(not missing, f"the page's assets are not served: {missing}")
    # build.json is written by the builder, not the UI stage: it must carry this build's
    # number, the one llama-server reports (/props build_info is b<number>-<commit>).
    build_info = str(live.http.get("/props").raise_for_status().json().get("build_info", ""))
    shown = live.http.get("/build.json")
    require(shown.status_code == 200, f"GET /build.json answered HTTP {shown.status_code}")
    version = shown.json().get("version")
    require(
        build_info.startswith(f"b{version}-"),
        f"/build.json says version {version!r}, the server is {build_info!r}",
    )
    return (
        f"/ serves the web UI: {len(resp.text)} bytes of HTML, {len(assets)} assets, "
        f"build.json version {version} ({build_info})"
    )


@smoke_check("non-root", Runs.SERVER)
def check_non_root(run: SmokeRun, live: Live) -> str:
    box = live.box
    # `docker top` runs ps on the host: the uid the kernel sees, not what the image claims.
    top = box.container.top(ps_args="-eo pid,uid,comm")
    titles = [t.upper() for t in top["Titles"]]
    uid_col, comm_col = titles.index("UID"), titles.index("COMMAND")
    procs = [(int(p[uid_col]), p[comm_col]) for p in top["Processes"]]
    require(bool(procs), "no process in the container")
    root = [comm for uid, comm in procs if uid == 0]
    require(not root, f"running as root: {root}")
    return ", ".join(f"{comm} uid {uid}" for uid, comm in procs)


def _docker_healthy(run: SmokeRun, box: ServerContainer) -> float:
    """Seconds from the container's start to Docker's own HEALTHCHECK reporting `healthy`."""
    deadline = time.perf_counter() + run.timing.docker_health
    status = "unknown"
    while time.perf_counter() < deadline:
        box.container.reload()
        health = box.container.attrs["State"].get("Health")
        require(health is not None, "the image has no HEALTHCHECK")
        status = health["Status"]
        if status == "healthy":
            return time.perf_counter() - box.started_at
        if status == "unhealthy":
            log = health.get("Log") or [{}]
            raise CheckFailed(f"Docker reports unhealthy: {short(log[-1].get('Output', ''))}")
        time.sleep(0.2)
    raise CheckFailed(f"HEALTHCHECK still {status!r} after {run.timing.docker_health:.0f} s")


@smoke_check("docker-healthcheck", Runs.SERVER)
def check_docker_health(run: SmokeRun, live: Live) -> str:
    return f"Docker reports healthy {_docker_healthy(run, live.box):.1f} s after start"


# ------------------------------------------------------------------ image checks


@smoke_check("library-closure", Runs.IMAGE)
def check_library_closure(run: SmokeRun) -> str:
    # A tag that lost a library still builds and pushes; only its first start says so.
    image = run.client.images.get(run.target.image)
    env = dict(e.split("=", 1) for e in image.attrs["Config"].get("Env") or [] if "=" in e)
    tree = image_tree(run.client, run.target.image, run.target.platform.name)
    host = run.backend.smoke.host_libraries
    gaps = closure_gaps(tree, run.target.platform.arch, host, env.get("LD_LIBRARY_PATH", ""))
    require(not gaps, f"unresolved: {describe_gaps(gaps)}")
    provided = f"; from the host: {', '.join(host)}" if host else ""
    drivers = len(tree.vulkan_drivers)
    named = f" and the libraries of {drivers} Vulkan driver manifests" if drivers else ""
    return f"every NEEDED of {len(tree.elves)} ELF files{named} resolves in the image{provided}"


@smoke_check("revision-label", Runs.IMAGE)
def check_revision_label(run: SmokeRun) -> str:
    image = run.client.images.get(run.target.image)
    label = (image.labels or {}).get(LABEL_REVISION)
    require(label == run.commit, f"{LABEL_REVISION} is {label!r}, version.json pins {run.commit}")
    return f"{LABEL_REVISION} = {run.commit[:12]}"


@smoke_check("entrypoint-no-model", Runs.CONTAINER)
def check_no_model(run: SmokeRun) -> str:
    with run.container() as box:
        code = box.wait_exit(run.timing.exit)
        lines = [line for line in box.logs().splitlines() if line.strip()]
    require(code != 0, f"exit code {code} without a model, expected non-zero")
    require(len(lines) == 1, f"{len(lines)} lines of output, expected one: {short(lines)}")
    require("LLAMA_MODEL" in lines[0], f"message does not say how to give a model: {lines[0]!r}")
    return f"exit {code}: {short(lines[0])}"


@smoke_check("entrypoint-version", Runs.CONTAINER)
def check_version(run: SmokeRun) -> str:
    with run.container(command=["--version"]) as box:
        code = box.wait_exit(run.timing.exit)
        output = box.logs()
    require(code == 0, f"--version exited {code}: {short(output)}")
    require(
        run.commit[:7] in output,
        f"--version does not report {run.commit[:7]}: {short(output)}",
    )
    version = next((line for line in output.splitlines() if "version" in line), output)
    return f"passes through: {short(version)}"


@smoke_check("entrypoint-hf-repo", Runs.CONTAINER)
def check_hf_repo(run: SmokeRun) -> str:
    repo = run.settings.hub_repo
    token = _hf_token()
    filename = run.model.host_path.name
    port = free_port()
    with HubServer(token=token) as hub:
        hub.add_file(repo, filename, run.model.host_path, private=True)
        env = {
            "LLAMA_HF_REPO": repo,
            "LLAMA_HF_FILE": filename,
            "LLAMA_HF_TOKEN": token,
            # llama-server reads MODEL_ENDPOINT (HF_ENDPOINT only as a fallback).
            "MODEL_ENDPOINT": f"{hub.url}/",
            "LLAMA_SERVER_HOST": "127.0.0.1",
            "LLAMA_SERVER_PORT": str(port),
        }
        with run.container(env=env, network_host=True, container_port=port) as box:
            url = box.base_url
            try:
                box.wait_healthy(url, run.timing.healthy)
            except (ServerExited, TimeoutError) as exc:
                tail = box.log_tail(3)
                seen = ", ".join(f"{r.method} {r.path} {r.status}" for r in hub.requests[-4:])
                raise CheckFailed(
                    f"{exc}; hub saw: {seen or 'nothing'}; log: {short(tail)}"
                ) from None
            top = json.dumps(box.container.top())
            require(token not in top, "the HF token is visible in the process list")
            models = httpx.get(f"{url}/v1/models", timeout=run.timing.request).json()
        downloads = [
            r for r in hub.requests if r.method == "GET" and r.path.endswith(f"/{filename}")
        ]
    require(
        bool(downloads) and downloads[-1].status == 200,
        "the model was not downloaded from the hub",
    )
    require(all(r.sent_token for r in hub.requests), "a hub request went without the token")
    require(bool(models.get("data")), f"/v1/models: {short(models)}")
    return f"downloaded {repo}/{filename} from the local hub (private, token by env)"


def _model(run: SmokeRun) -> tuple[dict[str, str], dict[Path, str]]:
    """The environment and mount that give a container the smoke model."""
    return {"LLAMA_MODEL": run.model.container_path}, {
        run.model.host_path: run.model.container_path
    }


@smoke_check("healthcheck-port", Runs.CONTAINER)
def check_healthcheck_port(run: SmokeRun) -> str:
    # `docker run IMAGE --port N`: the server listens on N, and Docker's HEALTHCHECK must ask
    # N too (upstream's images keep probing 8080 and never become healthy).
    port = free_port()
    env, mounts = _model(run)
    with run.container(
        env=env, mounts=mounts, command=["--port", str(port)], container_port=port
    ) as box:
        try:
            box.wait_healthy(box.base_url, run.timing.healthy)
        except (ServerExited, TimeoutError) as exc:
            raise CheckFailed(f"{exc}; log: {short(box.log_tail(3))}") from None
        after = _docker_healthy(run, box)
    return f"docker run IMAGE --port {port}: Docker reports healthy {after:.1f} s after start"


@smoke_check("command-read-only-cache", Runs.CONTAINER)
def check_command_and_cache(run: SmokeRun) -> str:
    # `docker run --read-only --user <uid>:0 IMAGE sh -c ...`: a command that is not an option
    # runs instead of the server, and the download cache (LLAMA_CACHE, a volume) is writable
    # on a read-only root by an arbitrary uid of group 0 (OpenShift's convention).
    script = 'touch "$LLAMA_CACHE/probe" && rm "$LLAMA_CACHE/probe" && echo "$(id -u) $LLAMA_CACHE"'
    with run.container(command=["sh", "-c", script], user="4242:0", read_only=True) as box:
        code = box.wait_exit(run.timing.exit)
        output = box.logs().strip()
    require(code == 0, f"exit {code}: {short(output)}")
    require(output.startswith("4242 /"), f"printed {short(output)!r}, expected '4242 <cache>'")
    return f"sh ran as uid 4242 (gid 0), --read-only: wrote and removed a file in {output[5:]}"


@smoke_check("secret-file", Runs.CONTAINER)
def check_secret_file(run: SmokeRun) -> str:
    # LLAMA_API_KEY_FILE: the key from a mounted file, in neither `docker inspect` nor the
    # process list, and enforced (401 without it).
    key = "sk-" + secrets.token_hex(16)
    port = free_port()
    env, mounts = _model(run)
    with tempfile.TemporaryDirectory(prefix="smoke-secret-") as scratch:
        secret = Path(scratch) / "api-key"
        secret.write_text(key + "\n")
        secret.chmod(0o644)  # the container's user reads it through the bind mount
        env |= {"LLAMA_API_KEY_FILE": "/run/secrets/api-key"}
        with run.container(
            env=env,
            mounts={**mounts, secret: "/run/secrets/api-key"},
            container_port=port,
            command=["--port", str(port)],
        ) as box:
            url = box.base_url
            try:
                box.wait_healthy(url, run.timing.healthy)
            except (ServerExited, TimeoutError) as exc:
                raise CheckFailed(f"{exc}; log: {short(box.log_tail(3))}") from None
            # /tokenize: llama-server leaves /health and /v1/models open, by design.
            ask = {"content": "hello"}
            with httpx.Client(base_url=url, timeout=run.timing.request) as http:
                anonymous = http.post("/tokenize", json=ask).status_code
                bearer = {"Authorization": f"Bearer {key}"}
                allowed = http.post("/tokenize", json=ask, headers=bearer)
            shown = json.dumps(box.container.attrs["Config"]) + json.dumps(box.container.top())
    require(anonymous == 401, f"/tokenize without the key answered {anonymous}, not 401")
    require(allowed.status_code == 200, f"/tokenize with the key answered {allowed.status_code}")
    require(key not in shown, "the API key shows in docker inspect or the process list")
    return "LLAMA_API_KEY_FILE: 401 without the key, 200 with it; not in inspect or ps"


@smoke_check("doctor", Runs.CONTAINER)
def check_doctor(run: SmokeRun) -> str:
    # `docker run IMAGE doctor --model M --json`: the backend modules the image carries and
    # whether the model fits; then a model larger than the container's memory (a sparse GGUF
    # of 256 MiB under --memory 64m, room for QEMU's own under emulation: only its header and
    # size are read): exit 1.
    env, mounts = _model(run)
    asked = ["doctor", "--model", run.model.container_path, "--json"]
    with run.container(env=env, mounts=mounts, command=asked) as box:
        code = box.wait_exit(run.timing.exit)
        output = box.logs().strip()
    try:
        report = json.loads(output.splitlines()[-1])
    except (ValueError, IndexError):
        raise CheckFailed(f"doctor --json printed no JSON: {short(output)}") from None
    require(code == 0 and report.get("ok") is True, f"exit {code}: {short(output)}")
    require("cpu" in str(report.get("backends")), f"no CPU backend module: {short(output)}")
    with tempfile.TemporaryDirectory(prefix="smoke-doctor-") as scratch:
        big = Path(scratch) / "big.gguf"
        with big.open("wb") as handle:
            handle.write(b"GGUF")
            handle.truncate(256 << 20)
        big.chmod(0o644)
        command = ["doctor", "--model", "/models/big.gguf"]
        mount = {big: "/models/big.gguf"}
        with run.container(mounts=mount, command=command, memory=64 << 20) as box:
            small_code = box.wait_exit(run.timing.exit)
            small = box.logs().strip()
    require(small_code == 1 and "model-too-large" in small, f"exit {small_code}: {short(small)}")
    kernels = report.get("cpu_kernels") or "one set"
    return (
        f"backends {report['backends']}; CPU kernels {kernels}; the model fits; a 256 MiB one "
        "under --memory 64m: exit 1, model-too-large"
    )
