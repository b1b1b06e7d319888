"""The cpus tier (`nox -s smoke -- --tier cpus`): the CPU kernels ggml chooses at start, proven
on the CPUs users have. The image's llama-server runs under QEMU's user-mode emulation as each
CPU model of smoke.yaml's `cpus` (the host's static emulator bind-mounted as the container's
entrypoint, `-cpu MODEL`): it must start without an illegal instruction, load the kernel
library the table names (the loader's own log line), and give the real model's greedy answer
that the image gives on this machine's own CPU.

The emulator's CPU models are checked against `-cpu help` before any container starts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from pipeline.core.errors import ConfigError, UsageError
from pipeline.oci.engine import ServerContainer, ServerExited
from pipeline.records import CPUS_TIER, Figure, SmokeRecord
from pipeline.smoke.real import chat, content_of
from pipeline.smoke.run import CheckFailed, Live, Outcome, SmokeRun, require, short
from pipeline.smoke.settings import CpuModel, CpusTier

LOADED_RE = re.compile(r"load_backend: loaded CPU backend from (\S+)")
EMULATOR_PATH = "/opt/qemu-user"  # where the host's emulator is mounted in the container
SERVER_PORT = 8080
ILLEGAL_INSTRUCTION = 128 + 4  # the exit status of a process killed by SIGILL
NO_KERNELS = "no CPU backend found"  # llama.cpp's loader, when no kernel library fits the CPU


def emulator(cpus: CpusTier, arch: str) -> Path:
    """The host's user-mode emulator for `arch` (a static program: it runs in any image)."""
    name = cpus.qemu.get(arch)
    if name is None:
        raise ConfigError(
            f"smoke.yaml: cpus.qemu names no emulator for {arch}",
            f"add one (known: {', '.join(sorted(cpus.qemu))})",
        )
    found = shutil.which(name)
    if found is None:
        raise UsageError(
            f"the cpus tier needs QEMU's user-mode emulator {name}, which this machine lacks",
            "install Debian's qemu-user-static",
        )
    return Path(found)


def known_cpus(program: Path) -> set[str]:
    """The CPU models `program -cpu help` lists (x86: "x86 NAME  description"; arm: "  NAME")."""
    done = subprocess.run(
        [str(program), "-cpu", "help"], capture_output=True, text=True, timeout=60, check=False
    )
    names = set()
    for line in done.stdout.splitlines()[1:]:
        words = line.split()
        if words:
            names.add(words[1] if words[0] == "x86" and len(words) > 1 else words[0])
    return names


def check_cpu_models(cpus: CpusTier, arch: str, program: Path) -> tuple[CpuModel, ...]:
    """The table's models for `arch`, each one the emulator knows: refused before any run."""
    models = cpus.models.get(arch, ())
    if not models:
        raise ConfigError(f"smoke.yaml: cpus.models has no CPU models for {arch}")
    known = known_cpus(program)
    unknown = [m.cpu for m in models if m.cpu not in known]
    if unknown:
        raise ConfigError(
            f"smoke.yaml: cpus.models.{arch} names {', '.join(unknown)}, which {program.name} "
            "does not emulate",
            f"{program.name} -cpu help lists: {', '.join(sorted(known, key=str.lower))}",
        )
    return models


def _answer(run: SmokeRun, box: ServerContainer) -> tuple[str, str, float]:
    """(the kernel library loaded, the answer to the first factual question, tokens/s)."""
    try:
        box.wait_healthy(box.base_url, run.timing.healthy)
    except (ServerExited, TimeoutError) as exc:
        state, code = box.status()
        logs = box.logs()
        tail = short([line for line in logs.splitlines() if line.strip()][-3:])
        if code == ILLEGAL_INSTRUCTION or "Illegal instruction" in logs:
            raise CheckFailed(f"illegal instruction (exit {code}): {tail}") from None
        if NO_KERNELS in logs:
            # ggml scores each kernel library against the CPU's features and loads none
            # that needs more than the CPU has: a refusal, not a crash.
            needs = f"no CPU kernels for this CPU: the image's need more ({NO_KERNELS})"
            raise CheckFailed(needs) from None
        raise CheckFailed(f"{exc} ({state}); log: {tail}") from None
    loaded = LOADED_RE.search(box.logs())
    require(loaded is not None, f"the log names no CPU backend: {short(box.log_tail(3))}")
    assert loaded is not None
    ask = run.settings.real.factual.questions[0]
    with httpx.Client(base_url=box.base_url, timeout=run.timing.request) as http:
        data = chat(Live(box, http), run, ask.question, max_tokens=run.settings.cpus.max_tokens)
    timings = data.get("timings") or {}
    speed = float(timings.get("predicted_per_second", 0.0))
    return Path(loaded.group(1)).name, content_of(data), speed


def _server(run: SmokeRun, emulated: tuple[Path, str] | None = None) -> ServerContainer:
    """llama-server itself as the entrypoint (not entrypoint.sh: the kernels are what is
    tested), under `emulator -cpu CPU` when `emulated` is (emulator, CPU)."""
    cpus = run.settings.cpus
    server = ["/app/llama-server", "-m", run.model.container_path, "--host", "0.0.0.0"]
    server += ["--port", str(SERVER_PORT), *cpus.extra_args.split()]
    mounts = {run.model.host_path: run.model.container_path}
    if emulated is not None:
        program, cpu = emulated
        mounts[program] = EMULATOR_PATH
        server = [EMULATOR_PATH, "-cpu", cpu, *server]
    return run.container(
        mounts=mounts, entrypoint=server[:1], command=server[1:], container_port=SERVER_PORT
    )


def run_cpus(run: SmokeRun) -> SmokeRecord:
    """One check per CPU model after the reference run on this machine's CPU; the record
    (never raises on a failed check; bad input before any container)."""
    arch = run.target.platform.arch
    program = emulator(run.settings.cpus, arch)
    models = check_cpu_models(run.settings.cpus, arch, program)
    # Emulated CPUs: the tier's own bound for starting and for the answer.
    bound = run.settings.cpus.timeout
    run.timing = run.settings.timing["emulated"]._replace(healthy=bound, request=bound)
    started = time.perf_counter()
    reference: list[str] = []

    def on_this_cpu() -> Outcome:
        with _server(run) as box:
            library, answer, speed = _answer(run, box)
        reference.append(answer)
        figure = Figure("tokens_per_second", round(speed, 2), "tokens/s")
        return Outcome(f"{library}; answered {short(answer, 60)!r}", (figure,))

    if not run.check("cpu as run here", on_this_cpu):
        run.skip([f"cpu {m.cpu}" for m in models], "no reference answer on this machine's CPU")
        return run.record(started, CPUS_TIER)

    for model in models:

        def emulated(model: CpuModel = model) -> Outcome:
            began = time.perf_counter()
            with _server(run, (program, model.cpu)) as box:
                library, answer, speed = _answer(run, box)
            require(library == model.loads, f"loaded {library}, expected {model.loads}")
            require(
                answer == reference[0],
                f"answered {short(answer, 60)!r}, this machine's CPU {short(reference[0], 60)!r}",
            )
            seconds = time.perf_counter() - began
            figures = (
                Figure("seconds", round(seconds, 1), "s"),
                Figure("tokens_per_second", round(speed, 2), "tokens/s"),
            )
            return Outcome(f"{library}; the same answer; {seconds:.0f} s", figures)

        run.check(f"cpu {model.cpu}", emulated)
    return run.record(started, CPUS_TIER)
