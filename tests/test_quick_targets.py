"""dockerfiles/image/quick-targets.cmake on the pinned llama.cpp: configured as the host CPU set's
builds configure it, the targets matrix.yaml names compile at -O1 and ggml and libllama at
Release's -O3; a target the pin lacks fails the configure, naming it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from fixtures.lab import REPO_ROOT, require_lab

from pipeline.matrix import load_matrix

HOOK = REPO_ROOT / "dockerfiles" / "image" / "quick-targets.cmake"


def configure(
    source: Path, build: Path, targets: tuple[str, ...]
) -> subprocess.CompletedProcess[str]:
    cmake = shutil.which("cmake")
    require_lab(cmake is not None, "cmake (the hook is exercised by the image builds too)")
    assert cmake is not None
    matrix = load_matrix()
    flags = dict(matrix.common_cmake_flags)
    flags.update(matrix.cpu_variant_set("host").cmake_flags["amd64"])
    # No TLS library needed to configure; the compile commands are the point.
    flags.update({"LLAMA_OPENSSL": "OFF", "CMAKE_EXPORT_COMPILE_COMMANDS": "ON"})
    return subprocess.run(
        [
            cmake,
            "-S",
            str(source),
            "-B",
            str(build),
            *(f"-D{key}={value}" for key, value in flags.items()),
            f"-DCMAKE_PROJECT_INCLUDE={HOOK}",
            f"-DQUICK_TARGETS={';'.join(targets)}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def last_optimization(command: str) -> str:
    levels = re.findall(r"(?:^|\s)(-O[0-3sgz]?)(?=\s)", command)
    assert levels, command
    return levels[-1]


def test_the_quick_targets_compile_at_o1_and_the_kernels_at_o3(
    pinned_snapshot: Path, tmp_path: Path
) -> None:
    targets = load_matrix().cpu_variant_set("host").quick_targets
    done = configure(pinned_snapshot / "vendor", tmp_path / "build", targets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"quick-targets: at -O1: {';'.join(targets)}" in done.stdout
    commands = json.loads((tmp_path / "build" / "compile_commands.json").read_text())
    levels: dict[str, set[str]] = {}  # CMake target -> the -O its objects compile at
    for entry in commands:
        target = re.search(r"CMakeFiles/([^/\s]+)\.dir/", entry["command"])
        assert target, entry["command"]
        levels.setdefault(target[1], set()).add(last_optimization(entry["command"]))
    for name in targets:
        assert levels[name] == {"-O1"}, (name, levels)
    kernels = [name for name in levels if name.startswith("ggml")]
    assert "ggml-cpu" in kernels and "ggml-base" in kernels, sorted(levels)
    for name in [*kernels, "llama"]:
        assert levels[name] == {"-O3"}, (name, levels)


def test_a_target_the_pin_lacks_fails_the_configure(pinned_snapshot: Path, tmp_path: Path) -> None:
    done = configure(pinned_snapshot / "vendor", tmp_path / "build", ("llama-common", "no-such"))
    assert done.returncode != 0
    assert "this llama.cpp has no target 'no-such'" in done.stderr
