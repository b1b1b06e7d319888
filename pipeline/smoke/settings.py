"""Smoke's own data (smoke.yaml, beside this file): timing bounds, what the server is asked, the
local Hub, the real tier. What differs per backend (environment, timing scale, device log) is
matrix.yaml's. Read once through the typed field reader; a check's own parameters (the real
tier's questions) are read through it too, key by key, when the check runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.core.datafile import load_yaml
from pipeline.core.fields import Fields
from pipeline.matrix import host_platform

SETTINGS_FILE = Path(__file__).with_name("smoke.yaml")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class Timing(NamedTuple):
    """Upper bounds in seconds (the HEALTHCHECK interval asked of Docker besides)."""

    healthy: float
    request: float
    exit: float
    docker_health: float
    health_interval: float

    def scaled(self, factor: float) -> Timing:
        """Every bound times `factor`; the HEALTHCHECK interval asked of Docker stays."""
        return Timing(
            self.healthy * factor,
            self.request * factor,
            self.exit * factor,
            self.docker_health * factor,
            self.health_interval,
        )

    def with_healthy(self, seconds: float | None) -> Timing:
        return self if seconds is None else self._replace(healthy=seconds)


@dataclass(frozen=True)
class ServerSettings:
    """The main server container: its port, alias, arguments and environment."""

    container_port: int
    alias: str
    extra_args: str
    run_args: tuple[str, ...]
    env: dict[str, str]
    model_dir: str


@dataclass(frozen=True)
class Requests:
    prompt: str
    n_predict: int
    chat_message: str
    embed_input: str
    roundtrip: str


@dataclass(frozen=True)
class Ask:
    """A question and how long its answer may be."""

    question: str
    max_tokens: int


@dataclass(frozen=True)
class Expected:
    """A question and what its answer must match (a regular expression)."""

    question: str
    expect: str


@dataclass(frozen=True)
class Factual:
    max_tokens: int
    questions: tuple[Expected, ...]


@dataclass(frozen=True)
class Structured:
    """A question whose reply must follow `schema`, each value matching its expression."""

    question: str
    expect: dict[str, str]  # key -> regular expression, matched whole, case aside


@dataclass(frozen=True)
class SchemaAsk:
    max_tokens: int
    schema: dict[str, Any]  # a JSON schema, passed to the server as it is
    questions: tuple[Structured, ...]


@dataclass(frozen=True)
class GrammarAsk(Ask):
    gbnf: str
    matches: str  # a regular expression every answer the grammar allows matches


@dataclass(frozen=True)
class ToolAsk(Ask):
    example: list[dict[str, Any]]  # earlier turns of the conversation, as the API takes them
    tool: dict[str, Any]


@dataclass(frozen=True)
class CancelAsk(Ask):
    after_chunks: int  # chunks read before the client hangs up


@dataclass(frozen=True)
class Load(Ask):
    clients: int
    requests: int  # per client
    requests_emulated: int  # per client under QEMU, where the figures are the emulator's
    within: float  # seconds for all of it (native; emulated scaled)


@dataclass(frozen=True)
class RpcSplit:
    workers: int  # worker containers the model is split over
    questions: int  # the first factual questions, asked of one node and of the split
    extra_args: str  # both servers' llama-server arguments


@dataclass(frozen=True)
class CpuModel:
    cpu: str  # QEMU's name for it (`qemu-<arch>-static -cpu help`)
    loads: str  # the CPU backend library ggml's loader must take on it


@dataclass(frozen=True)
class CpusTier:
    """The cpus tier: llama-server under QEMU with each CPU model (pipeline/smoke/cpus.py)."""

    qemu: dict[str, str]  # arch -> the user-mode emulator's program name
    extra_args: str  # llama-server's arguments besides the model and port
    max_tokens: int
    timeout: float  # seconds for one model to start and answer
    models: dict[str, tuple[CpuModel, ...]]  # arch -> the models, in order


_CPU_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LIBRARY_RE = re.compile(r"^libggml-cpu[A-Za-z0-9._-]*\.so$")


def _cpus(spec: Fields) -> CpusTier:
    qemu = spec.string_map("qemu")
    models: dict[str, tuple[CpuModel, ...]] = {}
    per_arch = spec.sub("models", qemu, expected="a mapping arch -> CPU models")
    for arch in per_arch.data:
        found = []
        for model in per_arch.items(arch, "model"):
            model.no_unknown(("cpu", "loads"))
            found.append(CpuModel(model.text("cpu", _CPU_RE), model.text("loads", _LIBRARY_RE)))
        models[arch] = tuple(found)
    return CpusTier(
        qemu,
        spec.text("extra_args"),
        spec.integer("max_tokens", minimum=1),
        spec.number("timeout", above=0),
        models,
    )


@dataclass(frozen=True)
class RealTier:
    """The real tier: its model and server, the checks it runs in order, and what each asks."""

    model: str
    alias: str
    extra_args: str
    chat_template: str | None
    seed: int
    checks: tuple[str, ...]
    factual: Factual
    json_schema: SchemaAsk
    invalid_schema: dict[str, Any]  # a schema the server must refuse (4xx)
    grammar: GrammarAsk
    tool_call: ToolAsk
    stream: Ask
    cancel: CancelAsk
    load: Load
    rpc: RpcSplit


def _ask(spec: Fields) -> dict[str, Any]:
    return {"question": spec.text("question"), "max_tokens": spec.integer("max_tokens", minimum=1)}


def _regex(spec: Fields, key: str) -> str:
    pattern: str = spec.text(key)
    try:
        re.compile(pattern)
    except re.error as exc:
        spec.fail(f"{key} /{pattern}/ is not a regular expression: {exc}")
    return pattern


def _real(real: Fields) -> RealTier:
    def section(key: str, *extra: str) -> Fields:
        return real.sub(key, ("question", "max_tokens", *extra))

    factual = real.sub("factual", ("max_tokens", "questions"))
    expected = []
    for ask in factual.items("questions", "question"):
        ask.no_unknown(("question", "expect"))
        expected.append(Expected(ask.text("question"), _regex(ask, "expect")))
    schema = real.sub("json_schema", ("max_tokens", "schema", "questions"))
    keys = schema.sub("schema").sub("properties").data
    structured = []
    for ask in schema.items("questions", "question"):
        ask.no_unknown(("question", "expect"))
        values = ask.sub("expect", keys)  # only keys the schema has
        expect = {key: _regex(values, key) for key in values.data}
        structured.append(Structured(ask.text("question"), expect))
    grammar = section("grammar", "gbnf", "matches")
    tool = section("tool_call", "example", "tool")
    cancel = section("cancel", "after_chunks")
    load = section("load", "clients", "requests", "requests_emulated", "within")
    rpc = real.sub("rpc", ("workers", "questions", "extra_args"))
    questions = rpc.integer("questions", minimum=1)
    if questions > len(expected):
        rpc.fail(f"questions is {questions}, but factual has {len(expected)}")
    return RealTier(
        model=real.text("model"),
        alias=real.text("alias"),
        extra_args=real.text("extra_args"),
        chat_template=real.optional_text("chat_template"),
        seed=real.integer("seed"),
        checks=real.strings("checks", _NAME_RE),
        factual=Factual(factual.integer("max_tokens", minimum=1), tuple(expected)),
        json_schema=SchemaAsk(
            schema.integer("max_tokens", minimum=1), schema.mapping("schema"), tuple(structured)
        ),
        invalid_schema=real.mapping("invalid_schema"),
        grammar=GrammarAsk(
            **_ask(grammar), gbnf=grammar.text("gbnf"), matches=_regex(grammar, "matches")
        ),
        tool_call=ToolAsk(
            **_ask(tool),
            example=tool.typed("example", list, "a list of messages", default=[]),
            tool=tool.mapping("tool"),
        ),
        stream=Ask(**_ask(section("stream"))),
        cancel=CancelAsk(**_ask(cancel), after_chunks=cancel.integer("after_chunks", minimum=1)),
        load=Load(
            **_ask(load),
            clients=load.integer("clients", minimum=1),
            requests=load.integer("requests", minimum=1),
            requests_emulated=load.integer("requests_emulated", minimum=1),
            within=load.number("within", above=0),
        ),
        rpc=RpcSplit(rpc.integer("workers", minimum=1), questions, rpc.text("extra_args")),
    )


@dataclass(frozen=True)
class Settings:
    timing: dict[str, Timing]
    server: ServerSettings
    requests: Requests
    hub_repo: str
    real: RealTier
    cpus: CpusTier

    def timing_for(self, platform: str) -> Timing:
        """`native` on this machine's platform, `emulated` (QEMU, ten times slower) else."""
        return self.timing["emulated" if self.emulated(platform) else "native"]

    @staticmethod
    def emulated(platform: str) -> bool:
        """Whether an image of `platform` runs here through QEMU."""
        return platform != host_platform()


def _timing(spec: Fields) -> Timing:
    return Timing(*(spec.number(key, above=0) for key in Timing._fields))


def load_settings(path: Path = SETTINGS_FILE) -> Settings:
    top = Fields(
        load_yaml(path), path.name, ("timing", "server", "requests", "hub", "real", "cpus")
    )
    keys = tuple(Timing._fields)
    timing = {name: _timing(spec) for name, spec in top.entries("timing", keys)}
    missing = {"native", "emulated"} - set(timing)
    if missing:
        top.fail(f"timing: missing {', '.join(sorted(missing))}")
    server = top.sub("server", tuple(ServerSettings.__dataclass_fields__))
    requests = top.sub("requests", tuple(Requests.__dataclass_fields__))
    hub = top.sub("hub", ("repo",))
    return Settings(
        timing=timing,
        server=ServerSettings(
            container_port=server.integer("container_port", minimum=1),
            alias=server.text("alias"),
            extra_args=server.text("extra_args"),
            run_args=server.strings("run_args"),
            env=server.string_map("env"),
            model_dir=server.text("model_dir"),
        ),
        requests=Requests(
            prompt=requests.text("prompt"),
            n_predict=requests.integer("n_predict", minimum=1),
            chat_message=requests.text("chat_message"),
            embed_input=requests.text("embed_input"),
            roundtrip=requests.text("roundtrip"),
        ),
        hub_repo=hub.text("repo"),
        real=_real(top.sub("real")),
        cpus=_cpus(top.sub("cpus", tuple(CpusTier.__dataclass_fields__))),
    )
