"""Smoke: reports, bad input, and real runs of the built cpu image (and of broken images)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.images import SmokeImage
from fixtures.interrupt import sigint_as_from_a_terminal
from fixtures.lab import REPO_ROOT

from pipeline.cli import main
from pipeline.core.errors import ConfigError, RecordInvalidError, UsageError
from pipeline.core.project import Project
from pipeline.matrix import MATRIX_FILE, load_matrix, parse_matrix
from pipeline.modelfiles.gguf import generate_model, preset
from pipeline.oci.engine import RUN_PID_LABEL, ServerContainer, ServerExited
from pipeline.records import CheckResult, SmokeRecord, load_smoke_records
from pipeline.smoke import write_smoke_record
from pipeline.smoke.hubserver import HubServer
from pipeline.smoke.junit import junit_xml
from pipeline.smoke.settings import SETTINGS_FILE, load_settings

ALL_CHECKS = {
    "library-closure",
    "revision-label",
    "health",
    "backend-device",
    "models",
    "completion",
    "chat",
    "chat-stream",
    "embeddings",
    "tokenize-roundtrip",
    "metrics",
    "web-ui",
    "entrypoint-model",
    "entrypoint-port",
    "entrypoint-extra-args",
    "llama-arg-env",
    "non-root",
    "docker-healthcheck",
    "entrypoint-no-model",
    "entrypoint-version",
    "entrypoint-hf-repo",
    "healthcheck-port",
    "command-read-only-cache",
    "secret-file",
    "doctor",
    "router-mode",
}
# Checks added after tests/data/records-0.1.0 was written.
LATER_CHECKS = {
    "library-closure",
    "web-ui",
    "llama-arg-env",
    "router-mode",
    "healthcheck-port",
    "command-read-only-cache",
    "secret-file",
    "doctor",
}


def leftovers(pid: int | None = None) -> list[Any]:
    import docker

    client = docker.from_env()
    label = f"{RUN_PID_LABEL}={pid or os.getpid()}"
    # ignore_removed: a container removed between the list and its inspect is not a leftover.
    return list(client.containers.list(all=True, filters={"label": label}, ignore_removed=True))


def report_of(project: Project, arch: str = "amd64", backend: str = "cpu") -> dict[str, Any]:
    path = project.build_dir / "reports" / f"smoke-{backend}-{arch}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def checks_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


# ---------------------------------------------------------------------------- reports


def sample_report(passed: bool = False) -> SmokeRecord:
    checks = (
        CheckResult("health", True, 0.5, "healthy 0.50 s after start"),
        CheckResult(
            "completion", passed, 0.1, "" if passed else "tokens_predicted is 3, requested 8"
        ),
        CheckResult("docker-healthcheck", False, 0.0, "skipped: x", skipped=True),
    )
    return SmokeRecord(
        image="acme/llama-server:0.1.0-cpu-amd64",
        digest="sha256:" + "ab" * 32,
        backend="cpu",
        platform="linux/amd64",
        passed=passed,
        seconds=4.2,
        checks=checks,
        time_to_healthy=0.5,
        model="generated:tiny.gguf",
    )


def test_report_files_round_trip(project: Project, tmp_path: Path) -> None:
    report = sample_report()
    written = write_smoke_record(report, project, tmp_path / "ci")
    names = sorted(p.name for p in written)
    assert names == ["smoke-cpu-amd64.json", "smoke-cpu-amd64.json", "smoke-cpu-amd64.xml"]
    data = report_of(project)
    assert list(data)[:8] == [
        "schema",
        "image",
        "digest",
        "backend",
        "platform",
        "passed",
        "seconds",
        "checks",
    ]
    assert data["checks"][0] == {
        "name": "health",
        "passed": True,
        "seconds": 0.5,
        "detail": "healthy 0.50 s after start",
        "skipped": False,
        "figures": [],
    }
    (loaded,) = load_smoke_records(project.reports_dir)
    assert loaded == report
    assert loaded.failed == ["completion"]
    assert loaded.arch == "amd64"


def test_a_record_written_before_the_refactor_still_loads() -> None:
    """tests/data/records-0.1.0/smoke-cpu-amd64.json, as smoke wrote it before stages shared
    one records module: the loader reads it whole, and writes it back the same."""
    data = REPO_ROOT / "tests" / "data" / "records-0.1.0"
    (record,) = load_smoke_records(data)
    assert record.passed and record.platform == "linux/amd64" and record.digest
    assert {c.name for c in record.checks} == ALL_CHECKS - LATER_CHECKS
    # The tier and figures came later: an old record is the no-gpu tier's (the only one there
    # was), its checks measured nothing.
    assert record.tier == "no-gpu" and record.filename == "smoke-cpu-amd64.json"
    written = json.loads((data / record.filename).read_text()) | {"tier": "no-gpu"}
    written["checks"] = [check | {"figures": []} for check in written["checks"]]
    assert record.to_json() == written


def test_junit_xml_counts_failures_and_skips() -> None:
    root = ET.fromstring(junit_xml([sample_report(), sample_report(passed=True)]))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("6", "1", "2")
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "smoke cpu linux/amd64"
    failure = suite.find("testcase[@name='completion']/failure")
    assert failure is not None and "requested 8" in (failure.text or "")
    assert suite.find("testcase[@name='docker-healthcheck']/skipped") is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["digest"] == "sha256:" + "ab" * 32


def test_malformed_report_is_a_record_error(project: Project) -> None:
    reports = project.build_dir / "reports"
    reports.mkdir(parents=True)
    (reports / "smoke-cpu-amd64.json").write_text('{"schema": 1, "image": "x"}')
    with pytest.raises(RecordInvalidError, match="not a smoke report"):
        load_smoke_records(reports)
    (reports / "smoke-cpu-amd64.json").write_text("{")
    with pytest.raises(RecordInvalidError, match="cannot read smoke report"):
        load_smoke_records(reports)


# ---------------------------------------------------------------------------- bad input
# These fail before Docker is asked anything: the image named does not exist, so reaching a
# container would give exit code 8, not the code of the input error.

NO_IMAGE = "smoke-test/never-built:0"


def test_not_gguf_is_refused_before_any_container(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("I am a text file\n")
    assert main(["smoke", NO_IMAGE, "--model", str(fake)]) == 9
    line = capsys.readouterr().err.strip()
    assert "not a GGUF file" in line and "\n" not in line


def test_missing_model_path(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["smoke", NO_IMAGE, "--model", str(tmp_path / "nope.gguf")]) == 9
    assert "does not exist" in capsys.readouterr().err


def test_model_unreadable_by_the_container_user(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = generate_model(preset("tiny"), tmp_path / "m.gguf")
    model.chmod(0o600)
    assert main(["smoke", NO_IMAGE, "--model", str(model)]) == 9
    assert "chmod a+r" in capsys.readouterr().err


def test_hf_repo_not_found(
    project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        assert main(["smoke", NO_IMAGE, "--hf-repo", "acme/none", "--hf-file", "m.gguf"]) == 9


@pytest.mark.parametrize(
    "args",
    [
        ["--hf-file", "m.gguf"],
        ["--hf-repo", "acme/x"],
        ["--platform", "linux/s390x"],
        ["--model", "a.gguf", "--hf-repo", "acme/x", "--hf-file", "m.gguf"],
    ],
)
def test_usage_errors(project: Project, args: list[str]) -> None:
    assert main(["smoke", NO_IMAGE, *args]) == 2


def test_port_in_use(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["smoke", NO_IMAGE, "--port", str(port)]) == 8
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


# ---------------------------------------------------------------------------- real runs


@pytest.mark.docker
def test_image_not_found_says_how_to_build(
    project: Project, docker_engine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["smoke", NO_IMAGE]) == 8
    err = capsys.readouterr().err
    assert f"image {NO_IMAGE} not found locally" in err and "nox -s build" in err


@pytest.mark.docker
def test_no_build_report_says_run_build(
    project: Project, docker_engine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["smoke"]) == 14  # a missing record, whichever stage reads it
    assert "nox -s build" in capsys.readouterr().err


@pytest.mark.docker
def test_container_is_removed_when_the_body_raises(cpu_amd64: SmokeImage) -> None:
    import docker

    client = docker.from_env()
    with (
        pytest.raises(RuntimeError),
        ServerContainer(client, cpu_amd64.ref, command=["--version"], container_port=8080) as box,
    ):
        assert box.container.id
        raise RuntimeError("boom")
    assert leftovers() == []


@pytest.mark.docker
def test_cpu_image_passes(
    project: Project, cpu_amd64: SmokeImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default run: no IMAGE, the build report's cpu image for the host platform."""
    (project.build_dir / "reports").mkdir(parents=True)
    shutil.copy(cpu_amd64.report, project.build_dir / "reports" / cpu_amd64.report.name)
    code = main(["smoke", "--report", str(tmp_path / "ci")])
    output = capsys.readouterr()
    assert code == 0, output.err[-3000:]
    report = report_of(project)
    assert report["passed"] is True
    assert report["image"] == cpu_amd64.ref and report["digest"] == cpu_amd64.digest
    checks = checks_of(report)
    assert set(checks) == ALL_CHECKS
    assert all(c["passed"] for c in checks.values()), checks
    assert report["time_to_healthy"] < report["seconds"]
    xml = ET.parse(tmp_path / "ci" / "smoke-cpu-amd64.xml").getroot()
    assert (xml.get("tests"), xml.get("failures")) == (str(len(ALL_CHECKS)), "0")
    assert "docker run to the last check" in output.out
    assert leftovers() == []
    print(
        f"\nFIGURE amd64 smoke {report['seconds']:.1f} s, healthy {report['time_to_healthy']:.2f} s"
    )


@pytest.mark.docker
def test_hf_repo_model_is_downloaded_and_mounted(
    project: Project, cpu_amd64: SmokeImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = generate_model(preset("tiny", seed=3, n_embd=128), tmp_path / "src.gguf")
    with HubServer() as hub:
        commit = hub.add_file("acme/tiny", "tiny-q.gguf", model)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        args = ["--hf-repo", "acme/tiny", "--hf-file", "tiny-q.gguf", "--hf-revision", commit]
        assert main(["smoke", cpu_amd64.ref, *args]) == 0
    report = report_of(project)
    assert report["model"] == f"hf:acme/tiny/tiny-q.gguf@{commit}"
    assert "width 128" in checks_of(report)["embeddings"]["detail"]
    assert leftovers() == []


@pytest.mark.docker
@pytest.mark.slow
def test_vulkan_image_passes_on_lavapipe(project: Project, vulkan_amd64: SmokeImage) -> None:
    """No GPU here: the Vulkan backend must still be the one serving, on Mesa's lavapipe."""
    (project.build_dir / "reports").mkdir(parents=True)
    shutil.copy(vulkan_amd64.report, project.build_dir / "reports" / vulkan_amd64.report.name)
    assert main(["smoke", "--backend", "vulkan"]) == 0
    report = report_of(project, backend="vulkan")
    assert report["passed"] and report["image"] == vulkan_amd64.ref
    checks = checks_of(report)
    assert set(checks) == ALL_CHECKS
    device = checks["backend-device"]["detail"]
    assert "using device Vulkan0 (llvmpipe" in device and "layers to GPU" in device, device
    assert leftovers() == []
    print(f"\nFIGURE vulkan smoke {report['seconds']:.1f} s, healthy {report['time_to_healthy']} s")


@pytest.mark.docker
def test_cpu_image_smoked_as_vulkan_fails_on_its_device(
    project: Project, cpu_amd64: SmokeImage, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every request is answered, yet the backend named is not the one serving: a failure."""
    assert main(["smoke", cpu_amd64.ref, "--backend", "vulkan"]) == 8
    err = capsys.readouterr().err
    assert "backend-device" in err.splitlines()[-1]
    checks = checks_of(report_of(project, backend="vulkan"))
    assert not checks["backend-device"]["passed"]
    assert "never shows /using device Vulkan0" in checks["backend-device"]["detail"]
    assert checks["completion"]["passed"] and checks["health"]["passed"]
    assert leftovers() == []


def test_every_backend_carries_its_smoke_settings_in_the_matrix(tmp_path: Path) -> None:
    """Per-backend smoke facts live in matrix.yaml only: every backend has them, a broken one
    is a config error naming the key, and smoke.yaml keeps only timing and requests."""
    settings = load_settings()
    matrix = load_matrix()
    assert all(
        tier.device_log
        for backend in matrix.backends.values()
        for tier in backend.smoke.tiers.values()
    )
    # lavapipe's start-up shader compiles get a longer bound than the CPU kernels.
    assert matrix.backend("cpu").smoke.timing_scale == 1
    vulkan = settings.timing["native"].scaled(matrix.backend("vulkan").smoke.timing_scale)
    assert vulkan.healthy > settings.timing["native"].healthy
    assert vulkan.health_interval == settings.timing["native"].health_interval
    with pytest.raises(UsageError) as failure:
        matrix.backend("opencl")
    assert "unknown backend 'opencl'" in failure.value.line()
    data = yaml.safe_load(MATRIX_FILE.read_text())
    data["backends"]["cpu"]["smoke"]["tiers"]["no-gpu"]["device_log"] = ["unbalanced ("]
    with pytest.raises(ConfigError) as failure:
        parse_matrix(data)
    assert "backends.cpu.smoke.tiers.no-gpu: device_log /unbalanced (/ is not a regex" in (
        failure.value.line()
    )
    broken = tmp_path / "smoke.yaml"
    broken.write_text("timing: {native: {healthy: 1}}\n")
    with pytest.raises(ConfigError) as failure:
        load_settings(broken)
    # The one field reader's words: the file, the key, what was expected.
    assert "smoke.yaml: timing.native: missing key 'request'" in failure.value.line()
    # The RPC split asks the first factual questions: no more than there are.
    data = yaml.safe_load(SETTINGS_FILE.read_text())
    data["real"]["rpc"]["questions"] = len(data["real"]["factual"]["questions"]) + 1
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as failure:
        load_settings(broken)
    assert "real.rpc: questions is 8, but factual has 7" in failure.value.line()


@pytest.mark.docker
def test_server_that_exits_at_once(
    project: Project, broken_images: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    assert main(["smoke", broken_images["exits"]]) == 8
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 60
    assert "fatal: model load failed" in err  # the container's last log lines are shown
    assert "health" in err.splitlines()[-1]  # the failed check is named
    checks = checks_of(report_of(project))
    assert not checks["health"]["passed"]
    assert "exited with code 3" in checks["health"]["detail"]
    assert checks["completion"]["skipped"]
    assert leftovers() == []


@pytest.mark.docker
def test_an_image_that_lost_a_library_fails_its_closure_check(
    project: Project, broken_images: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from fixtures.images import LOST_LIBRARY

    assert main(["smoke", broken_images["lost-library"]]) == 8
    closure = checks_of(report_of(project))["library-closure"]
    assert not closure["passed"]
    assert f"needs {LOST_LIBRARY}" in closure["detail"] and "libggml-cpu" in closure["detail"]
    assert "library-closure" in capsys.readouterr().err
    assert leftovers() == []


@pytest.mark.docker
def test_port_of_an_exited_container_is_a_server_exit(broken_images: dict[str, str]) -> None:
    """A server that dies before Docker's port mapping is read: no KeyError, a clear exit."""
    import docker

    with ServerContainer(docker.from_env(), broken_images["exits"], container_port=8080) as box:
        assert box.wait_exit(30) == 3
        with pytest.raises(ServerExited, match="exited with code 3"):
            _ = box.base_url
    assert leftovers() == []


@pytest.mark.docker
def test_endpoint_never_healthy_times_out(project: Project, broken_images: dict[str, str]) -> None:
    started = time.perf_counter()
    assert main(["smoke", broken_images["sleeps"], "--timeout", "3"]) == 8
    assert time.perf_counter() - started < 60
    health = checks_of(report_of(project))["health"]
    assert "within 3 s" in health["detail"]
    assert leftovers() == []


@pytest.mark.docker
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_the_container(
    project: Project, broken_images: dict[str, str], sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "smoke", broken_images["sleeps"], "--timeout", "120"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 60
        while not leftovers(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "no container appeared"
            time.sleep(0.2)
        time.sleep(0.5)  # inside the wait for /health
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert leftovers(proc.pid) == []


@pytest.mark.docker
@pytest.mark.slow
def test_cpu_arm64_image_passes_under_qemu(project: Project, cpu_arm64: SmokeImage) -> None:
    assert main(["smoke", cpu_arm64.ref, "--platform", "linux/arm64"]) == 0
    report = report_of(project, "arm64")
    assert report["platform"] == "linux/arm64" and report["passed"]
    assert set(checks_of(report)) == ALL_CHECKS
    assert leftovers() == []
    print(
        f"\nFIGURE arm64 smoke {report['seconds']:.1f} s, healthy {report['time_to_healthy']:.2f} s"
    )


@pytest.mark.docker
def test_a_digest_the_registry_lacks_is_one_line(
    project: Project, lab_registry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"{lab_registry.host}/none/llama-server@sha256:{'1' * 64}"
    assert main(["smoke", missing]) == 8
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot pull {missing} for linux/amd64") and "\n" not in err


def test_the_record_line_names_a_start_only_where_one_server_started(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The cpus tier starts a server per CPU model: its record has no one start to name, and a
    passed run must not read "healthy after never"; a failed run without one says so."""
    from pipeline.records import CheckResult, SmokeRecord
    from pipeline.smoke.junit import print_record

    record = SmokeRecord(
        image="x",
        digest=None,
        backend="cpu",
        platform="linux/amd64",
        passed=True,
        seconds=370.0,
        checks=(CheckResult("cpu Haswell", True, 139.0),),
        tier="cpus",
    )
    lines = []
    for changes in ({}, {"passed": False}, {"time_to_healthy": 1.5}):
        print_record(record.__class__(**{**record.__dict__, **changes}))
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert "healthy" not in lines[0] and "never" not in lines[0], lines[0]
    assert lines[1].endswith("; never healthy"), lines[1]
    assert lines[2].endswith("; healthy after 1.50 s"), lines[2]
