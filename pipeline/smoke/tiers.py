"""The checks a smoke tier runs besides everyone's (matrix.yaml: a tier's `checks`), registered
by name. CUDA and ROCm images: the entrypoint's refusals, each in a short-lived container of its
own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.oci.elf import TRIPLETS
from pipeline.smoke.run import Runs, SmokeRun, require, short, smoke_check


def refusal(run: SmokeRun, env: dict[str, str], mounts: dict[Path, str] | None = None) -> list[str]:
    """The entrypoint's output, with a model, in a container that must refuse to start."""
    env = {"LLAMA_MODEL": run.model.container_path, "LLAMA_ALLOW_CPU": "", **env}
    mounts = {run.model.host_path: run.model.container_path, **(mounts or {})}
    with run.container(env=env, mounts=mounts) as box:
        code = box.wait_exit(run.timing.exit)
        lines = [line for line in box.logs().splitlines() if line.strip()]
    require(code != 0, f"exit code {code}, expected a refusal (non-zero)")
    require(len(lines) == 1, f"{len(lines)} lines of output, expected one: {short(lines)}")
    return lines


@smoke_check("gpu-refusal", Runs.CONTAINER, named_only=True)
def check_gpu_refusal(run: SmokeRun) -> str:
    # Without a GPU a CUDA or ROCm image would serve from its CPU kernels at a fraction of the
    # speed: unless LLAMA_ALLOW_CPU=1, it refuses, naming how to give it the GPU: what the gpu
    # tier gives its containers (the devices, or NVIDIA's `--gpus all` through its toolkit).
    gpu = run.backend.smoke.tiers.get("gpu")
    require(gpu is not None, f"{run.backend.name} has no gpu tier: no GPU to refuse without")
    assert gpu is not None
    needed = [f"--device {d}" for d in gpu.devices] or ["--gpus all", "NVIDIA Container Toolkit"]
    (line,) = refusal(run, {})
    for name in (*needed, "LLAMA_ALLOW_CPU=1"):
        require(name in line, f"the refusal does not name {name!r}: {line!r}")
    return line


@smoke_check("gpu-access-refusal", Runs.CONTAINER, named_only=True)
def check_gpu_access_refusal(run: SmokeRun) -> str:
    # /dev/kfd given but not to the server's user (the group owning it not added): the HIP
    # runtime would find no GPU. In its place here, a file only root may open.
    with tempfile.TemporaryDirectory(prefix="kfd-") as tmp:
        device = Path(tmp) / "kfd"
        device.write_bytes(b"")
        device.chmod(0o600)
        group = device.stat().st_gid
        (line,) = refusal(run, {}, {device: "/dev/kfd"})
    for needed in ("/dev/kfd", f"--group-add {group}", "LLAMA_ALLOW_CPU=1"):
        require(needed in line, f"the refusal does not name {needed!r}: {line!r}")
    return line


@smoke_check("old-driver-refusal", Runs.CONTAINER, named_only=True)
def check_old_driver_refusal(run: SmokeRun) -> str:
    # The container toolkit mounts libcuda.so.<driver version>: an old one, mounted here.
    cuda = run.backend.cuda
    require(cuda is not None, f"{run.backend.name} is not a CUDA backend")
    assert cuda is not None
    old = "535.104.05"
    triplet = TRIPLETS[run.target.platform.arch]
    with tempfile.TemporaryDirectory(prefix="old-driver-") as tmp:
        fake = Path(tmp) / f"libcuda.so.{old}"
        fake.write_bytes(b"")
        fake.chmod(0o644)
        (line,) = refusal(run, {}, {fake: f"/usr/lib/{triplet}/libcuda.so.{old}"})
    for needed in (old, cuda.min_driver, *([f"-{cuda.instead}"] if cuda.instead else [])):
        require(needed in line, f"the refusal does not name {needed!r}: {line!r}")
    return line
