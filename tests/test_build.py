"""`nox -s build`: planning, the buildx command line, the reports, failure paths, and real cpu
images built from the pinned snapshot (amd64 natively, arm64 cross-compiled with QEMU off)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.lab import (
    PINNED_COMMIT,
    REPO_ROOT,
    TEST_CPU_VARIANTS,
    build_lock,
    copy_project,
    require_lab,
)

from pipeline.build import build
from pipeline.build.command import BuildCommand, Source, cache_spec
from pipeline.build.options import BuildOptions, resolve_build
from pipeline.build.plan import check_builder_platforms, plan_jobs
from pipeline.cli import build_parser, main
from pipeline.core.errors import (
    BuildError,
    PipelineError,
    RecordInvalidError,
    RecordMissingError,
    UsageError,
)
from pipeline.core.project import Project
from pipeline.core.version import load_version
from pipeline.matrix import configure_flags, host_platform, load_matrix
from pipeline.modelfiles.gguf import generate_model, preset
from pipeline.oci.buildx import BuilderInfo
from pipeline.oci.image import MANIFEST_ACCEPT
from pipeline.records import (
    BuildRecord,
    find_build_record,
    load_build_records,
    write_record,
)
from pipeline.records.snapshot import check_snapshot
from pipeline.smoke.hubserver import HubServer

MATRIX = load_matrix()
VERSION = load_version(REPO_ROOT / "version.json")
ENTRYPOINT = REPO_ROOT / "dockerfiles" / "image" / "entrypoint.sh"
QEMU_AARCH64 = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")


def request(
    *platforms: str,
    project: Project | None = None,
    backends: tuple[str, ...] = ("cpu",),
    **kwargs: Any,
) -> BuildOptions:
    root = project or Project(REPO_ROOT)
    return BuildOptions.named(root, platforms=platforms, backends=backends, matrix=MATRIX, **kwargs)


# ------------------------------------------------------------------------ planning


def test_load_builds_one_local_image_per_platform() -> None:
    jobs = plan_jobs(request("amd64", "arm64"))
    assert [(j.key, j.output, j.tags) for j in jobs] == [
        ("cpu-amd64", "load", (f"{VERSION.image}:{VERSION.version}-cpu-amd64",)),
        ("cpu-arm64", "load", (f"{VERSION.image}:{VERSION.version}-cpu-arm64",)),
    ]
    assert jobs[0].repository == VERSION.image
    assert jobs[0].cpu_variants.name == "all"


def test_push_is_one_multi_platform_image_and_push_by_digest_one_per_platform() -> None:
    (push,) = plan_jobs(request("amd64", "arm64", output="push"))
    assert [p.name for p in push.platforms] == ["linux/amd64", "linux/arm64"]
    assert push.tags == (f"{VERSION.image}:{VERSION.version}-cpu",)
    by_digest = plan_jobs(
        request("amd64", "arm64", output="push-by-digest", tags=("127.0.0.1:5000/t/llama",))
    )
    assert [(j.key, j.repository) for j in by_digest] == [
        ("cpu-amd64", "127.0.0.1:5000/t/llama"),
        ("cpu-arm64", "127.0.0.1:5000/t/llama"),
    ]


def test_usage_errors_come_before_any_work(tmp_path: Path) -> None:
    # Each request is made inside the check: a name the matrix lacks fails as options resolve.
    cases: list[tuple[dict[str, Any], str]] = [
        ({"platforms": ("amd64", "arm64"), "tags": ("dev",)}, "--tag with --load names one image"),
        ({"output": "push-by-digest", "tags": ("r/x:1",)}, "pushes no tag"),
        ({"platforms": ("amd64", "arm64"), "backends": ("cpu", "rocm")}, "not built for"),
        (
            {"platforms": ("arm64",), "backends": ("rocm",)},
            "'rocm' is not built for linux/arm64",
        ),
        ({"cpu_variants": "fast"}, "unknown CPU variant set 'fast'"),
        (
            {"backends": ("cpu", "vulkan"), "output": "oci", "oci_path": tmp_path / "x.tar"},
            "need a directory",
        ),
    ]
    for kwargs, message in cases:
        platforms = kwargs.pop("platforms", ("amd64",))
        with pytest.raises(UsageError) as err:
            plan_jobs(request(*platforms, **kwargs))
        assert message in err.value.line()


def test_a_host_only_build_is_tagged_as_such_and_stays_on_this_machine() -> None:
    host = MATRIX.platform(host_platform()).arch
    (job,) = plan_jobs(request(host, cpu_variants="host"))
    assert job.host_only and job.tags == (f"{VERSION.image}:{VERSION.version}-cpu-{host}-host",)
    other = "arm64" if host == "amd64" else "amd64"
    refused = [
        (request(other, cpu_variants="host"), "compiles for this machine's CPU, which cannot run"),
        (request(host, cpu_variants="host", output="push-by-digest"), "not a release build"),
    ]
    for req, message in refused:
        with pytest.raises(UsageError, match=message):
            plan_jobs(req)


def test_a_local_load_defaults_to_this_machines_kernels_and_a_push_to_every_variant() -> None:
    def resolved(*argv: str) -> BuildOptions:
        return resolve_build(build_parser(["build"]).parse_args(["build", *argv]))

    assert MATRIX.local_cpu_variants == "host"
    assert resolved().cpu_variants == MATRIX.cpu_variant_set("host")
    assert resolved("--cpu-variants", "all").cpu_variants == MATRIX.cpu_variant_set("all")
    pushed = resolved("--push-by-digest", "--tag", "127.0.0.1:5000/t/llama")
    assert pushed.cpu_variants is None  # the backend's own: all
    (job,) = plan_jobs(pushed)
    assert job.cpu_variants.name == "all" and not job.host_only


def test_cli_rejects_unknown_names_with_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "mips64"]) == 2
    assert "valid platforms: linux/amd64 (amd64), linux/arm64 (arm64)" in capsys.readouterr().err
    assert main(["build", "--backend", "cpu,metal"]) == 2
    assert "valid backends: cpu, vulkan, cuda, cuda13, rocm" in capsys.readouterr().err
    assert main(["build", "--load", "--push"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_buildx_command_line() -> None:
    project = Project(REPO_ROOT)
    req = request("arm64", cache_from=("ghcr.io/acme/cache:cpu",), cache_to=("/tmp/cache",))
    (job,) = plan_jobs(req)
    source = Source(PINNED_COMMIT, 1790820708, 6500)
    dockerfile = project.rendered_dockerfile("cpu")
    args = BuildCommand(req, job, source, dockerfile).image(Path("/tmp/meta.json"))
    assert args[:3] == ["docker", "buildx", "build"]
    joined = " ".join(args)
    assert f"--file {REPO_ROOT}/dockerfiles/rendered/cpu.Dockerfile" in joined
    assert f"--build-context support={REPO_ROOT}/dockerfiles/image" in joined
    assert "--platform linux/arm64" in joined
    for arg in (
        f"LLAMA_CPP_COMMIT={PINNED_COMMIT}",
        "LLAMA_CPP_BUILD_NUMBER=6500",
        "IMAGE_CREATED=2026-10-01T02:11:48Z",
        "SOURCE_DATE_EPOCH=1790820708",
        "CPU_VARIANTS=all",
        f"IMAGE_VERSION={VERSION.version}",
    ):
        assert f"--build-arg {arg}" in joined
    assert "--provenance=false" in args
    assert "--cache-from type=registry,ref=ghcr.io/acme/cache:cpu" in joined
    assert "--cache-to type=local,dest=/tmp/cache,mode=max" in joined
    assert args[-2:] == ["--load", str(REPO_ROOT / "third_party" / "llama.cpp")]


def test_cache_specs() -> None:
    assert cache_spec("./cache", export=False) == "type=local,src=cache"
    assert (
        cache_spec("reg.example/c:1", export=True) == "type=registry,ref=reg.example/c:1,mode=max"
    )
    assert cache_spec("type=gha,scope=cpu", export=True) == "type=gha,scope=cpu"


def test_only_backends_that_run_target_code_need_an_emulator() -> None:
    amd64_only = BuilderInfo("default", "docker", ("linux/amd64", "linux/amd64/v2", "linux/386"))
    cpu_arm64 = plan_jobs(request("arm64"))
    check_builder_platforms(amd64_only, cpu_arm64)  # cross-compiled, FROM scratch: fine
    check_builder_platforms(amd64_only, plan_jobs(request("arm64", backends=("vulkan",))))
    cuda_arm64 = plan_jobs(request("arm64", backends=("cuda",)))  # nvcc runs on the target
    with pytest.raises(BuildError) as err:
        check_builder_platforms(amd64_only, cuda_arm64)
    line = err.value.line()
    assert "cannot run linux/arm64 code, which the cuda image needs" in line
    assert "update-binfmts --enable qemu-aarch64" in line
    assert "docker buildx create --append" in line
    check_builder_platforms(
        BuilderInfo("multi", "remote", ("linux/amd64", "linux/arm64")), cuda_arm64
    )


# ------------------------------------------------------------------------ reports


def result(**changes: object) -> BuildRecord:
    fields: dict[str, object] = {
        "backend": "cpu",
        "platform": "linux/arm64",
        "image": "docker.io/acme/llama-server",
        "ref": "docker.io/acme/llama-server:0.1.0-cpu-arm64",
        "digest": "sha256:" + "a" * 64,
        "output": "load",
        "commit": PINNED_COMMIT,
        "version": "0.1.0",
        "size_bytes": 41_000_000,
        "seconds": 512.3,
        "cpu_variants": "baseline",
    }
    fields.update(changes)
    return BuildRecord(**fields)  # type: ignore[arg-type]


def test_reports_round_trip_in_the_agreed_schema(tmp_path: Path) -> None:
    reports = Project(tmp_path).reports_dir
    path = write_record(reports, result())
    assert path == tmp_path / "build" / "reports" / "build-cpu-arm64.json"
    data = json.loads(path.read_text())
    assert list(data)[:11] == [
        "schema",
        "backend",
        "platform",
        "image",
        "ref",
        "digest",
        "output",
        "commit",
        "version",
        "size_bytes",
        "seconds",
    ]
    assert data["schema"] == 1
    write_record(reports, result(platform="linux/amd64", size_bytes=None))
    records = load_build_records(reports)
    assert records == [result(platform="linux/amd64", size_bytes=None), result()]
    assert find_build_record(records, "cpu", "linux/arm64", reports) == result()
    with pytest.raises(RecordMissingError) as err:
        find_build_record(records, "vulkan", "linux/arm64", reports)
    assert "run: nox -s build -- arm64 --backend vulkan" in err.value.line()
    path.write_text(json.dumps({**data, "digest": 42}))
    with pytest.raises(RecordInvalidError) as err:
        load_build_records(reports)
    assert "build-cpu-arm64.json: key 'digest'" in err.value.line()


def test_a_record_written_before_the_refactor_still_loads() -> None:
    """tests/data/records-0.1.0: reports as the pipeline wrote them before stages shared one
    records module; the loaders read them unchanged."""
    data = REPO_ROOT / "tests" / "data" / "records-0.1.0"
    (record,) = load_build_records(data)
    assert (record.backend, record.platform, record.output) == ("cpu", "linux/amd64", "load")
    assert record.digest.startswith("sha256:") and record.commit == PINNED_COMMIT
    # Read whole; written back, it only gains the keys added since, at their defaults.
    # Fields added since are their defaults.
    added = {"sbom": None, "gpu_architectures": None}
    assert record.to_json() == json.loads((data / record.filename).read_text()) | added


# ------------------------------------------------------------------------ failure paths


@pytest.fixture
def bare_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout with no snapshot: version.json and the templates only."""
    shutil.copy(REPO_ROOT / "version.json", tmp_path / "version.json")
    shutil.copytree(REPO_ROOT / "dockerfiles", tmp_path / "dockerfiles")
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    return tmp_path


def test_missing_snapshot_fails_before_docker(
    bare_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", "amd64"]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "snapshot.json is missing" in err and "nox -s sync" in err
    # The rendered Dockerfile is committed, so it can be read even when the build cannot run.
    assert (bare_project / "dockerfiles" / "rendered" / "cpu.Dockerfile").is_file()


def test_a_stale_rendered_dockerfile_is_refused_before_docker(
    lab_project: Project,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A template edited without `nox -s render`: build says so, and builds nothing."""
    root = copy_project(tmp_path / "project")
    (root / "third_party").symlink_to(lab_project.third_party.parent)
    template = root / "dockerfiles" / "templates" / "base.Dockerfile.j2"
    template.write_text(template.read_text() + "# an edit nobody rendered\n")
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")  # never reached
    assert main(["build", "amd64"]) == 3
    err = capsys.readouterr().err
    assert "dockerfiles/rendered/cpu.Dockerfile is not what the templates render now" in err
    assert "nox -s render" in err and err.count("\n") == 1


def test_no_engine_is_one_clear_line(
    lab_project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    monkeypatch.setenv("PIPELINE_ROOT", str(lab_project.root))
    assert main(["build", "amd64"]) == 13
    err = capsys.readouterr().err
    assert err.startswith("error: no Docker engine answers at unix:///nonexistent/docker.sock")
    assert "start dockerd" in err


@pytest.mark.docker
@pytest.mark.slow
def test_commit_mismatch_stops_the_build(docker_engine: None, lab_project: Project) -> None:
    other = "1" * 40
    req = request(
        "amd64", project=lab_project, build_args=(("LLAMA_CPP_COMMIT", other),), quiet=True
    )
    with build_lock(), pytest.raises(BuildError) as err:
        build(req, check_snapshot(lab_project))
    line = err.value.line()
    assert f"snapshot.json is llama.cpp {PINNED_COMMIT} but LLAMA_CPP_COMMIT is {other}" in line
    assert "full log:" in line


# ------------------------------------------------------------------------ the entrypoint


@pytest.fixture
def fake_server(tmp_path: Path) -> Path:
    """A stand-in executable for llama-server that records its argv and HF_TOKEN's presence,
    with the real entrypoint copied beside it (where it looks for llama-server)."""
    shutil.copy(ENTRYPOINT, tmp_path / "entrypoint.sh")
    script = tmp_path / "llama-server"
    script.write_text(
        '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$0.args"\n'
        'printf "%s" "${HF_TOKEN:-}" > "$0.token"\nenv > "$0.env"\n'
    )
    script.chmod(0o755)
    return script


def run_entrypoint(
    server: Path, env: dict[str, str], *args: str, shell: str = "/bin/sh"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*shell.split(), str(server.parent / "entrypoint.sh"), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=False,
    )


def shells() -> list[str]:
    found = ["/bin/sh"]
    if busybox := shutil.which("busybox"):
        found.append(busybox + " sh")
    return found


@pytest.mark.parametrize("shell", shells())
def test_entrypoint_assembles_the_command_line(
    fake_server: Path, shell: str, tmp_path: Path
) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    env = {
        "LLAMA_MODEL": str(model),
        "LLAMA_SERVER_PORT": "9090",
        "LLAMA_SERVER_EXTRA_ARGS": "--ctx-size 512  --alias 'x*'",
    }
    done = run_entrypoint(fake_server, env, "--threads", "2", shell=shell)
    assert done.returncode == 0, done.stderr
    argv = Path(f"{fake_server}.args").read_text().splitlines()
    assert argv == [
        "--host",
        "0.0.0.0",
        "--port",
        "9090",
        "--model",
        str(model),
        "--metrics",
        "--ctx-size",
        "512",
        "--alias",
        "'x*'",
        "--threads",
        "2",
    ]


def test_entrypoint_runs_the_router_on_a_models_dir(fake_server: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "split-model").mkdir(parents=True)
    empty = run_entrypoint(fake_server, {"LLAMA_MODELS_DIR": str(models)})
    assert empty.returncode == 64
    assert empty.stderr.strip() == (
        f"llama-server image: LLAMA_MODELS_DIR={models} has no .gguf files; put models there "
        "(one file each, or a directory per model)"
    )
    (models / "split-model" / "m-00001-of-00002.gguf").write_bytes(b"GGUF")
    done = run_entrypoint(fake_server, {"LLAMA_MODELS_DIR": str(models)})
    assert done.returncode == 0, done.stderr
    argv = Path(f"{fake_server}.args").read_text().split()
    assert argv == ["--host", "0.0.0.0", "--port", "8080", "--models-dir", str(models), "--metrics"]


def test_entrypoint_passes_the_token_by_environment_only(fake_server: Path) -> None:
    env = {
        "LLAMA_HF_REPO": "acme/tiny-GGUF",
        "LLAMA_HF_FILE": "tiny.gguf",
        "LLAMA_HF_TOKEN": "hf_s3cret",
        "LLAMA_HF_REVISION": "main",
    }
    done = run_entrypoint(fake_server, env)
    assert done.returncode == 0, done.stderr
    argv = Path(f"{fake_server}.args").read_text()
    assert argv.split() == [
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--hf-repo",
        "acme/tiny-GGUF",
        "--hf-file",
        "tiny.gguf",
        "--metrics",
    ]
    assert "hf_s3cret" not in argv
    assert Path(f"{fake_server}.token").read_text() == "hf_s3cret"
    assert "LLAMA_HF_TOKEN" not in Path(f"{fake_server}.env").read_text()


def test_a_revision_with_a_slash_is_one_url_segment(fake_server: Path, tmp_path: Path) -> None:
    """LLAMA_HF_REVISION=refs/pr/1 (a pull request's files on the Hub): sent as refs%2Fpr%2F1,
    as the Hub's own clients send it, and the cached file's name has no `/` in it. The local
    Hub answers the entrypoint's check; the URL reaches llama-server by its variable."""
    model = generate_model(preset("tiny"), tmp_path / "m.gguf")
    with HubServer() as hub:
        hub.add_file("acme/tiny", "tiny.gguf", model, branch="refs/pr/1")
        env = {
            "LLAMA_HF_REPO": "acme/tiny",
            "LLAMA_HF_FILE": "tiny.gguf",
            "LLAMA_HF_REVISION": "refs/pr/1",
            "HF_ENDPOINT": hub.url,
            "LLAMA_CACHE": str(tmp_path / "cache"),
        }
        done = run_entrypoint(fake_server, env)
        checked = [(r.path, r.status) for r in hub.requests]
    assert done.returncode == 0, done.stderr
    assert checked == [("/acme/tiny/resolve/refs%2Fpr%2F1/tiny.gguf", 200)]
    argv = Path(f"{fake_server}.args").read_text().split()
    assert argv[argv.index("--model") + 1] == f"{tmp_path}/cache/acme_tiny_refs%2Fpr%2F1_tiny.gguf"
    url = f"LLAMA_ARG_MODEL_URL={hub.url}/acme/tiny/resolve/refs%2Fpr%2F1/tiny.gguf"
    assert url in Path(f"{fake_server}.env").read_text().splitlines()


def test_a_mirrors_password_is_on_no_command_line(fake_server: Path, tmp_path: Path) -> None:
    """MODEL_ENDPOINT with a user:password (a mirror's basic auth), from MODEL_ENDPOINT_FILE:
    not in the arguments, not checked with a command-line tool (wget would show it in `ps`);
    llama-server gets it in its own variables only."""
    secret = tmp_path / "endpoint"
    secret.write_text("http://mirror-user:s3cret@127.0.0.1:9/\n")
    env = {
        "LLAMA_HF_REPO": "acme/tiny",
        "LLAMA_HF_FILE": "tiny.gguf",
        "LLAMA_HF_REVISION": "v1",
        "MODEL_ENDPOINT_FILE": str(secret),
        "LLAMA_CACHE": str(tmp_path / "cache"),
    }
    done = run_entrypoint(fake_server, env)
    assert done.returncode == 0 and "s3cret" not in done.stderr, done.stderr
    assert "s3cret" not in Path(f"{fake_server}.args").read_text()
    seen = Path(f"{fake_server}.env").read_text().splitlines()
    assert "MODEL_ENDPOINT=http://mirror-user:s3cret@127.0.0.1:9/" in seen
    assert not any(line.startswith("MODEL_ENDPOINT_FILE=") for line in seen)


def test_entrypoint_refuses_what_llama_server_cannot_do(fake_server: Path, tmp_path: Path) -> None:
    cases = [
        ({}, "no model: set LLAMA_MODEL=/models/<file>.gguf"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_HF_REVISION": "v1"}, "v1 needs LLAMA_HF_FILE"),
        ({"LLAMA_HF_REPO": "a/b:Q4", "LLAMA_HF_REVISION": "v1"}, "a :quant tag does not go"),
        ({"LLAMA_HF_FILE": "x.gguf"}, "LLAMA_HF_FILE is set without LLAMA_HF_REPO"),
        ({"LLAMA_MODEL": "/nope.gguf", "LLAMA_HF_REPO": "a/b"}, "both set"),
        ({"LLAMA_MODEL": str(tmp_path / "absent.gguf")}, "no such file in the container"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_SERVER_PORT": "80a"}, "is not a port number"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_SERVER_PORT": "99999"}, "99999 is not a port number"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_ARG_PORT": "0"}, "LLAMA_ARG_PORT=0 is not a port"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_SERVER_EXTRA_ARGS": "--port 70000"}, "--port=70000"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_ARG_PORT": "1", "LLAMA_SERVER_PORT": "2"}, "both set"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_ARG_HOST": "a", "LLAMA_SERVER_HOST": "b"}, "both set"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_METRICS": "yes"}, "LLAMA_METRICS=yes: 1 serves"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_HF_TOKEN_FILE": "/absent"}, "no readable file"),
        ({"LLAMA_MODELS_DIR": str(tmp_path), "LLAMA_HF_REPO": "a/b"}, "serves every model"),
        ({"LLAMA_MODELS_DIR": str(tmp_path / "absent")}, "no such directory in the container"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_HF_FILE": "f", "LLAMA_HF_REVISION": "../x"}, "not a rev"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_HF_FILE": "f", "LLAMA_HF_REVISION": "a b"}, "not a rev"),
        ({"LLAMA_HF_REPO": "a/b", "LLAMA_HF_FILE": "f", "LLAMA_HF_REVISION": "-v"}, "not a rev"),
    ]
    for env, message in cases:
        done = run_entrypoint(fake_server, env)
        assert done.returncode == 64, (env, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, (env, done.stderr)
        assert not Path(f"{fake_server}.args").exists()


def test_entrypoint_lets_informational_and_explicit_model_options_through(
    fake_server: Path,
) -> None:
    assert run_entrypoint(fake_server, {}, "--version").returncode == 0
    assert Path(f"{fake_server}.args").read_text().split() == ["--version"]
    assert run_entrypoint(fake_server, {}, "-m", "/models/x.gguf").returncode == 0
    assert run_entrypoint(fake_server, {"LLAMA_ARG_HF_REPO": "a/b"}).returncode == 0
    assert run_entrypoint(fake_server, {}, "--models-dir", "/models").returncode == 0


def test_entrypoint_leaves_llama_arg_host_and_port_to_llama_server(fake_server: Path) -> None:
    env = {"LLAMA_HF_REPO": "a/b", "LLAMA_ARG_PORT": "9191", "LLAMA_ARG_HOST": "127.0.0.1"}
    done = run_entrypoint(fake_server, env, "--threads", "2")
    assert done.returncode == 0, done.stderr
    # No --host/--port of the entrypoint's: they would override what llama-server reads.
    argv = Path(f"{fake_server}.args").read_text().split()
    assert argv == ["--hf-repo", "a/b", "--metrics", "--threads", "2"]
    assert "LLAMA_ARG_PORT=9191" in Path(f"{fake_server}.env").read_text()
    off = run_entrypoint(fake_server, {"LLAMA_HF_REPO": "a/b", "LLAMA_METRICS": "0"})
    assert off.returncode == 0 and "--metrics" not in Path(f"{fake_server}.args").read_text()


def test_entrypoint_reads_secrets_from_files(fake_server: Path, tmp_path: Path) -> None:
    token, key = tmp_path / "hf-token", tmp_path / "api-key"
    token.write_text("hf_fromfile\n")
    key.write_text("sk-fromfile")
    env = {
        "LLAMA_HF_REPO": "a/b",
        "LLAMA_HF_TOKEN_FILE": str(token),
        "LLAMA_API_KEY_FILE": str(key),
    }
    done = run_entrypoint(fake_server, env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert Path(f"{fake_server}.token").read_text() == "hf_fromfile"
    seen = Path(f"{fake_server}.env").read_text().splitlines()
    assert "LLAMA_API_KEY=sk-fromfile" in seen
    assert not any(line.startswith(("LLAMA_HF_TOKEN", "LLAMA_API_KEY_FILE")) for line in seen)
    argv = Path(f"{fake_server}.args").read_text()
    assert "fromfile" not in argv
    both = run_entrypoint(fake_server, {**env, "LLAMA_API_KEY": "x"})
    assert both.returncode == 64
    assert "LLAMA_API_KEY and LLAMA_API_KEY_FILE are both set" in both.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    done = run_entrypoint(fake_server, {"LLAMA_HF_REPO": "a/b", "LLAMA_HF_TOKEN_FILE": str(empty)})
    assert done.returncode == 64 and "is empty" in done.stderr


@pytest.mark.parametrize("shell", shells())
def test_a_command_that_is_not_an_option_runs_instead_of_the_server(
    fake_server: Path, shell: str
) -> None:
    done = run_entrypoint(fake_server, {}, "echo", "hello", "--port", "1", shell=shell)
    assert done.returncode == 0 and done.stdout == "hello --port 1\n", done.stderr
    assert not Path(f"{fake_server}.args").exists()
    failed = run_entrypoint(fake_server, {}, "sh", "-c", "exit 3", shell=shell)
    assert failed.returncode == 3


LIST_DEVICES = (
    "load_backend: loaded CPU backend from /app/libggml-cpu-haswell.so\n"
    "load_backend: loaded Vulkan backend from /app/libggml-vulkan.so\n"
    "Available devices:\n"
    "  Vulkan0: llvmpipe (LLVM 19.1.7, 256 bits) (15990 MiB, 15990 MiB free)\n"
)


@pytest.fixture
def doctor_server(tmp_path: Path) -> Path:
    """A stand-in llama-server whose --list-devices prints what a Vulkan image's would."""
    shutil.copy(ENTRYPOINT, tmp_path / "entrypoint.sh")
    script = tmp_path / "llama-server"
    script.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{LIST_DEVICES}EOF\n")
    script.chmod(0o755)
    for module in ("base", "cpu-haswell", "cpu-skylakex", "vulkan"):
        (tmp_path / f"libggml-{module}.so").write_bytes(b"")
    return script


def test_doctor_says_what_the_container_sees(doctor_server: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    done = run_entrypoint(doctor_server, {}, "doctor", "--model", str(model))
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["backends"] == "cpu-haswell, cpu-skylakex, vulkan"
    # The variant the loader took (its -v line), of those the image carries.
    assert lines["cpu kernels"].startswith("haswell (of haswell skylakex: the best variant")
    assert lines["devices"].startswith("Vulkan0: llvmpipe")
    assert lines["model"].startswith("weights 1004 bytes (KV cache not estimated")
    assert lines["model"].endswith("fits") and lines["verdict"] == "ok"
    # JSON, for scripts; a model that is not GGUF is a problem: exit 1.
    (tmp_path / "x.bin").write_bytes(b"nope")
    done = run_entrypoint(doctor_server, {}, "doctor", "--json", f"--model={tmp_path}/x.bin")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["problems"] == "not-gguf"
    assert report["cpu_kernels"] == "haswell skylakex" and report["memory_bytes"] > 0
    assert report["cpu_variant"] == "haswell" and report["kv_cache_bytes"] is None
    # A CUDA image without a GPU: doctor says so and fails, as the server would.
    cuda = {**CUDA13_ENV}
    done = run_entrypoint(doctor_server, cuda, "doctor", "--json")
    if not Path("/dev/nvidiactl").exists():
        assert done.returncode == 1 and json.loads(done.stdout)["problems"] == "no-gpu"
    bad = run_entrypoint(doctor_server, {}, "doctor", "--bogus")
    assert bad.returncode == 64 and "doctor: unknown option --bogus" in bad.stderr
    bad = run_entrypoint(doctor_server, {}, "doctor", "--ctx-size", "4k")
    assert bad.returncode == 64 and "--ctx-size 4k is not a number of tokens" in bad.stderr


@pytest.mark.parametrize("shell", shells())
def test_doctor_estimates_the_kv_cache_from_the_models_metadata(
    doctor_server: Path, tmp_path: Path, shell: str
) -> None:
    """Weights + KV cache (f16 K and V, every layer, every token of the context) against the
    memory: the attention shape read from the GGUF's metadata (a per-layer head_count_kv array
    summed), at --ctx-size or else the model's own context. tests/test_real.py checks the
    figure against what llama-server allocates for the real model."""
    model = generate_model(preset("tiny", n_embd=128, n_head=4, n_head_kv=2), tmp_path / "m.gguf")
    weights = model.stat().st_size
    per_token = 2 * 2 * 2 * (128 // 4) * 2  # layers x kv heads x (K + V) x head dim x f16
    done = run_entrypoint(doctor_server, {}, "doctor", "--json", "--model", str(model), shell=shell)
    report = json.loads(done.stdout)
    assert report["kv_cache_bytes"] == 2048 * per_token, report  # the model's own context
    done = run_entrypoint(doctor_server, {}, "doctor", "-m", str(model), "-c", "100", shell=shell)
    assert done.returncode == 0, done.stderr
    verdict = f"weights {weights} + KV cache {100 * per_token} (ctx 100, f16) = "
    assert verdict + f"{weights + 100 * per_token} bytes <= memory" in done.stdout
    # A context too large for the memory: the weights alone fit, the cache does not.
    huge = run_entrypoint(doctor_server, {}, "doctor", "--model", str(model), "--ctx-size=99999999")
    assert (
        huge.returncode == 1 and "does not fit" in huge.stdout and "model-too-large" in huge.stdout
    )


CUDA13_ENV = {
    "LLAMA_GPU_BACKEND": "cuda",
    "LLAMA_CUDA_VERSION": "13.0",
    "LLAMA_CUDA_MIN_DRIVER": "580.65.06",
    "LLAMA_CUDA_INSTEAD": "cuda",
    "LLAMA_HF_REPO": "a/b",
}


@pytest.mark.skipif(
    Path("/dev/nvidiactl").exists(), reason="this machine shows an NVIDIA GPU: nothing to refuse"
)
@pytest.mark.parametrize("shell", shells())
def test_a_cuda_entrypoint_without_a_gpu_refuses_unless_cpu_is_allowed(
    fake_server: Path, shell: str
) -> None:
    """The image's env (matrix.yaml's cuda facts) on a machine without an NVIDIA GPU: one line
    naming --gpus all and the toolkit, or, with LLAMA_ALLOW_CPU=1, a warning and the server."""
    refused = run_entrypoint(fake_server, CUDA13_ENV, shell=shell)
    assert refused.returncode == 64, refused.stderr
    assert refused.stderr.count("\n") == 1
    for needed in ("no NVIDIA GPU is visible", "--gpus all", "NVIDIA Container Toolkit"):
        assert needed in refused.stderr
    assert not Path(f"{fake_server}.args").exists()
    allowed = run_entrypoint(fake_server, {**CUDA13_ENV, "LLAMA_ALLOW_CPU": "1"}, shell=shell)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: no NVIDIA GPU is visible; LLAMA_ALLOW_CPU=1" in allowed.stderr
    assert "--hf-repo" in Path(f"{fake_server}.args").read_text()
    # Without the CUDA facts (the cpu image) nothing is checked.
    assert run_entrypoint(fake_server, {"LLAMA_HF_REPO": "a/b"}, shell=shell).returncode == 0


@pytest.mark.skipif(Path("/dev/kfd").exists(), reason="this machine shows an AMD GPU (/dev/kfd)")
@pytest.mark.parametrize("shell", shells())
def test_a_rocm_entrypoint_without_a_gpu_refuses_unless_cpu_is_allowed(
    fake_server: Path, shell: str
) -> None:
    """A ROCm image's env (LLAMA_GPU_BACKEND=rocm) where no /dev/kfd is: one line naming the
    devices to give (AMD's docker convention), or, with LLAMA_ALLOW_CPU=1, a warning and the
    server. (The group check, /dev/kfd present but not the user's: tests/test_rocm.py.)"""
    env = {"LLAMA_GPU_BACKEND": "rocm", "LLAMA_HF_REPO": "a/b"}
    refused = run_entrypoint(fake_server, env, shell=shell)
    assert refused.returncode == 64 and refused.stderr.count("\n") == 1, refused.stderr
    for needed in ("no AMD GPU is visible", "--device /dev/kfd --device /dev/dri", "ALLOW_CPU=1"):
        assert needed in refused.stderr
    assert not Path(f"{fake_server}.args").exists()
    allowed = run_entrypoint(fake_server, {**env, "LLAMA_ALLOW_CPU": "1"}, shell=shell)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: no AMD GPU is visible in this container" in allowed.stderr
    assert "LLAMA_ALLOW_CPU=1: running on the CPU" in allowed.stderr
    assert "--hf-repo" in Path(f"{fake_server}.args").read_text()


def test_entrypoint_names_an_unknown_knob_and_goes_on(fake_server: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    env = {"LLAMA_MODEL": str(model), "LLAMA_MODLE": "typo", "LLAMA_ARG_CTX_SIZE": "512"}
    done = run_entrypoint(fake_server, env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "llama-server image: warning: LLAMA_MODLE is not a knob of this image and is ignored "
        "(see the README's run table)"
    ]


def llama_cpp_environment(vendor: Path) -> set[str]:
    """The LLAMA_* variables llama.cpp reads by name (getenv), from the snapshot's sources."""
    pattern = re.compile(r'getenv\(\s*"(LLAMA_[A-Z0-9_]+)"')
    names: set[str] = set()
    for directory in ("common", "src", "tools/server"):
        for source in (vendor / directory).rglob("*.cpp"):
            names.update(pattern.findall(source.read_text(errors="replace")))
    return names


def test_entrypoint_knows_every_variable_llama_cpp_reads(
    pinned_snapshot: Path, fake_server: Path, tmp_path: Path
) -> None:
    """No warning for what llama.cpp itself reads, so a pin bump that adds one shows here."""
    names = llama_cpp_environment(pinned_snapshot / "vendor")
    assert "LLAMA_CACHE" in names or "LLAMA_TRACE" in names, sorted(names)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    done = run_entrypoint(fake_server, {"LLAMA_MODEL": str(model), **dict.fromkeys(names, "1")})
    assert done.returncode == 0 and done.stderr == "", done.stderr


# ------------------------------------------------------------------------ CUDA flags, configured


def test_cuda_flags_configure_against_the_machine_toolkit(
    pinned_snapshot: Path, tmp_path: Path
) -> None:
    """cmake configure only (no compile) with the cuda13 image's flags and the host's nvcc (a
    CUDA 13 toolkit here)."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    require_lab(Path(nvcc).is_file(), "a CUDA toolkit (nvcc) to configure the cuda flags with")
    cmake = shutil.which("cmake")
    require_lab(cmake is not None, "cmake")
    assert cmake is not None
    cuda = MATRIX.backend("cuda13")
    flags = [f"-D{k}={v}" for k, v in configure_flags(MATRIX, cuda)]
    variants = MATRIX.cpu_variant_set(cuda.cpu_variants).cmake_flags["amd64"]
    flags += [f"-D{k}={v}" for k, v in variants]
    done = subprocess.run(
        [
            cmake,
            "-S",
            str(pinned_snapshot / "vendor"),
            "-B",
            str(tmp_path / "build"),
            *flags,
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    output = done.stdout + done.stderr
    # nvcc identified and tested for every architecture of the list: the configure step.
    assert "-- Configuring done" in output, output[-4000:]
    assert "Including CUDA backend" in output
    if done.returncode != 0:
        # A toolkit without the CUDA libraries (this machine's: nvcc and cudart only) fails
        # the generate step on the library targets alone; anything else is a real failure.
        errors = re.findall(r"CMake Error.*?(?=\nCMake |\Z)", output, re.S)
        unexpected = [e for e in errors if not re.search(r"links to:\s+CUDA::\w+", e)]
        assert not unexpected, unexpected
        print(
            "cuda: generate skipped: this CUDA toolkit lacks",
            sorted(set(re.findall(r"CUDA::\w+", output))),
        )
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert re.search(r"^CMAKE_CUDA_ARCHITECTURES:\w+=75;80;86;89;90;100;120$", cache, re.M)
    assert re.search(r"CMAKE_CUDA_COMPILER:\w+=.*nvcc", cache)


# ------------------------------------------------------------------------ real cpu images


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=600
    )


@contextlib.contextmanager
def qemu_aarch64_disabled() -> Iterator[None]:
    """Turn the qemu-aarch64 binfmt handler off (and back on): no arm64 code can run."""
    require_lab(QEMU_AARCH64.exists(), "the qemu-aarch64 binfmt handler")
    was_enabled = QEMU_AARCH64.read_text().startswith("enabled")
    QEMU_AARCH64.write_text("0")
    try:
        yield
    finally:
        if was_enabled:
            QEMU_AARCH64.write_text("1")


def image_rootfs(ref: str, platform: str, dest: Path) -> Path:
    """The image's filesystem, exported from a created (never started) container."""
    cid = docker("create", "--platform", platform, ref).stdout.strip()
    try:
        tar_path = dest.with_suffix(".tar")
        docker("export", "-o", str(tar_path), cid)
    finally:
        docker("rm", cid, check=False)
    dest.mkdir()
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="tar")
    return dest


def elf_files(root: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def check_needed_closure(root: Path) -> list[str]:
    """Every NEEDED of every ELF file in the image resolves inside the image, as ld.so would:
    the RUNPATH ($ORIGIN), then the multiarch and default library directories."""
    readelf = shutil.which("readelf")
    require_lab(readelf is not None, "readelf (binutils)")
    assert readelf is not None
    missing: list[str] = []
    elves = elf_files(root)
    assert elves, "no ELF files in the image"
    system_dirs = [d for d in root.glob("lib/*-linux-gnu*")] + [root / "lib", root / "usr/lib"]
    for elf in elves:
        out = subprocess.run(
            [readelf, "-d", "-l", str(elf)], capture_output=True, text=True, check=True
        ).stdout
        runpaths = re.findall(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", out)
        if any(rp != "$ORIGIN" for rp in runpaths):
            missing.append(f"{elf.relative_to(root)}: RUNPATH {runpaths}, expected $ORIGIN")
        dirs = [
            Path(str(elf.parent) + p.removeprefix("$ORIGIN"))
            if p.startswith("$ORIGIN")
            else root / p.lstrip("/")
            for rp in runpaths
            for p in rp.split(":")
        ]
        for lib in re.findall(r"\(NEEDED\).*\[(.*)\]", out):
            if not any((d / lib).exists() for d in [*dirs, *system_dirs]):
                missing.append(f"{elf.relative_to(root)} needs {lib}")
        interp = re.search(r"program interpreter: (.*)\]", out)
        if interp and not (root / interp.group(1).lstrip("/")).exists():
            missing.append(f"{elf.relative_to(root)}: interpreter {interp.group(1)}")
    return missing


def image_size(ref: str) -> int:
    sizes = docker("history", "--human=false", "--format", "{{.Size}}", ref).stdout.split()
    return sum(int(s) for s in sizes)


def check_image(built: BuildRecord, reports: Path, platform: str, tmp_path: Path) -> None:
    assert built.platform == platform and built.output == "load"
    assert built.commit == PINNED_COMMIT and built.cpu_variants == TEST_CPU_VARIANTS
    assert built.digest.startswith("sha256:")
    report = reports / f"build-cpu-{platform.split('/')[1]}.json"
    assert json.loads(report.read_text())["digest"] == built.digest
    info = json.loads(docker("image", "inspect", built.ref).stdout)[0]
    config = info["Config"]
    assert f"{info['Os']}/{info['Architecture']}" == platform
    labels = config["Labels"]
    assert labels["org.opencontainers.image.revision"] == PINNED_COMMIT
    assert labels["org.opencontainers.image.version"] == VERSION.version
    assert labels["org.opencontainers.image.created"] == "2026-10-01T02:11:48Z"
    assert labels["org.llamacpp-images.cpu-variants"] == TEST_CPU_VARIANTS
    assert config["User"] == "10001:10001"
    assert "8080/tcp" in config["ExposedPorts"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert built.size_bytes == image_size(built.ref)
    assert built.size_bytes is not None and 5_000_000 < built.size_bytes <= 60_000_000
    missing = check_needed_closure(image_rootfs(built.ref, platform, tmp_path / "rootfs"))
    assert not missing, missing


def check_runs(ref: str, platform: str) -> None:
    """--version reports the pinned commit; the process is not root; no model: one line."""
    version = docker("run", "--rm", "--platform", platform, ref, "--version")
    assert f"commit {PINNED_COMMIT[:7]})" in version.stdout + version.stderr
    uid = docker(
        "run", "--rm", "--platform", platform, "--entrypoint", "/bin/busybox", ref, "id", "-u"
    )
    assert uid.stdout.strip() == "10001"
    no_model = docker("run", "--rm", "--platform", platform, ref, check=False)
    assert no_model.returncode == 64
    assert no_model.stderr.strip().startswith("llama-server image: no model:")


@pytest.mark.docker
@pytest.mark.slow
def test_cpu_amd64_image(
    cpu_image: Callable[[str], BuildRecord], lab_project: Project, tmp_path: Path
) -> None:
    built = cpu_image("amd64")
    check_image(built, lab_project.reports_dir, "linux/amd64", tmp_path)
    check_runs(built.ref, "linux/amd64")


@pytest.mark.docker
@pytest.mark.slow
def test_cpu_arm64_image_builds_with_qemu_off(
    cpu_image: Callable[[str], BuildRecord], lab_project: Project, tmp_path: Path
) -> None:
    """The first arm64 build of a session runs here, with no way to execute arm64 code; the
    rootfs stage is rebuilt uncached too, so something really ran without it."""
    with qemu_aarch64_disabled():
        built = cpu_image("arm64")
        req = request(
            "arm64",
            project=lab_project,
            cpu_variants=TEST_CPU_VARIANTS,
            no_cache_filter=("rootfs",),
            quiet=True,
        )
        with build_lock():
            (again,) = build(req, check_snapshot(lab_project))
        assert again.ref == built.ref and again.commit == PINNED_COMMIT
    check_image(built, lab_project.reports_dir, "linux/arm64", tmp_path)
    check_runs(built.ref, "linux/arm64")


def test_host_platform_is_a_matrix_platform() -> None:
    assert MATRIX.platform(host_platform()).name == host_platform()


@pytest.mark.docker
def test_unknown_builder_is_a_usage_error(
    docker_engine: None,
    lab_project: Project,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PIPELINE_ROOT", str(lab_project.root))
    assert main(["build", "amd64", "--builder", "no-such-builder"]) == 2
    err = capsys.readouterr().err
    assert "buildx builder 'no-such-builder' is not usable" in err and "docker buildx ls" in err


def test_attested_push_report_carries_the_index_publish_joins(tmp_path: Path) -> None:
    """build writes index_digest for an attested single-platform push; publish reads it back
    (through the one loader every stage uses)."""
    manifest, index = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    built = result(
        image="127.0.0.1:5000/t/llama",
        ref=f"127.0.0.1:5000/t/llama@{manifest}",
        digest=manifest,
        output="push-by-digest",
        size_bytes=None,
        index_digest=index,
    )
    write_record(tmp_path, built)
    assert BuildRecord.from_json(built.to_json(), built.filename) == built
    (record,) = load_build_records(tmp_path)
    assert (record.digest, record.index_digest) == (manifest, index)
    assert record.source.endswith(f"@{index}")  # the index, attestations and all, is joined

    with pytest.raises(RecordInvalidError) as failure:
        BuildRecord.from_json(built.to_json() | {"index_digest": "latest"}, "build-x.json")
    assert "build-x.json: key 'index_digest' is 'latest'" in failure.value.line()


# ------------------------------------------------------------------------ pushes


def registry_json(host: str, repository: str, reference: str) -> dict[str, Any]:
    response = httpx.get(
        f"http://{host}/v2/{repository}/manifests/{reference}",
        headers={"Accept": MANIFEST_ACCEPT},
    )
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def layer_mtimes(host: str, repository: str, manifest: dict[str, Any]) -> set[int]:
    """The modification times of every file in the image's layers, read from the registry."""
    times: set[int] = set()
    for layer in manifest["layers"]:
        blob = httpx.get(f"http://{host}/v2/{repository}/blobs/{layer['digest']}").content
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            times |= {int(member.mtime) for member in tar.getmembers()}
    return times


def pushed_project(lab_project: Project, tmp_path: Path) -> Project:
    """A project of the test's own that builds from the session's snapshot."""
    root = copy_project(tmp_path / "project")
    (root / "third_party").symlink_to(lab_project.third_party.parent)
    return Project(root)


@pytest.mark.docker
@pytest.mark.slow
def test_a_multi_platform_push_keeps_rewrite_timestamp(
    cpu_image: Callable[[str], BuildRecord],
    lab_project: Project,
    lab_registry: Any,
    tmp_path: Path,
) -> None:
    """`--push` on the lab's `docker` driver (which refuses BuildKit's own push with
    rewrite-timestamp): one index under the tag, each platform's digest read back, every file
    dated SOURCE_DATE_EPOCH; pushed again, no blob is uploaded twice."""
    cpu_image("amd64"), cpu_image("arm64")  # the session's builds: the cache this one reuses
    project = pushed_project(lab_project, tmp_path)
    host, repo = lab_registry.host, "push/llama-server"
    req = request(
        "amd64",
        "arm64",
        project=project,
        output="push",
        quiet=True,
        tags=(f"{host}/{repo}:test",),
        cpu_variants=TEST_CPU_VARIANTS,
    )
    snapshot = check_snapshot(project)
    with build_lock():
        records = build(req, snapshot)
    index = registry_json(host, repo, "test")
    listed = {
        f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"]
        for m in index["manifests"]
    }
    assert listed == {r.platform: r.digest for r in records}
    assert all(r.ref == f"{host}/{repo}@{r.digest}" for r in records)
    manifest = registry_json(host, repo, records[0].digest)
    assert layer_mtimes(host, repo, manifest) == {snapshot.source_date_epoch}
    mark = len(lab_registry.requests())
    with build_lock():
        again = build(req, snapshot)
    assert [r.digest for r in again] == [r.digest for r in records]  # reproducible
    assert lab_registry.blob_uploads_since(mark) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_push_rides_out_a_failing_registry_and_a_dead_one_tags_nothing(
    cpu_image: Callable[[str], BuildRecord],
    lab_project: Project,
    fault_proxy: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cpu_image("amd64")
    project = pushed_project(lab_project, tmp_path)
    host, repo = fault_proxy.host, "flaky/llama-server"
    snapshot = check_snapshot(project)
    by_digest = request(
        "amd64",
        project=project,
        output="push-by-digest",
        quiet=True,
        tags=(f"{host}/{repo}",),
        cpu_variants=TEST_CPU_VARIANTS,
    )
    fault_proxy.fail_next(3)  # three answers 500-class, then the registry is fine
    with build_lock():
        (record,) = build(by_digest, snapshot)
    assert "retrying" in capsys.readouterr().err
    assert registry_json(host, repo, record.digest)["layers"]
    # Stopped for good at the tag: the error is one line, and no tag points anywhere.
    tagged = request(
        "amd64",
        project=project,
        output="push",
        quiet=True,
        tags=(f"{host}/{repo}:broken",),
        cpu_variants=TEST_CPU_VARIANTS,
    )
    fault_proxy.stop_on(rf"^PUT /v2/{repo}/manifests/broken ", restart_after=None)
    with build_lock(), pytest.raises(PipelineError) as failure:
        build(tagged, snapshot)
    assert "pushing to" in failure.value.line() and "\n" not in failure.value.line()
    fault_proxy.registry.start()
    listed = httpx.get(f"http://{host}/v2/{repo}/tags/list").json()
    assert "broken" not in (listed.get("tags") or [])


def test_rpc_worker_listens_where_it_is_told_and_says_so(fake_server: Path) -> None:
    """`docker run IMAGE rpc-worker` (or LLAMA_ROLE=rpc-worker): ggml-rpc-server on the port
    and address given, with a line saying it has no authentication; bad values refused."""
    worker = fake_server.with_name("ggml-rpc-server")
    worker.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$0.args"\n')
    worker.chmod(0o755)
    env = {"LLAMA_RPC_HOST": "127.0.0.1", "LLAMA_RPC_PORT": "50100"}
    done = run_entrypoint(fake_server, env, "rpc-worker", "--threads", "2")
    assert done.returncode == 0, done.stderr
    assert Path(f"{worker}.args").read_text().split() == [
        *("--host", "127.0.0.1", "--port", "50100", "--threads", "2")
    ]
    assert "127.0.0.1:50100" in done.stderr and "no authentication" in done.stderr
    by_role = run_entrypoint(fake_server, {**env, "LLAMA_ROLE": "rpc-worker"}, "-c")
    assert by_role.returncode == 0, by_role.stderr
    assert Path(f"{worker}.args").read_text().split()[-1] == "-c"
    for bad, message in [
        ({"LLAMA_ROLE": "worker"}, "LLAMA_ROLE=worker: server (the default) or rpc-worker"),
        ({"LLAMA_ROLE": "rpc-worker", "LLAMA_RPC_PORT": "0"}, "LLAMA_RPC_PORT=0 is not a port"),
    ]:
        refused = run_entrypoint(fake_server, bad)
        assert refused.returncode == 64 and refused.stderr.count("\n") == 1, refused.stderr
        assert message in refused.stderr


def busybox_tools(where: Path, *tools: str) -> str:
    """A PATH whose `tools` are busybox's applets, as in the images (the host's may differ or be
    missing), then the host's own."""
    busybox = shutil.which("busybox")
    require_lab(busybox is not None, "busybox (.ci/provision installs busybox-static)")
    where.mkdir(exist_ok=True)
    for tool in tools:
        (where / tool).symlink_to(str(busybox))
    return f"{where}:{os.environ['PATH']}"


def test_rpc_workers_must_answer_before_the_server_starts(
    fake_server: Path, tmp_path: Path
) -> None:
    """LLAMA_RPC_WORKERS: each worker is connected to first (ggml-rpc-server drops a connection
    that ends at once); one that does not answer is one line naming it; then --rpc."""
    import socket
    import threading

    path = busybox_tools(tmp_path / "bin", "nc", "timeout")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connection.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        env = {"PATH": path, "LLAMA_HF_REPO": "a/b", "LLAMA_RPC_WORKERS": f"127.0.0.1:{port}"}
        done = run_entrypoint(fake_server, env)
        assert done.returncode == 0, done.stderr
        argv = Path(f"{fake_server}.args").read_text().split()
        assert argv[argv.index("--rpc") + 1] == f"127.0.0.1:{port}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: the port is closed
        listener.close()
    cases = [
        (f"127.0.0.1:{port}", f"the worker 127.0.0.1 does not answer on port {port}"),
        ("no-such-worker.invalid:50052", "the worker no-such-worker.invalid does not answer"),
        ("worker-1", "worker-1 is not host:port"),
        ("worker-1:99999", "port=99999 is not a port number"),
    ]
    for workers, message in cases:
        env = {"PATH": path, "LLAMA_HF_REPO": "a/b", "LLAMA_RPC_WORKERS": workers}
        refused = run_entrypoint(fake_server, env)
        assert refused.returncode == 64 and refused.stderr.count("\n") == 1, refused.stderr
        assert message in refused.stderr, refused.stderr
