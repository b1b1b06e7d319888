"""pipeline/matrix/matrix.yaml and its loader: the shipped matrix, and every validation error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.lab import REPO_ROOT

from pipeline.core.errors import ConfigError, UsageError
from pipeline.matrix import (
    MATRIX_FILE,
    Matrix,
    configure_flags,
    load_matrix,
    normalize_platform,
    parse_matrix,
)


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    return load_matrix()


@pytest.fixture
def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(MATRIX_FILE.read_text())
    return copy.deepcopy(data)


def test_shipped_matrix_has_every_backend_on_its_platforms(matrix: Matrix) -> None:
    assert list(matrix.backends) == ["cpu", "vulkan", "cuda", "cuda13", "rocm"]
    assert matrix.default_backend == "cpu"
    both = ("linux/amd64", "linux/arm64")
    assert matrix.backend("cpu").platform_names == both
    assert matrix.backend("vulkan").platform_names == both
    assert matrix.backend("cuda").platform_names == both
    assert matrix.backend("rocm").platform_names == ("linux/amd64",)
    assert matrix.runtime_user.uid > 0


def test_cpu_is_portable_cross_compiled_and_needs_no_target_code(matrix: Matrix) -> None:
    cpu = matrix.backend("cpu")
    flags = dict(configure_flags(matrix, cpu))
    assert flags["GGML_NATIVE"] == "OFF"
    assert flags["GGML_BACKEND_DL"] == "ON"
    assert flags["LLAMA_USE_PREBUILT_UI"] == "OFF"
    assert cpu.cpu_variants == "all"
    assert dict(matrix.cpu_variant_set("all").cmake_flags["arm64"]) == {
        "GGML_CPU_ALL_VARIANTS": "ON"
    }
    assert cpu.cross_compile and cpu.runtime.kind == "scratch"
    assert not cpu.runs_target_code
    assert not cpu.smoke.needs_gpu


def test_gpu_backends_carry_their_architecture_lists(matrix: Matrix) -> None:
    cuda = dict(configure_flags(matrix, matrix.backend("cuda")))
    # CUDA 12.9: Pascal to Blackwell; CUDA 13 dropped Pascal and Volta.
    assert cuda["CMAKE_CUDA_ARCHITECTURES"] == "61;70;75;80;86;89;90;100;120"
    assert cuda["GGML_CUDA"] == "ON"
    cuda13 = dict(configure_flags(matrix, matrix.backend("cuda13")))
    assert cuda13["CMAKE_CUDA_ARCHITECTURES"] == "75;80;86;89;90;100;120"
    rocm = dict(configure_flags(matrix, matrix.backend("rocm")))
    # Every RDNA and CDNA target Debian's rocBLAS has kernels for (no gfx942, no RDNA4).
    targets = ["gfx908", "gfx90a", "gfx1030", "gfx1100", "gfx1101", "gfx1102"]
    assert rocm["GPU_TARGETS"].split(";") == targets
    assert rocm["GGML_HIP"] == "ON"
    rocm_backend = matrix.backend("rocm")
    assert rocm_backend.rocm and set(targets) <= set(rocm_backend.rocm.rocblas_architectures)
    assert rocm_backend.runtime.kind == "scratch"
    assert rocm_backend.runtime.dlopened == ("libamd_comgr.so.3",)
    assert rocm_backend.smoke.tiers["gpu"].devices == ("/dev/kfd", "/dev/dri")
    assert rocm_backend.smoke.required(gpu_runner=False) == ("no-gpu", "real")
    # Native builders for CUDA/ROCm (no cross nvcc/hipcc): they run target code.
    assert matrix.backend("cuda").runs_target_code
    assert matrix.backend("cuda").smoke.needs_gpu
    # vulkan is cross-compiled and assembled from files like cpu: no target code runs.
    assert not matrix.backend("vulkan").runs_target_code
    assert matrix.backend("vulkan").runtime.vulkan_drivers["amd64"][-1] == "lvp"


def test_cuda_backends_share_one_template_and_say_what_they_need(matrix: Matrix) -> None:
    cuda, cuda13 = matrix.backend("cuda"), matrix.backend("cuda13")
    assert cuda.template == cuda13.template == "cuda.Dockerfile.j2"
    assert (cuda.tag_suffix, cuda13.tag_suffix) == ("cuda", "cuda13")
    assert cuda.cuda and cuda13.cuda
    assert float(cuda.cuda.version) >= 12.8  # Blackwell's sm_120
    assert cuda13.cuda.version.startswith("13.") and cuda13.cuda.instead == "cuda"
    assert cuda13.cuda.require == "cuda>=13.0" and cuda13.cuda.toolkit == "wheels"
    for backend in (cuda, cuda13):
        assert backend.runtime.kind == "scratch"
        assert backend.smoke.host_libraries == ("libcuda.so.1",)
        assert set(backend.smoke.tiers) == {"no-gpu", "gpu"}
        assert backend.smoke.tiers["gpu"].gpus and not backend.smoke.tiers["no-gpu"].gpus
        assert backend.smoke.required(gpu_runner=True) == ("no-gpu", "gpu", "real")
        assert backend.smoke.required(gpu_runner=False) == ("no-gpu", "real")
    assert matrix.backend("cpu").smoke.required(gpu_runner=False) == ("no-gpu", "real")
    every = ("no-gpu", "real", "cpus")
    assert matrix.backend("cpu").smoke.required(False, "all") == every
    assert matrix.backend("cpu").smoke.required(True, "x86-64-v3") == ("no-gpu", "real")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["tiers"].pop("no-gpu"), "needs a `no-gpu` tier"),
        (lambda s: s.update(publish_requires=["gpu"]), "not one of its tiers"),
        (lambda s: s["tiers"]["no-gpu"].update(gpus="yes"), "expected true or false"),
        (lambda s: s["tiers"]["no-gpu"].update(device_log=[]), "device_log is empty"),
        (
            lambda s: s.update(publish_requires_by_cpu_variants={"every": ["cpus"]}),
            "'every' is not a CPU variant set",
        ),
        (
            lambda s: s.update(publish_requires_by_cpu_variants={"all": ["emulated"]}),
            "all names tier 'emulated', not one of its tiers",
        ),
    ],
)
def test_smoke_tiers_are_checked(change: Any, message: str) -> None:
    data = yaml.safe_load(MATRIX_FILE.read_text())
    change(data["backends"]["cpu"]["smoke"])
    with pytest.raises(ConfigError, match=message):
        parse_matrix(data)


def test_names_are_checked_with_the_valid_ones_listed(matrix: Matrix) -> None:
    with pytest.raises(UsageError) as err:
        matrix.backend("opencl")
    assert "valid backends: cpu, vulkan, cuda, cuda13, rocm" in err.value.line()
    with pytest.raises(UsageError) as err:
        matrix.platform("riscv64")
    assert "linux/amd64 (amd64), linux/arm64 (arm64)" in err.value.line()
    with pytest.raises(UsageError) as err:
        matrix.cpu_variant_set("some")
    assert "all, baseline" in err.value.line()
    with pytest.raises(UsageError) as err:
        matrix.targets([matrix.backend("rocm")], [matrix.platform("arm64")])
    assert "not built for linux/arm64" in err.value.line()
    assert "linux/amd64" in err.value.line()


def test_platform_shorthands(matrix: Matrix) -> None:
    assert normalize_platform("arm64") == "linux/arm64"
    assert normalize_platform(" linux/amd64 ") == "linux/amd64"
    assert matrix.platform("arm64").gnu_triplet == "aarch64-linux-gnu"
    backends = [matrix.backend("cpu"), matrix.backend("vulkan")]
    targets = matrix.targets(backends, [matrix.platform("amd64"), matrix.platform("linux/arm64")])
    assert [t.key for t in targets] == ["cpu-amd64", "cpu-arm64", "vulkan-amd64", "vulkan-arm64"]


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as err:
        parse_matrix(data)
    return err.value.line()


def test_unknown_and_missing_keys_are_named(raw: dict[str, Any]) -> None:
    raw["backends"]["cpu"]["cmake_flag"] = {}
    assert "backends.cpu: unknown key(s) 'cmake_flag'" in _error(raw)
    del raw["backends"]["cpu"]["cmake_flag"]
    del raw["backends"]["cpu"]["builder_image"]
    assert "backends.cpu: missing key 'builder_image'" in _error(raw)


def test_a_bare_yaml_boolean_flag_is_refused(raw: dict[str, Any]) -> None:
    raw["backends"]["vulkan"]["cmake_flags"]["GGML_VULKAN"] = True
    assert 'write "ON"/"OFF" in quotes' in _error(raw)


def test_backend_platforms_must_be_declared(raw: dict[str, Any]) -> None:
    raw["backends"]["cpu"]["platforms"].append("linux/riscv64")
    line = _error(raw)
    assert "platform 'linux/riscv64' is not declared" in line
    assert "linux/amd64, linux/arm64" in line


def test_cross_field_rules(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["default_backend"] = "metal"
    assert "default_backend 'metal' is not a backend" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["backends"]["cpu"]["runtime"]["packages"] = ["libgomp1"]
    assert "backends.cpu.runtime: unknown key(s) 'packages'" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["backends"]["cuda"]["gpu_architectures"] = []
    assert "go together" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["backends"]["vulkan"]["runtime"]["vulkan_drivers"]["riscv64"] = ["lvp"]
    assert "backends.vulkan.runtime.vulkan_drivers: unknown key(s) 'riscv64'" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["backends"]["vulkan"]["runtime"]["vulkan_drivers"]["amd64"] = ["lvp_icd.json"]
    line = _error(bad)
    assert "vulkan_drivers" in line and "'lvp_icd.json'" in line
    bad = copy.deepcopy(raw)
    bad["backends"]["cpu"]["cpu_variants"] = "fast"
    assert "cpu_variants 'fast' is not declared" in _error(bad)
    bad = copy.deepcopy(raw)
    del bad["cpu_variants"]["baseline"]["cmake_flags"]["arm64"]
    assert "no flags for arch(es) arm64" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["runtime_user"]["uid"] = 0
    assert "non-root" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["backends"]["cpu"]["build_packages"].append("Not A Package")
    assert "build_packages" in _error(bad)


def test_quick_targets_are_for_a_host_build_only(raw: dict[str, Any], matrix: Matrix) -> None:
    # The shipped host set names upstream's request-path targets; releases name none.
    assert "llama-common" in matrix.cpu_variant_set("host").quick_targets
    assert "llama" not in matrix.cpu_variant_set("host").quick_targets  # libllama stays -O3
    assert not matrix.cpu_variant_set("all").quick_targets
    bad = copy.deepcopy(raw)
    bad["cpu_variants"]["all"]["quick_targets"] = ["llama-common"]
    assert "only a host_only set may compile at -O1" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["cpu_variants"]["host"]["quick_targets"] = ["mtmd", "mtmd"]
    assert "lists 'mtmd' twice" in _error(bad)
    bad = copy.deepcopy(raw)
    bad["cpu_variants"]["host"]["quick_targets"] = ["-O0"]
    assert "quick_targets" in _error(bad)


def test_each_compiler_has_its_own_compiler_cache(raw: dict[str, Any], matrix: Matrix) -> None:
    """One bounded ccache mount per backend (a cuda13 rebuild once found none of its objects
    in the one mount all backends shared); vulkan shares cpu's, the same compiler's."""
    caches = {b.name: b.compiler_cache for b in matrix.backends.values()}
    assert caches == {
        "cpu": "cpu",
        "vulkan": "cpu",
        "cuda": "cuda",
        "cuda13": "cuda13",
        "rocm": "rocm",
    }
    rendered = (REPO_ROOT / "dockerfiles" / "rendered" / "cuda13.Dockerfile").read_text()
    assert rendered.count("id=ccache-cuda13-$TARGETARCH,") == 3  # the compile's steps, export
    bad = copy.deepcopy(raw)
    bad["backends"]["vulkan"]["compiler_cache"] = "opencl"
    assert "compiler_cache 'opencl' is not a backend" in _error(bad)


def test_a_gpu_target_rocblas_does_not_ship_is_refused(raw: dict[str, Any]) -> None:
    """Debian's rocBLAS 6.4.4 has no kernels for CDNA3 (gfx942) or RDNA4 (gfx1200/1201): an
    image for them would fail at its first matrix product, so render refuses, naming those it
    ships; `nox -s build -- --gpu-architectures` refuses the same way, before any build."""
    bad = copy.deepcopy(raw)
    bad["backends"]["rocm"]["gpu_architectures"] = ["gfx1100", "gfx942", "gfx1201"]
    message = _error(bad)
    assert "gpu_architectures names gfx942, gfx1201, for which rocBLAS has no kernels" in message
    assert "gfx90a, gfx1010, gfx1030, gfx1100, gfx1101, gfx1102" in message
    from pipeline.build.options import BuildOptions
    from pipeline.build.plan import plan_jobs
    from pipeline.core.project import Project

    options = BuildOptions.named(
        Project(REPO_ROOT),
        platforms=("linux/amd64",),
        backends=("rocm",),
        gpu_architectures="gfx1100,gfx1200",
        quiet=True,
    )
    with pytest.raises(UsageError, match="rocBLAS has no kernels for gfx1200") as err:
        plan_jobs(options)
    assert "gfx803, gfx900" in err.value.line()


def test_the_web_uis_npm_is_pinned_by_hash(raw: dict[str, Any], matrix: Matrix) -> None:
    assert matrix.web_ui_npm is not None and "+sha512." in matrix.web_ui_npm
    bad = copy.deepcopy(raw)
    bad["web_ui_npm"] = "11.21.3"  # a version alone: whatever the registry serves under it
    assert "web_ui_npm" in _error(bad)
    del bad["web_ui_npm"]
    assert "web_ui_builder_image or web_ui_npm is not set" in _error(bad)


def test_broken_files_fail_with_the_file_named(tmp_path: Path) -> None:
    path = tmp_path / "matrix.yaml"
    path.write_text("backends: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_matrix(path)
    assert "matrix.yaml is not valid YAML at line" in err.value.line()
    with pytest.raises(ConfigError) as err:
        load_matrix(tmp_path / "absent.yaml")
    assert "absent.yaml not found" in err.value.line()
    assert "top level is list" in _error([1, 2])


def test_a_backends_gpu_is_visible_by_its_own_devices(matrix: Matrix, tmp_path: Path) -> None:
    """Each GPU backend's gpu tier runs where its own GPU shows (track and smoke ask this):
    rocm where /dev/kfd and /dev/dri are, the CUDA images where NVIDIA's control device is;
    an NVIDIA machine is no GPU runner for rocm, nor an AMD one for cuda."""
    (tmp_path / "dev" / "dri").mkdir(parents=True)
    (tmp_path / "dev" / "kfd").write_bytes(b"")
    smoke = {name: matrix.backend(name).smoke for name in ("cpu", "vulkan", "cuda13", "rocm")}
    assert [n for n, s in smoke.items() if s.gpu_visible(tmp_path)] == ["rocm"]
    (tmp_path / "dev" / "kfd").unlink()
    (tmp_path / "dev" / "nvidiactl").write_bytes(b"")
    assert [n for n, s in smoke.items() if s.gpu_visible(tmp_path)] == ["cuda13"]
