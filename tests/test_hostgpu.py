"""`--backend auto`: the backend a local build picks from the host's GPUs, read from a root
directory (prepared trees here; this machine's own `/` at the end)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.build.options import resolve_build
from pipeline.cli import build_parser
from pipeline.matrix import load_matrix
from pipeline.matrix.hostgpu import detect_backend, load_rules

MATRIX = load_matrix()


def node(root: Path, relative: str, text: str = "") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def render_node(root: Path, name: str, driver: str) -> None:
    node(root, f"dev/dri/{name}")
    device = root / "sys/class/drm" / name / "device"
    device.mkdir(parents=True)
    (device / "driver").symlink_to(f"../../../../bus/pci/drivers/{driver}")


def nvidia_version(root: Path, driver: str) -> None:
    node(
        root,
        "proc/driver/nvidia/version",
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Release Build\n",
    )


@pytest.mark.parametrize(
    ("driver", "backend"),
    [("575.57.08", "cuda"), ("580.65.06", "cuda13"), ("590.44.01", "cuda13"), ("470.1", "cuda")],
)
def test_an_nvidia_gpu_picks_the_newest_cuda_its_driver_runs(
    tmp_path: Path, driver: str, backend: str
) -> None:
    node(tmp_path, "dev/nvidiactl")
    nvidia_version(tmp_path, driver)
    found = detect_backend(MATRIX, tmp_path, search_path="")
    assert found.backend == backend
    assert "/dev/nvidiactl" in found.evidence and f"driver {driver}" in found.evidence


def test_nvidia_smi_on_path_is_evidence_too(tmp_path: Path) -> None:
    smi = node(tmp_path, "usr/bin/nvidia-smi", "#!/bin/sh\n")
    smi.chmod(0o755)
    found = detect_backend(MATRIX, tmp_path, search_path="/usr/local/bin:/usr/bin")
    # No driver version to read: the backend for the oldest drivers.
    assert (found.backend, found.evidence.split(";")[0]) == (
        "cuda",
        "nvidia-smi at /usr/bin/nvidia-smi",
    )
    smi.chmod(0o644)  # not executable: not a command
    assert detect_backend(MATRIX, tmp_path, search_path="/usr/bin").backend == "cpu"


def test_an_amd_compute_node_picks_rocm(tmp_path: Path) -> None:
    node(tmp_path, "dev/kfd")
    render_node(tmp_path, "renderD128", "amdgpu")
    found = detect_backend(MATRIX, tmp_path, search_path="")
    assert (found.backend, found.evidence) == ("rocm", "/dev/kfd")


def test_a_render_node_with_a_vulkan_driver_picks_vulkan(tmp_path: Path) -> None:
    render_node(tmp_path, "renderD128", "i915")
    found = detect_backend(MATRIX, tmp_path, search_path="")
    assert (found.backend, found.evidence) == ("vulkan", "/dev/dri/renderD128 (driver i915)")


def test_a_render_node_without_a_vulkan_driver_is_not_a_gpu(tmp_path: Path) -> None:
    render_node(tmp_path, "renderD128", "vgem")  # a virtual GEM device: no GPU behind it
    found = detect_backend(MATRIX, tmp_path, search_path="")
    assert found.backend == "cpu"
    assert found.evidence.startswith("no GPU found: no /dev/nvidiactl")
    assert "/dev/kfd" in found.evidence and "/dev/dri/renderD*" in found.evidence


def test_the_rules_end_in_the_fallback_and_name_matrix_backends() -> None:
    rules = load_rules()
    assert rules[-1].backend == MATRIX.default_backend
    assert {rule.backend for rule in rules if not rule.cuda} <= set(MATRIX.backends)


def test_build_backend_auto_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """This machine's own root: what it shows decides, and the line says why. What it shows is
    read here independently of the rules' code, so every machine asserts something."""
    args = build_parser(["build"]).parse_args(["build", "--backend", "auto"])
    options = resolve_build(args)
    line = capsys.readouterr().err.strip()
    chosen = [backend.name for backend in options.backends]
    gpu = [p for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd") if os.path.exists(p)]
    vulkan_drivers = next(rule.drivers for rule in load_rules() if rule.backend == "vulkan")
    render_drivers = {
        Path(os.readlink(node / "device" / "driver")).name
        for node in Path("/sys/class/drm").glob("renderD*")
        if (node / "device" / "driver").is_symlink()
    }
    if gpu:
        assert chosen != ["cpu"], line
    elif render_drivers & set(vulkan_drivers):
        assert chosen == ["vulkan"], line
        assert line.startswith("backend auto: vulkan (/dev/dri/renderD"), line
    else:
        # No GPU device, and no render node of a GPU with a Vulkan driver (none at all, or a
        # display-only one): the CPU image, saying what it looked for.
        assert chosen == ["cpu"], line
        assert line.startswith("backend auto: cpu (no GPU found: no /dev/nvidiactl"), line
    print(f"\n{line}")
