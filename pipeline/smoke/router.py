"""Router mode (LLAMA_MODELS_DIR): every GGUF in a mounted directory listed by /v1/models and
loaded on its first request. Checked on every image, in a container of its own, with two
generated models that differ only in their seed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from pipeline.modelfiles.gguf import generate_model, preset
from pipeline.oci.engine import ServerExited
from pipeline.smoke.run import CheckFailed, Runs, SmokeRun, require, short, smoke_check

MODELS_DIR = "/models-dir"


@smoke_check("router-mode", Runs.CONTAINER)
def check_router_mode(run: SmokeRun) -> str:
    with tempfile.TemporaryDirectory(prefix="router-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)  # the container's non-root user lists it
        names = []
        for seed in (1, 2):
            name = f"router-{seed}"
            path = generate_model(preset("tiny", seed=seed), directory / f"{name}.gguf")
            path.chmod(0o644)
            names.append(name)
        env = {"LLAMA_MODELS_DIR": MODELS_DIR, "LLAMA_MODEL": "", "LLAMA_SERVER_EXTRA_ARGS": ""}
        with run.container(env=env, mounts={directory: MODELS_DIR}, container_port=8080) as box:
            try:
                url = box.base_url
                box.wait_healthy(url, run.timing.healthy)
            except (ServerExited, TimeoutError) as exc:
                raise CheckFailed(f"{exc}; log: {short(box.log_tail(3))}") from None
            with httpx.Client(base_url=url, timeout=run.timing.request) as http:
                listed = sorted(m["id"] for m in http.get("/v1/models").json()["data"])
                require(listed == names, f"/v1/models lists {listed}, expected {names}")
                for name in names:
                    body = {
                        "model": name,
                        "messages": [{"role": "user", "content": "hello"}],
                        "max_tokens": 4,
                    }
                    # A connection each: at this pin the router answers a proxied request
                    # with both `Connection: close` and `Keep-Alive`, and a client that reuses
                    # the connection (httpx, under QEMU's timing) finds it dropped.
                    resp = http.post(
                        "/v1/chat/completions", json=body, headers={"Connection": "close"}
                    )
                    require(resp.status_code == 200, f"{name}: HTTP {resp.status_code}")
                    answered = resp.json()["model"]
                    require(answered == name, f"asked {name}, answered by {answered}")
    return f"/v1/models lists {', '.join(names)}; each answered a chat on first request"
