"""The checks of one smoke run: one image on one platform, each check named, timed and
recorded, none raising on failure (only bad input and interrupts raise).

The main server container answers the live checks (endpoints, entrypoint knobs, the process's
uid, Docker's HEALTHCHECK, the backend's device in its log); short-lived containers check the
entrypoint's other paths (no model, --version, a model from the local Hub by LLAMA_HF_REPO).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from pipeline.core.config import Project, load_version
from pipeline.core.console import err
from pipeline.core.errors import ConfigError, UsageError
from pipeline.matrix import Backend
from pipeline.modelfiles.gguf import GGUFInfo
from pipeline.oci.elf import closure_gaps, describe_gaps
from pipeline.oci.engine import ServerContainer, ServerExited, free_port, image_tree
from pipeline.oci.image import LABEL_REVISION
from pipeline.records import NO_GPU_TIER, CheckResult, Figure, SmokeRecord, arch_of
from pipeline.smoke.hubserver import HubServer
from pipeline.smoke.settings import Settings


class SmokeTarget(NamedTuple):
    """An image reference to run on one platform, and what the build said about it."""

    image: str
    platform: str
    backend: str
    digest: str | None = None


class Outcome(NamedTuple):
    """What a passed check reports when it measured something besides its detail."""

    detail: str
    figures: tuple[Figure, ...] = ()


class CheckFailed(Exception):
    """A check's condition did not hold; the message is the detail shown and reported."""


@dataclass(frozen=True)
class ModelMount:
    host_path: Path
    info: GGUFInfo
    container_path: str
    label: str


def require(condition: bool, detail: str) -> None:
    if not condition:
        raise CheckFailed(detail)


def short(value: Any, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hf_token() -> str:
    # llama-server only sends tokens shaped like the Hub's (hf_ + at least 34 alphanumerics).
    alphabet = string.ascii_letters + string.digits
    return "hf_" + "".join(secrets.choice(alphabet) for _ in range(36))


ServerCheck = Callable[["SmokeRun", "Live"], str]
OwnContainerCheck = Callable[["SmokeRun"], str]
# The live checks on the main server container, and the entrypoint's other paths (each in a
# short-lived container of its own): registered where they are defined, run (and reported) in
# that order.
SERVER_CHECKS: list[tuple[str, ServerCheck]] = []
ENTRYPOINT_CHECKS: list[tuple[str, OwnContainerCheck]] = []
# Checks a tier runs besides everyone's, by the names matrix.yaml's tiers give them.
TIER_CHECKS: dict[str, OwnContainerCheck] = {}


def server_check(name: str) -> Callable[[ServerCheck], ServerCheck]:
    def register(check: ServerCheck) -> ServerCheck:
        SERVER_CHECKS.append((name, check))
        return check

    return register


def entrypoint_check(name: str) -> Callable[[OwnContainerCheck], OwnContainerCheck]:
    def register(check: OwnContainerCheck) -> OwnContainerCheck:
        ENTRYPOINT_CHECKS.append((name, check))
        return check

    return register


def tier_check(name: str) -> Callable[[OwnContainerCheck], OwnContainerCheck]:
    def register(check: OwnContainerCheck) -> OwnContainerCheck:
        TIER_CHECKS[name] = check
        return check

    return register


@dataclass(frozen=True)
class Live:
    """The main server container while it serves, and a client bound to it."""

    box: ServerContainer
    http: httpx.Client


class SmokeRun:
    """All checks of one image on one platform; `run()` returns the report (never raises on a
    failed check, only on bad input and interrupts)."""

    def __init__(
        self,
        client: Any,
        project: Project,
        target: SmokeTarget,
        backend: Backend,
        model: ModelMount,
        settings: Settings,
        *,
        tier: str = NO_GPU_TIER,
        host_port: int | None = None,
        healthy_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.project = project
        self.target = target
        self.backend = backend
        self.smoke = backend.smoke
        if tier not in backend.smoke.tiers:
            raise UsageError(
                f"backend {backend.name} has no smoke tier {tier!r}",
                f"its tiers: {', '.join(backend.smoke.tiers)}, and real (every backend)",
            )
        self.tier = backend.smoke.tiers[tier]
        unknown = [name for name in self.tier.checks if name not in TIER_CHECKS]
        if unknown:
            raise ConfigError(
                f"matrix.yaml: {backend.name}'s tier {tier} names unknown checks {unknown}",
                f"known: {', '.join(sorted(TIER_CHECKS))}",
            )
        self.model = model
        self.settings = settings
        timing = settings.timing_for(target.platform).scaled(self.smoke.timing_scale)
        self.timing = timing.with_healthy(healthy_timeout)
        self.host_port = host_port
        self.checks: list[CheckResult] = []
        self.time_to_healthy: float | None = None
        self.commit = load_version(project.version_file).llama_cpp.commit

    # ------------------------------------------------------------------ plumbing

    def check(self, name: str, fn: Callable[[], str | Outcome]) -> bool:
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        started = time.perf_counter()
        err.print(f"[dim]smoke {arch_of(self.target.platform)}: {name}[/dim]")
        figures: tuple[Figure, ...] = ()
        try:
            outcome = fn()
            detail, figures = (outcome, ()) if isinstance(outcome, str) else outcome
            passed = True
        except CheckFailed as exc:
            detail, passed = str(exc), False
        except httpx.HTTPError as exc:
            detail, passed = f"{type(exc).__name__}: {short(exc)}", False
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            detail, passed = f"unexpected response ({type(exc).__name__}: {short(exc)})", False
        except (TimeoutError, ServerExited) as exc:
            detail, passed = str(exc), False
        except (DockerException, RequestException) as exc:
            # The engine refused a query mid-check (inspect, top, logs): the check failed.
            detail, passed = f"Docker: {type(exc).__name__}: {short(exc)}", False
        seconds = round(time.perf_counter() - started, 3)
        self.checks.append(CheckResult(name, passed, seconds, detail, figures=figures))
        return passed

    def skip(self, names: list[str], reason: str) -> None:
        self.checks += [
            CheckResult(n, False, 0.0, f"skipped: {reason}", skipped=True) for n in names
        ]

    def container(self, env: dict[str, str] | None = None, **kwargs: Any) -> ServerContainer:
        return ServerContainer(
            self.client,
            self.target.image,
            platform=self.target.platform,
            health_interval=self.timing.health_interval,
            env={**self.tier.env, **(env or {})},
            gpus=self.tier.gpus,
            **kwargs,
        )

    # ------------------------------------------------------------------ the run

    def run(self) -> SmokeRecord:
        self.check("library-closure", self.check_library_closure)
        self.check("revision-label", self.check_revision_label)
        server = self.settings.server
        cport = int(server["container_port"])
        env = {
            "LLAMA_MODEL": self.model.container_path,
            "LLAMA_SERVER_PORT": str(cport),
            "LLAMA_SERVER_EXTRA_ARGS": server["extra_args"],
            **server["env"],
        }
        with self.container(
            env=env,
            command=list(server["run_args"]),
            mounts={self.model.host_path: self.model.container_path},
            container_port=cport,
            host_port=self.host_port,
        ) as box:
            started = box.started_at
            healthy = self.check("health", lambda: self.check_health(box))
            if healthy:
                with httpx.Client(base_url=box.base_url, timeout=self.timing.request) as http:
                    live = Live(box, http)
                    for name, server_check in SERVER_CHECKS:
                        self.check(name, partial(server_check, self, live))
            else:
                self.skip([name for name, _ in SERVER_CHECKS], "the server never became healthy")
                self.show_logs(box, "server never became healthy")
        for name, own_container_check in [
            *ENTRYPOINT_CHECKS,
            *((n, TIER_CHECKS[n]) for n in self.tier.checks),
        ]:
            if healthy:
                self.check(name, partial(own_container_check, self))
            else:
                self.skip([name], "server never healthy")
        return self.record(started, self.tier.name)

    def record(self, started: float, tier: str) -> SmokeRecord:
        """The report of the checks run so far (`started`: the server container's start)."""
        return SmokeRecord(
            image=self.target.image,
            digest=self.target.digest,
            backend=self.target.backend,
            platform=self.target.platform,
            passed=all(c.passed for c in self.checks),
            seconds=round(time.perf_counter() - started, 3),
            checks=tuple(self.checks),
            time_to_healthy=self.time_to_healthy,
            model=self.model.label,
            tier=tier,
        )

    def show_logs(self, box: ServerContainer, why: str) -> None:
        lines = box.log_tail()
        err.print(f"[red]{why}; last {len(lines)} log lines of the container:[/red]")
        for line in lines:
            err.print(f"  {line}", markup=False)

    # ------------------------------------------------------------------ server checks

    def check_health(self, box: ServerContainer) -> str:
        try:
            url = box.base_url
            self.time_to_healthy = round(box.wait_healthy(url, self.timing.healthy), 3)
        except (ServerExited, TimeoutError) as exc:
            tail = box.log_tail(3)
            last = f"; last log line: {tail[-1]}" if tail else "; no log output"
            raise CheckFailed(f"{exc}{last}") from None
        return f"healthy {self.time_to_healthy:.2f} s after start"

    @server_check("backend-device")
    def check_backend_device(self, live: Live) -> str:
        # A GPU image that quietly falls back to its CPU kernels still answers every request:
        # only the server's own log says where the model went.
        log = live.box.logs()
        shown = []
        for pattern in self.tier.device_log:
            match = pattern.search(log)
            if match is None:
                backend = self.target.backend
                raise CheckFailed(f"the {backend} server's log never shows /{pattern.pattern}/")
            shown.append(match.group(0).strip())
        return "; ".join(shown)

    @server_check("models")
    def check_models(self, live: Live) -> str:
        http = live.http
        data = http.get("/v1/models").raise_for_status().json()
        ids = [m["id"] for m in data["data"]]
        require(len(ids) == 1, f"/v1/models lists {ids}, expected one model")
        require(isinstance(ids[0], str) and bool(ids[0]), f"model id {ids[0]!r}")
        return f"lists {ids[0]}"

    @server_check("completion")
    def check_completion(self, live: Live) -> str:
        http = live.http
        n = int(self.settings.requests["n_predict"])
        body = {
            "prompt": self.settings.requests["prompt"],
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

    @server_check("chat")
    def check_chat(self, live: Live) -> str:
        http = live.http
        n = int(self.settings.requests["n_predict"])
        data = http.post("/v1/chat/completions", json=self.chat_body(n, stream=False))
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

    @server_check("chat-stream")
    def check_chat_stream(self, live: Live) -> str:
        http = live.http
        n = int(self.settings.requests["n_predict"])
        deltas = 0
        events: list[str] = []
        body = self.chat_body(n, stream=True)
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

    def chat_body(self, n: int, *, stream: bool) -> dict[str, Any]:
        return {
            "model": self.settings.server["alias"],
            "messages": [{"role": "user", "content": self.settings.requests["chat_message"]}],
            "max_tokens": n,
            "ignore_eos": True,
            "seed": 42,
            "stream": stream,
        }

    @server_check("embeddings")
    def check_embeddings(self, live: Live) -> str:
        http = live.http
        body = {
            "input": self.settings.requests["embed_input"],
            "model": self.settings.server["alias"],
        }
        data = http.post("/v1/embeddings", json=body).raise_for_status().json()
        vectors = data["data"]
        require(len(vectors) == 1, f"{len(vectors)} vectors for one input")
        width = len(vectors[0]["embedding"])
        require(
            width == self.model.info.n_embd,
            f"vector width {width}, model n_embd {self.model.info.n_embd}",
        )
        require(all(isinstance(x, float) for x in vectors[0]["embedding"]), "non-float values")
        return f"one vector of width {width} (n_embd)"

    @server_check("tokenize-roundtrip")
    def check_tokenize(self, live: Live) -> str:
        http = live.http
        text = self.settings.requests["roundtrip"]
        tokens = http.post("/tokenize", json={"content": text}).raise_for_status().json()["tokens"]
        require(bool(tokens) and all(isinstance(t, int) for t in tokens), f"tokens {short(tokens)}")
        back = (
            http.post("/detokenize", json={"tokens": tokens}).raise_for_status().json()["content"]
        )
        # SPM adds a leading space marker to the first word; detokenizing keeps it.
        require(back.removeprefix(" ") == text, f"{text!r} came back as {back!r}")
        return f"{len(tokens)} tokens, round-trip exact"

    @server_check("metrics")
    def check_metrics(self, live: Live) -> str:
        http = live.http
        resp = http.get("/metrics")
        require(
            resp.status_code == 200,
            f"/metrics answered {resp.status_code} (--metrics given as docker run args)",
        )
        require("llamacpp:" in resp.text, "no llamacpp: metrics in the body")
        return "enabled by `docker run IMAGE --metrics` (args appended)"

    @server_check("entrypoint-model")
    def check_entrypoint_model(self, live: Live) -> str:
        http = live.http
        props = http.get("/props").raise_for_status().json()
        path = props.get("model_path")
        require(
            path == self.model.container_path,
            f"model_path {path!r}, LLAMA_MODEL was {self.model.container_path!r}",
        )
        return f"LLAMA_MODEL={path} loaded"

    @server_check("entrypoint-port")
    def check_entrypoint_port(self, live: Live) -> str:
        http = live.http
        port = self.settings.server["container_port"]
        require(
            http.get("/health").status_code == 200, "no answer on the LLAMA_SERVER_PORT mapping"
        )
        return f"listens on LLAMA_SERVER_PORT={port} (not the default 8080)"

    @server_check("entrypoint-extra-args")
    def check_extra_args(self, live: Live) -> str:
        http = live.http
        alias = self.settings.server["alias"]
        props = http.get("/props").raise_for_status().json()
        require(
            props.get("model_alias") == alias,
            f"model_alias {props.get('model_alias')!r}, expected {alias!r}",
        )
        ids = [m["id"] for m in http.get("/v1/models").raise_for_status().json()["data"]]
        require(ids == [alias], f"/v1/models lists {ids}, expected [{alias!r}]")
        return f"applied: {self.settings.server['extra_args']}"

    @server_check("llama-arg-env")
    def check_llama_arg_env(self, live: Live) -> str:
        # llama-server's own LLAMA_ARG_* variables reach it through the entrypoint untouched.
        wanted = int(self.settings.server["env"]["LLAMA_ARG_CTX_SIZE"])
        props = live.http.get("/props").raise_for_status().json()
        n_ctx = props["default_generation_settings"]["n_ctx"]
        require(n_ctx == wanted, f"/props n_ctx is {n_ctx}, LLAMA_ARG_CTX_SIZE asked {wanted}")
        return f"LLAMA_ARG_CTX_SIZE={wanted}: /props n_ctx {n_ctx}"

    @server_check("web-ui")
    def check_web_ui(self, live: Live) -> str:
        resp = live.http.get("/")
        if not self.backend.web_ui:
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

    @server_check("non-root")
    def check_non_root(self, live: Live) -> str:
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

    @server_check("docker-healthcheck")
    def check_docker_health(self, live: Live) -> str:
        box = live.box
        deadline = time.perf_counter() + self.timing.docker_health
        status = "unknown"
        while time.perf_counter() < deadline:
            box.container.reload()
            health = box.container.attrs["State"].get("Health")
            require(health is not None, "the image has no HEALTHCHECK")
            status = health["Status"]
            if status == "healthy":
                after = time.perf_counter() - box.started_at
                return f"Docker reports healthy {after:.1f} s after start"
            if status == "unhealthy":
                log = health.get("Log") or [{}]
                raise CheckFailed(f"Docker reports unhealthy: {short(log[-1].get('Output', ''))}")
            time.sleep(0.2)
        raise CheckFailed(f"HEALTHCHECK still {status!r} after {self.timing.docker_health:.0f} s")

    # ------------------------------------------------------------------ image checks

    def check_library_closure(self) -> str:
        # A tag that lost a library still builds and pushes; only its first start says so.
        image = self.client.images.get(self.target.image)
        env = dict(e.split("=", 1) for e in image.attrs["Config"].get("Env") or [] if "=" in e)
        tree = image_tree(self.client, self.target.image, self.target.platform)
        host = self.smoke.host_libraries
        gaps = closure_gaps(
            tree, arch_of(self.target.platform), host, env.get("LD_LIBRARY_PATH", "")
        )
        require(not gaps, f"unresolved: {describe_gaps(gaps)}")
        provided = f"; from the host: {', '.join(host)}" if host else ""
        return f"every NEEDED of {len(tree.elves)} ELF files resolves in the image{provided}"

    def check_revision_label(self) -> str:
        image = self.client.images.get(self.target.image)
        label = (image.labels or {}).get(LABEL_REVISION)
        require(
            label == self.commit, f"{LABEL_REVISION} is {label!r}, version.json pins {self.commit}"
        )
        return f"{LABEL_REVISION} = {self.commit[:12]}"

    @entrypoint_check("entrypoint-no-model")
    def check_no_model(self) -> str:
        with self.container() as box:
            code = box.wait_exit(self.timing.exit)
            lines = [line for line in box.logs().splitlines() if line.strip()]
        require(code != 0, f"exit code {code} without a model, expected non-zero")
        require(len(lines) == 1, f"{len(lines)} lines of output, expected one: {short(lines)}")
        require(
            "LLAMA_MODEL" in lines[0], f"message does not say how to give a model: {lines[0]!r}"
        )
        return f"exit {code}: {short(lines[0])}"

    @entrypoint_check("entrypoint-version")
    def check_version(self) -> str:
        with self.container(command=["--version"]) as box:
            code = box.wait_exit(self.timing.exit)
            output = box.logs()
        require(code == 0, f"--version exited {code}: {short(output)}")
        require(
            self.commit[:7] in output,
            f"--version does not report {self.commit[:7]}: {short(output)}",
        )
        version = next((line for line in output.splitlines() if "version" in line), output)
        return f"passes through: {short(version)}"

    @entrypoint_check("entrypoint-hf-repo")
    def check_hf_repo(self) -> str:
        repo = self.settings.hub["repo"]
        token = _hf_token()
        filename = self.model.host_path.name
        port = free_port()
        with HubServer(token=token) as hub:
            hub.add_file(repo, filename, self.model.host_path, private=True)
            env = {
                "LLAMA_HF_REPO": repo,
                "LLAMA_HF_FILE": filename,
                "LLAMA_HF_TOKEN": token,
                # llama-server reads MODEL_ENDPOINT (HF_ENDPOINT only as a fallback).
                "MODEL_ENDPOINT": f"{hub.url}/",
                "LLAMA_SERVER_HOST": "127.0.0.1",
                "LLAMA_SERVER_PORT": str(port),
            }
            with self.container(env=env, network_host=True, container_port=port) as box:
                url = box.base_url
                try:
                    box.wait_healthy(url, self.timing.healthy)
                except (ServerExited, TimeoutError) as exc:
                    tail = box.log_tail(3)
                    seen = ", ".join(f"{r.method} {r.path} {r.status}" for r in hub.requests[-4:])
                    raise CheckFailed(
                        f"{exc}; hub saw: {seen or 'nothing'}; log: {short(tail)}"
                    ) from None
                top = json.dumps(box.container.top())
                require(token not in top, "the HF token is visible in the process list")
                models = httpx.get(f"{url}/v1/models", timeout=self.timing.request).json()
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
