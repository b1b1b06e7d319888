"""The CUDA 13 image, built for real from NVIDIA's PyPI wheels (the release's own recipe) in CI's
budget: one GPU architecture as PTX only (90-virtual, Hopper, compiled by the driver's JIT) and
without ggml's flash-attention kernels (releases compile matrix.yaml's whole list, as device code,
with them; the labels say which). Then its
`no-gpu` smoke tier run here, where no GPU is: the library closure, the entrypoint's refusals
(no GPU visible; a driver too old) and the CPU fallback serving the model. The `gpu` tier needs
an NVIDIA GPU (skipped here, with the reason)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.images import build_gpu_image, image_config
from fixtures.lab import (
    copy_project,
    require_gpu_images,
    require_lab,
)

from pipeline.build.sbom import sbom_files
from pipeline.build.toolkit import load_wheels
from pipeline.core.project import Project
from pipeline.matrix import load_matrix
from pipeline.publish.options import PublishOptions
from pipeline.records import BuildRecord, SmokeRecord, load_smoke_records
from pipeline.smoke.options import SmokeOptions

CI_GPU_ARCHITECTURES = "90-virtual"
CI_BUILD_ARGS = (("CUDA_FLASH_ATTENTION", "OFF"),)
LABELS = "org.llamacpp-images"

# The cold CUDA compile on a 2-core runner is the suite's longest build: its first test (which
# builds the session's image) gets more than the default hang limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="session")
def cuda13_amd64(docker_engine: None, lab_project: Project) -> BuildRecord:
    require_gpu_images("cuda13")
    return build_gpu_image(lab_project, "cuda13", CI_GPU_ARCHITECTURES, CI_BUILD_ARGS)


def test_the_cuda13_image_follows_nvidias_conventions_and_carries_only_what_it_loads(
    cuda13_amd64: BuildRecord, lab_project: Project
) -> None:
    config = image_config(cuda13_amd64.ref)
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["NVIDIA_REQUIRE_CUDA"] == "cuda>=13.0"
    cuda = load_matrix().backend("cuda13").cuda
    assert cuda is not None
    labels = config["Labels"]
    assert labels[f"{LABELS}.cuda.version"] == cuda.version
    assert labels[f"{LABELS}.cuda.min-driver"] == cuda.min_driver
    assert labels[f"{LABELS}.gpu-architectures"] == CI_GPU_ARCHITECTURES
    assert labels[f"{LABELS}.cuda.flash-attention"] == "OFF"
    assert config["User"] == "10001:10001"
    # The SBOM: every CUDA library the image carries is a pinned wheel, at its pinned version.
    assert cuda13_amd64.sbom
    document = json.loads((lab_project.reports_dir / cuda13_amd64.sbom).read_text())
    files = sbom_files(document)
    pinned = {w.name: w.version for w in load_wheels("cuda13", "amd64")}
    shipped = {
        c["name"]: c["version"] for c in document["components"] if c["purl"].startswith("pkg:pypi/")
    }
    assert set(shipped) == {"nvidia-cuda-runtime", "nvidia-cublas"}, shipped
    assert all(pinned[name] == version for name, version in shipped.items())
    libraries = {Path(p).name for p in files}
    assert {"libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libggml-cuda.so"} <= (
        libraries
    )
    # Nothing of the toolkit beyond what llama-server loads: no driver stub, no compiler.
    assert not {n for n in libraries if n.startswith(("libcuda.so", "libnvvm", "libnvblas"))}
    assert not [p for p in files if "/bin/" in p and not p.startswith("/bin/busybox")]


def test_the_no_gpu_tier_passes_without_a_gpu(
    cuda13_amd64: BuildRecord,
    lab_project: Project,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipeline.smoke import smoke

    if Path("/dev/nvidiactl").exists():
        pytest.skip("this machine shows an NVIDIA GPU: the refusals cannot be seen here")
    options = SmokeOptions.named(
        lab_project, platforms=("linux/amd64",), backend="cuda13", tier="no-gpu"
    )
    (record,) = smoke(options, [cuda13_amd64])
    checks = {c.name: c for c in record.checks}
    assert record.passed, [(c.name, c.detail) for c in record.checks if not c.passed]
    assert record.tier == "no-gpu" and record.filename == "smoke-cuda13-amd64.json"
    assert {"library-closure", "gpu-refusal", "old-driver-refusal"} <= set(checks)
    assert "libcuda.so.1" in checks["library-closure"].detail
    assert "--gpus all" in checks["gpu-refusal"].detail
    assert "535.104.05" in checks["old-driver-refusal"].detail
    assert "-cuda tags" in checks["old-driver-refusal"].detail
    # The fallback served the model from the CPU kernels: the server's own log says so.
    assert "loaded CPU backend" in checks["backend-device"].detail
    capsys.readouterr()


def test_publish_requires_the_gpu_tier_unless_the_release_had_no_gpu_runner(
    cuda13_amd64: BuildRecord,
    lab_project: Project,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The records smoke wrote for the built image, planned by publish (a dry run: nothing is
    pushed): without a gpu-tier report it refuses, unless --no-gpu-runner, where the plan says
    what it publishes on."""
    from pipeline.publish import publish

    smokes: list[SmokeRecord] = [
        s for s in load_smoke_records(lab_project.reports_dir) if s.backend == "cuda13"
    ]
    require_lab(bool(smokes), "the no-gpu smoke report (test_the_no_gpu_tier_passes_without_a_gpu)")
    root = copy_project(tmp_path / "project")
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    for no_gpu_runner in (False, True):
        without = "cuda13" if no_gpu_runner else ()
        options = PublishOptions.named(
            Project(root), dry_run=True, no_gpu_runner=without, registry=None, no_sign=True
        )
        outcome = publish(options, [cuda13_amd64], smokes)
        notes = " ".join(outcome.plan.notes)
        gpu_missing = "tier gpu, has no smoke report" in notes
        assert gpu_missing is not no_gpu_runner, notes
        said = "published on its no-gpu smoke tier only" in notes
        assert said is no_gpu_runner, notes
    capsys.readouterr()


def test_the_gpu_tier_serves_from_the_gpu(cuda13_amd64: BuildRecord, lab_project: Project) -> None:
    from pipeline.smoke import smoke

    if not Path("/dev/nvidiactl").exists():
        pytest.skip("no NVIDIA GPU on this machine: the gpu tier runs where one is (release.yml)")
    options = SmokeOptions.named(
        lab_project, platforms=("linux/amd64",), backend="cuda13", tier="gpu"
    )
    (record,) = smoke(options, [cuda13_amd64])
    assert record.passed and record.tier == "gpu"
    device = next(c for c in record.checks if c.name == "backend-device")
    assert "CUDA0" in device.detail and "layers to GPU" in device.detail
