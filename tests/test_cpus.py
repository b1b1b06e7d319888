"""The cpus tier (pipeline/smoke/cpus.py): the image's llama-server under QEMU's CPU models.

Substitution: none for the CPUs themselves — QEMU's user-mode emulator (Debian's
qemu-user-static) gives each program the CPUID of the model asked for; its TCG emulates no
AVX-512 (smoke.yaml says what that leaves out). The full table runs on images with every CPU
variant (`nox -s smoke -- --tier cpus` after a release-configuration build); here, on CI's
images (one kernel set each): an AVX2 build on a CPU without AVX is refused by ggml's loader
(it scores its kernels against the CPU), named; the arm64 build on an armv8.0 Cortex-A53 gives
the answer it gives here.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fixtures.images import SmokeImage
from fixtures.lab import require_lab

from pipeline.core.errors import ConfigError
from pipeline.core.project import Project
from pipeline.core.version import load_version
from pipeline.matrix import load_matrix
from pipeline.oci.engine import docker_client
from pipeline.records import CPUS_TIER, SmokeRecord
from pipeline.smoke import resolve_model
from pipeline.smoke.cpus import check_cpu_models, known_cpus, run_cpus
from pipeline.smoke.options import ModelSource
from pipeline.smoke.run import SmokeRun, SmokeTarget
from pipeline.smoke.settings import SETTINGS_FILE, CpuModel, CpusTier, Settings, load_settings


def emulator(name: str) -> Path:
    found = shutil.which(name)
    require_lab(found is not None, f"QEMU's user-mode emulator {name} (qemu-user-static)")
    assert found is not None
    return Path(found)


def test_the_shipped_table_names_cpus_qemu_emulates() -> None:
    cpus = load_settings().cpus
    for arch, name in cpus.qemu.items():
        program = emulator(name)
        assert check_cpu_models(cpus, arch, program) == cpus.models[arch]
    assert {"core2duo", "Nehalem", "Haswell", "max"} <= known_cpus(emulator(cpus.qemu["amd64"]))
    assert {"cortex-a53", "neoverse-n1", "max"} <= known_cpus(emulator(cpus.qemu["arm64"]))


def test_a_cpu_qemu_does_not_know_is_refused_before_any_run() -> None:
    cpus = load_settings().cpus
    program = emulator(cpus.qemu["arm64"])
    wrong = replace(cpus, models={"arm64": (CpuModel("cortex-a99", "libggml-cpu-armv8.0_1.so"),)})
    with pytest.raises(ConfigError) as err:
        check_cpu_models(wrong, "arm64", program)
    line = err.value.line()
    assert "cpus.models.arm64 names cortex-a99, which qemu-aarch64-static does not emulate" in line
    assert "cortex-a53" in line  # the ones it knows are listed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["models"].update(riscv64=[]), "unknown key(s) 'riscv64'"),
        (lambda c: c["models"]["amd64"][0].update(loads="x64"), "libggml-cpu"),
        (lambda c: c["models"]["amd64"][0].update(cpu="core 2"), "'core 2'"),
        (lambda c: c.update(timeout=0), "timeout"),
    ],
)
def test_the_table_is_checked_when_read(change: Any, message: str, tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(SETTINGS_FILE.read_text())
    cpus = copy.deepcopy(data["cpus"])
    change(cpus)
    data["cpus"] = cpus
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "cpus" in err.value.line() and message in err.value.line()


def cpus_run(project: Project, image: SmokeImage, arch: str, settings: Settings) -> SmokeRecord:
    matrix = load_matrix()
    mount = resolve_model(project, ModelSource(), settings, CPUS_TIER)
    target = SmokeTarget(image.ref, matrix.platform(f"linux/{arch}"), matrix.backend("cpu"))
    commit = load_version(project.version_file).llama_cpp.commit
    return run_cpus(SmokeRun(docker_client(), target, mount, settings, commit=commit))


def with_models(arch: str, *models: CpuModel) -> Settings:
    settings = load_settings()
    cpus: CpusTier = replace(settings.cpus, models={arch: models})
    return replace(settings, cpus=cpus)


@pytest.mark.docker
@pytest.mark.slow
def test_an_avx2_build_on_a_cpu_without_avx_is_named(
    project: Project, cpu_amd64: SmokeImage, real_gguf: Path
) -> None:
    """CI's amd64 image is one x86-64-v3 kernel set (AVX2): Nehalem has no AVX."""
    emulator("qemu-x86_64-static")
    record = cpus_run(
        project, cpu_amd64, "amd64", with_models("amd64", CpuModel("Nehalem", "libggml-cpu.so"))
    )
    checks = {c.name: c for c in record.checks}
    assert checks["cpu as run here"].passed, checks["cpu as run here"].detail
    assert "libggml-cpu.so" in checks["cpu as run here"].detail
    nehalem = checks["cpu Nehalem"]
    assert not nehalem.passed, nehalem.detail
    assert nehalem.detail.startswith("no CPU kernels for this CPU"), nehalem.detail
    assert not record.passed and record.tier == CPUS_TIER


@pytest.mark.docker
@pytest.mark.slow
def test_the_arm64_build_answers_the_same_on_an_armv8_0_cortex_a53(
    project: Project, cpu_arm64: SmokeImage, real_gguf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The counterpart that passes: the same tier, a CPU the build's kernels run on."""
    emulator("qemu-aarch64-static")
    settings = with_models("arm64", CpuModel("cortex-a53", "libggml-cpu.so"))
    record = cpus_run(project, cpu_arm64, "arm64", settings)
    checks = {c.name: c for c in record.checks}
    assert record.passed, [(c.name, c.detail) for c in record.checks]
    assert checks["cpu cortex-a53"].detail.startswith("libggml-cpu.so; the same answer")
    wrong = with_models("arm64", CpuModel("cortex-a53", "libggml-cpu-armv8.2_2.so"))
    mismatch = {c.name: c for c in cpus_run(project, cpu_arm64, "arm64", wrong).checks}
    assert mismatch["cpu cortex-a53"].detail == (
        "loaded libggml-cpu.so, expected libggml-cpu-armv8.2_2.so"
    )
    with capsys.disabled():
        print(f"\nFIGURE cpus tier arm64 cortex-a53: {checks['cpu cortex-a53'].seconds:.1f} s")
