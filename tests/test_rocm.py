"""The ROCm image, built for real from Debian's ROCm (sid: hipcc's clang 21, the HIP runtime
6.4, rocBLAS and hipBLAS 6.4) in CI's budget: one GPU target (gfx1100, RDNA3) and without
ggml's flash-attention kernels (releases compile matrix.yaml's list with them; the labels say
which). Then its `no-gpu` smoke tier run here, where no AMD GPU is: the library closure, the
entrypoint's refusals (no /dev/kfd; a /dev/kfd the server's user may not open) and the CPU
fallback serving the model. The `gpu` tier needs an AMD GPU (skipped here, with the reason).

Substitution: none for the image. The GPU itself cannot be reached here: a file only root may
open stands in for /dev/kfd in the access refusal (the entrypoint checks what any device node
would show: that the user may not open it).

The entrypoint's refusals also run in CI's cpu image (the same entrypoint.sh) with the ROCm
image's environment: that part needs no ROCm build.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from fixtures.images import SmokeImage, build_gpu_image, image_config
from fixtures.lab import (
    require_gpu_images,
    require_lab,
)

from pipeline.build.sbom import sbom_files
from pipeline.core.project import Project
from pipeline.records import BuildRecord
from pipeline.smoke.options import SmokeOptions

CI_GPU_ARCHITECTURES = "gfx1100"
CI_BUILD_ARGS = (("CUDA_FLASH_ATTENTION", "OFF"),)
LABELS = "org.llamacpp-images"
ROCM_ENV = ("-e", "LLAMA_GPU_BACKEND=rocm")


def run_image(image: str, *options: str, command: tuple[str, ...] = ()) -> CompletedProcess[str]:
    """`docker run --rm OPTIONS IMAGE COMMAND` through the image's entrypoint."""
    return subprocess.run(
        ["docker", "run", "--rm", *options, image, *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.skipif(Path("/dev/kfd").exists(), reason="this machine shows an AMD GPU (/dev/kfd)")
def test_the_rocm_refusals_in_the_image_entrypoint(
    cpu_amd64: SmokeImage, real_gguf: Path, tmp_path: Path
) -> None:
    """In a container, with the ROCm image's environment: no /dev/kfd names the devices to
    give; a /dev/kfd the server's user (10001) may not open names the group to add, by the
    number the device shows; LLAMA_ALLOW_CPU=1 warns and serves from the CPU."""
    model = ("-v", f"{real_gguf}:/models/m.gguf:ro", "-e", "LLAMA_MODEL=/models/m.gguf")
    none = run_image(cpu_amd64.ref, *ROCM_ENV, *model)
    assert none.returncode == 64, none.stderr
    assert none.stderr.strip().splitlines() == [
        "llama-server image: no AMD GPU is visible in this container (no /dev/kfd): run it with "
        "--device /dev/kfd --device /dev/dri on a host with the amdgpu driver, or set "
        "LLAMA_ALLOW_CPU=1 to run on the CPU (slow)"
    ]
    device = tmp_path / "kfd"
    device.write_bytes(b"")
    device.chmod(0o600)
    group = device.stat().st_gid
    closed = run_image(cpu_amd64.ref, *ROCM_ENV, *model, "-v", f"{device}:/dev/kfd")
    assert closed.returncode == 64, closed.stderr
    (line,) = closed.stderr.strip().splitlines()
    assert "/dev/kfd is visible but user 10001 may not open it" in line
    assert f"add --group-add {group} " in line
    # The user in that group (here: the file made open to all), the check passes and the
    # server starts: an option it does not know is its own error, past the entrypoint's checks
    # (informational ones such as --version skip them).
    device.chmod(0o666)
    past = ("--no-such-option",)
    mounted = ("-v", f"{device}:/dev/kfd")
    opened = run_image(cpu_amd64.ref, *ROCM_ENV, *model, *mounted, command=past)
    assert "invalid argument: --no-such-option" in opened.stderr, opened.stderr
    assert "kfd" not in opened.stderr and "AMD" not in opened.stderr, opened.stderr
    allowed = run_image(cpu_amd64.ref, *ROCM_ENV, "-e", "LLAMA_ALLOW_CPU=1", *model, command=past)
    assert "invalid argument: --no-such-option" in allowed.stderr, allowed.stderr
    assert "warning: no AMD GPU is visible" in allowed.stderr
    assert "LLAMA_ALLOW_CPU=1: running on the CPU (slow)" in allowed.stderr


# ------------------------------------------------------------------- the ROCm image itself


@pytest.fixture(scope="session")
def rocm_amd64(docker_engine: None, lab_project: Project) -> BuildRecord:
    require_gpu_images("rocm")
    sid = subprocess.run(
        ["docker", "buildx", "imagetools", "inspect", "127.0.0.1:5000/library/debian:sid"],
        capture_output=True,
        check=False,
    )
    require_lab(sid.returncode == 0, "the lab's debian:sid base (LAB_SID_BASE=1 .ci/provision)")
    return build_gpu_image(lab_project, "rocm", CI_GPU_ARCHITECTURES, CI_BUILD_ARGS)


# Timeout: the cold HIP compile on a 2-core machine.
@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_rocm_image_carries_what_it_loads_for_its_gpu_targets_only(
    rocm_amd64: BuildRecord, lab_project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    config = image_config(rocm_amd64.ref)
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["LLAMA_GPU_BACKEND"] == "rocm"
    labels = config["Labels"]
    assert labels[f"{LABELS}.gpu-architectures"] == CI_GPU_ARCHITECTURES
    assert labels[f"{LABELS}.flash-attention"] == "OFF"
    assert config["User"] == "10001:10001"
    assert rocm_amd64.sbom
    document = json.loads((lab_project.reports_dir / rocm_amd64.sbom).read_text())
    files = sbom_files(document)
    names = {Path(p).name for p in files}
    runtime = {"libamdhip64.so.6", "libhsa-runtime64.so.1", "librocblas.so.4", "libhipblas.so.2"}
    assert runtime | {"libamd_comgr.so.3", "libggml-hip.so"} <= names, sorted(names)
    # rocBLAS's kernels: gfx1100's and the shared index files, no other target's.
    kernels = [p for p in files if "/rocblas/" in p]
    assert any(p.endswith("TensileLibrary_lazy_gfx1100.dat") for p in kernels), kernels[:5]
    other = [p for p in kernels if "gfx" in Path(p).name and "gfx1100" not in Path(p).name]
    assert not other, other[:5]
    # Nothing of the toolchain: no compiler, no device libraries.
    assert not [p for p in files if "/bin/" in p and not p.startswith("/bin/busybox")]
    assert not [n for n in names if n.startswith(("libclang", "amdgcn", "libhiprtc"))]
    packages = {
        c["name"]: c["version"]
        for c in document["components"]
        if c.get("purl", "").startswith("pkg:deb/")
    }
    assert packages.get("librocblas4", "").startswith("6.4."), sorted(packages)
    size = (rocm_amd64.size_bytes or 0) / 1e6
    with capsys.disabled():
        print(
            f"\nFIGURE rocm image (CI size: {CI_GPU_ARCHITECTURES}, no FA): "
            f"{size:.1f} MB uncompressed, built in {rocm_amd64.seconds:.0f} s"
        )


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_rocm_no_gpu_tier_passes_without_a_gpu(
    rocm_amd64: BuildRecord, lab_project: Project
) -> None:
    from pipeline.smoke import smoke

    if Path("/dev/kfd").exists():
        pytest.skip("this machine shows an AMD GPU: the refusals cannot be seen here")
    options = SmokeOptions.named(
        lab_project, platforms=("linux/amd64",), backend="rocm", tier="no-gpu"
    )
    (record,) = smoke(options, [rocm_amd64])
    checks = {c.name: c for c in record.checks}
    assert record.passed, [(c.name, c.detail) for c in record.checks if not c.passed]
    assert {"library-closure", "gpu-refusal", "gpu-access-refusal"} <= set(checks)
    assert "--device /dev/kfd --device /dev/dri" in checks["gpu-refusal"].detail
    assert "--group-add" in checks["gpu-access-refusal"].detail
    # The fallback served the model from the CPU kernels: the server's own log says so.
    assert "loaded CPU backend" in checks["backend-device"].detail


@pytest.mark.docker
@pytest.mark.slow
def test_the_rocm_gpu_tier_serves_from_the_gpu(
    rocm_amd64: BuildRecord, lab_project: Project
) -> None:
    from pipeline.smoke import smoke

    if not Path("/dev/kfd").exists():
        pytest.skip("no AMD GPU (/dev/kfd) on this machine: the gpu tier runs where one is")
    options = SmokeOptions.named(
        lab_project, platforms=("linux/amd64",), backend="rocm", tier="gpu"
    )
    (record,) = smoke(options, [rocm_amd64])
    assert record.passed and record.tier == "gpu"
    device = next(c for c in record.checks if c.name == "backend-device")
    assert "ROCm0" in device.detail and "layers to GPU" in device.detail
