"""`nox -s build`: images from the rendered Dockerfiles with `docker buildx build`.

Renders first, checks what a build needs (engine, buildx, a builder able to run the target's
code where the backend runs any, a verified snapshot), runs buildx (full log under
build/logs/, one line per step on the terminal), asks the engine (docker-py) or the registry
what came out, and writes one hand-off report per (backend, platform) to
build/reports/build-<backend>-<arch>.json for smoke and publish.

Outputs: `--load` (default) loads each platform into the engine as its own image, tagged
<image>:<version>-<backend>-<arch>; `--push` pushes one multi-platform image per backend;
`--push-by-digest` pushes each platform untagged (the release workflow: publish joins the
digests later); `--oci PATH` writes an OCI layout tarball.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from pipeline import console
from pipeline.cli import Command
from pipeline.config import COMMIT_RE, Project, VersionInfo, load_version, write_json_atomic
from pipeline.errors import (
    BuildError,
    DockerUnavailableError,
    ToolMissingError,
    UsageError,
)
from pipeline.matrix import Backend, Matrix, Platform, host_platform, load_matrix
from pipeline.render import dockerfile_path, render_all

SCHEMA = 1
Output = Literal["load", "push", "push-by-digest", "oci"]
OUTPUTS: tuple[Output, ...] = ("load", "push", "push-by-digest", "oci")
# The named build context the templates take their support files (entrypoint...) from.
SUPPORT_CONTEXT = "support"
# A log line worth a terminal line: a step starting, or (at most every 10%) ninja progress.
_STEP_RE = re.compile(r"^#\d+ \[(?P<step>[^\]]+)\] (?P<what>.+)$")
_NINJA_RE = re.compile(r"^#\d+ [\d.]+ \[(?P<done>\d+)/(?P<total>\d+)\] ")
_SCRIPT_ERROR_RE = re.compile(r"^#\d+ [\d.]+ (?P<msg>error: .+)$")


# ------------------------------------------------------------------------ the hand-off report


@dataclass(frozen=True)
class BuildResult:
    """One built image for one (backend, platform): build/reports/build-<backend>-<arch>.json.

    `ref` is what `docker run` takes (a tag for --load, name@digest once pushed); `digest` the
    manifest digest (the pushed per-platform manifest; for --load the local image's).
    """

    backend: str
    platform: str  # linux/amd64
    image: str  # repository name, no tag
    ref: str
    digest: str
    output: str  # load | push | push-by-digest | oci
    commit: str
    version: str
    size_bytes: int | None  # uncompressed (sum of the layers' sizes); None when not local
    seconds: float
    cpu_variants: str | None = None
    compressed_bytes: int | None = None
    # A single-platform push with attestations is an index (image + SBOM/provenance manifests):
    # publish joins that index, not the bare image, so the attestations reach the release.
    index_digest: str | None = None
    schema: int = SCHEMA

    @property
    def arch(self) -> str:
        return self.platform.split("/", 1)[1]

    @property
    def filename(self) -> str:
        return f"build-{self.backend}-{self.arch}.json"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # The agreed schema's order, then the fields this module added.
        order = ["schema", "backend", "platform", "image", "ref", "digest", "output",
                 "commit", "version", "size_bytes", "seconds", "cpu_variants",
                 "compressed_bytes", "index_digest"]  # fmt: skip
        return {key: data[key] for key in order}

    @classmethod
    def from_json(cls, data: Any, where: str) -> BuildResult:
        if not isinstance(data, dict):
            raise BuildError(f"{where}: expected a JSON object", "rebuild: nox -s build")
        if data.get("schema") != SCHEMA:
            raise BuildError(
                f"{where}: schema {data.get('schema')!r}, this pipeline reads schema {SCHEMA}",
                "rebuild: nox -s build",
            )
        kinds: dict[str, tuple[type, ...]] = {
            "backend": (str,), "platform": (str,), "image": (str,), "ref": (str,),
            "digest": (str,), "output": (str,), "commit": (str,), "version": (str,),
            "size_bytes": (int, type(None)), "seconds": (int, float),
        }  # fmt: skip
        for key, kind in kinds.items():
            if key not in data or not isinstance(data[key], kind):
                expected = " or ".join(k.__name__ for k in kind)
                raise BuildError(
                    f"{where}: key {key!r} is missing or not {expected}", "rebuild: nox -s build"
                )
        if not data["digest"].startswith("sha256:") or data["output"] not in OUTPUTS:
            raise BuildError(f"{where}: malformed digest or output", "rebuild: nox -s build")
        variants = data.get("cpu_variants")
        compressed = data.get("compressed_bytes")
        index = data.get("index_digest")
        if index is not None and not (isinstance(index, str) and index.startswith("sha256:")):
            raise BuildError(f"{where}: malformed index_digest", "rebuild: nox -s build")
        return cls(
            backend=data["backend"],
            platform=data["platform"],
            image=data["image"],
            ref=data["ref"],
            digest=data["digest"],
            output=data["output"],
            commit=data["commit"],
            version=data["version"],
            size_bytes=data["size_bytes"],
            seconds=float(data["seconds"]),
            cpu_variants=variants if isinstance(variants, str) else None,
            compressed_bytes=compressed if isinstance(compressed, int) else None,
            index_digest=index,
        )


def logs_dir(project: Project) -> Path:
    return project.build_dir / "logs"


def write_build_result(project: Project, result: BuildResult) -> Path:
    directory = project.reports_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / result.filename
    write_json_atomic(path, result.to_json())
    path.chmod(0o644)  # a build artifact for other stages and CI uploads, no secret in it
    return path


def load_build_results(project: Project) -> list[BuildResult]:
    """Every build report under build/reports/, sorted by file name."""
    results: list[BuildResult] = []
    for path in sorted(project.reports_dir.glob("build-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BuildError(f"cannot read {path.name}: {exc}", "rebuild: nox -s build") from None
        results.append(BuildResult.from_json(data, path.name))
    return results


def load_build_result(project: Project, backend: str, platform: str) -> BuildResult:
    """The report of one (backend, platform); BuildError saying how to make it if missing."""
    for result in load_build_results(project):
        if result.backend == backend and result.platform == platform:
            return result
    arch = platform.split("/", 1)[-1]
    raise BuildError(
        f"no build report for {backend} {platform} in {project.reports_dir}",
        f"run: nox -s build -- {arch} --backend {backend}",
    )


# ------------------------------------------------------------------------ what to build


@dataclass(frozen=True)
class BuildRequest:
    """Everything `nox -s build` was asked; see `parse_request` for the CLI's defaults."""

    platforms: tuple[str, ...]  # names such as linux/arm64
    backends: tuple[str, ...]
    output: Output = "load"
    oci_path: Path | None = None
    builder: str | None = None
    cache_from: tuple[str, ...] = ()
    cache_to: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    cpu_variants: str | None = None  # None: each backend's default from the matrix
    build_args: tuple[tuple[str, str], ...] = ()
    attest: bool = False  # SBOM + max provenance (pushing only)
    no_cache_filter: tuple[str, ...] = ()  # stages rebuilt without the cache


@dataclass(frozen=True)
class BuildJob:
    """One `docker buildx build` invocation: one backend, one or more platforms."""

    backend: Backend
    platforms: tuple[Platform, ...]
    output: Output
    tags: tuple[str, ...]  # full references; for push-by-digest, the repository name
    repository: str
    cpu_variants: str
    oci_path: Path | None = None

    @property
    def key(self) -> str:
        return f"{self.backend.name}-{'-'.join(p.arch for p in self.platforms)}"


def _split_repository(reference: str) -> tuple[str, str | None]:
    """`host:5000/a/b:tag` -> (`host:5000/a/b`, `tag`); a digest reference is refused."""
    if "@" in reference:
        raise UsageError(f"--tag {reference}: a digest cannot be a tag", "give name[:tag]")
    last = reference.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = reference.rsplit(":", 1)
        return name, tag
    return reference, None


def _full_tag(tag: str, image: str) -> str:
    """`dev` -> `<image>:dev`; a reference with a name passes through."""
    return tag if "/" in tag or ":" in tag else f"{image}:{tag}"


def plan_jobs(request: BuildRequest, matrix: Matrix, version: VersionInfo) -> list[BuildJob]:
    """The buildx invocations for a request; every usage error is raised here, before any work."""
    targets = matrix.targets(request.backends, request.platforms)
    if request.cpu_variants is not None:
        matrix.cpu_variant_set(request.cpu_variants)
    tags = tuple(_full_tag(t, version.image) for t in request.tags)
    several_platforms = len(request.platforms) > 1
    jobs: list[BuildJob] = []
    for backend_name in dict.fromkeys(t.backend.name for t in targets):
        backend = matrix.backend(backend_name)
        platforms = tuple(t.platform for t in targets if t.backend.name == backend_name)
        variants = request.cpu_variants or backend.cpu_variants
        default_tag = f"{version.image}:{version.version}-{backend.name}"
        if request.output == "load":
            # One local image per platform: the engine's store keeps one platform per tag.
            if tags and (several_platforms or len(request.backends) > 1):
                raise UsageError(
                    "--tag with --load names one image, but this builds one per backend and "
                    "platform",
                    "build one backend and platform, or drop --tag (tags end in -<backend>-<arch>)",
                )
            for platform in platforms:
                job_tags = tags or (f"{default_tag}-{platform.arch}",)
                jobs.append(BuildJob(backend, (platform,), "load", job_tags,
                                     _split_repository(job_tags[0])[0], variants))  # fmt: skip
        elif request.output == "push-by-digest":
            if len(tags) > 1:
                raise UsageError("--push-by-digest takes one --tag: the repository to push to")
            repository = version.image
            if tags:
                repository, tag = _split_repository(tags[0])
                if tag:
                    raise UsageError(
                        f"--tag {request.tags[0]}: --push-by-digest pushes no tag",
                        "give the repository only, e.g. --tag 127.0.0.1:5000/acme/llama-server",
                    )
            # One push per platform, so each report holds that platform's own manifest digest.
            for platform in platforms:
                jobs.append(BuildJob(backend, (platform,), "push-by-digest", (repository,),
                                     repository, variants))  # fmt: skip
        elif request.output == "push":
            if tags and len(request.backends) > 1:
                raise UsageError("--tag with --push and several backends would push them all "
                                 "to one tag", "push one backend per call")  # fmt: skip
            suffix = "" if several_platforms else f"-{platforms[0].arch}"
            job_tags = tags or (f"{default_tag}{suffix}",)
            jobs.append(BuildJob(backend, platforms, "push", job_tags,
                                 _split_repository(job_tags[0])[0], variants))  # fmt: skip
        else:  # oci
            assert request.oci_path is not None
            path = request.oci_path
            if len(request.backends) > 1:
                if path.suffix == ".tar":
                    raise UsageError(
                        f"--oci {path}: several backends need a directory, not a .tar file",
                        "give a directory: each backend goes to <dir>/<backend>.tar",
                    )
                path = path / f"{backend.name}.tar"
            elif path.suffix != ".tar":
                path = path / f"{backend.name}.tar"
            job_tags = tags or (f"{default_tag}",)
            jobs.append(BuildJob(backend, platforms, "oci", job_tags,
                                 _split_repository(job_tags[0])[0], variants, path))  # fmt: skip
    return jobs


# ------------------------------------------------------------------------ checking the tools


def docker_client() -> Any:
    """A docker-py client that answered a ping, or DockerUnavailableError."""
    import docker
    from docker.errors import DockerException

    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        raise DockerUnavailableError(
            f"no Docker engine answers at {where} ({type(exc).__name__})",
            "start dockerd (on a lab machine: .ci/provision), or set DOCKER_HOST",
        ) from None
    return client


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise ToolMissingError(
            "the docker CLI is not installed", "install Docker (docker-ce-cli or docker.io)"
        ) from None


def check_buildx() -> str:
    """buildx's version, or DockerUnavailableError saying how to install it."""
    result = _docker("buildx", "version")
    if result.returncode != 0:
        raise DockerUnavailableError(
            "docker buildx is not installed",
            "install the docker-buildx plugin (Debian: docker-buildx; or put the binary in "
            "~/.docker/cli-plugins/docker-buildx)",
        )
    return result.stdout.strip()


@dataclass(frozen=True)
class BuilderInfo:
    name: str
    driver: str
    platforms: tuple[str, ...]

    def supports(self, platform: str) -> bool:
        # "linux/amd64/v2" counts as linux/amd64.
        return any(p == platform or p.startswith(f"{platform}/") for p in self.platforms)


def inspect_builder(builder: str | None) -> BuilderInfo:
    args = ["buildx", "inspect", "--bootstrap"]
    if builder:
        args += ["--builder", builder]
    result = _docker(*args, timeout=300)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        if builder:
            raise UsageError(
                f"buildx builder {builder!r} is not usable: {detail}",
                "list builders with `docker buildx ls`; create one with `docker buildx create "
                f"--name {builder} ...`",
            )
        raise DockerUnavailableError(f"the default buildx builder is not usable: {detail}")
    name, driver, platforms = "", "", []
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "Name" and not name:
            name = value
        elif key == "Driver" and not driver:
            driver = value
        elif key == "Platforms":
            platforms += [p.strip().rstrip("*") for p in value.split(",") if p.strip()]
    return BuilderInfo(name or builder or "default", driver, tuple(dict.fromkeys(platforms)))


def check_builder_platforms(builder: BuilderInfo, jobs: Sequence[BuildJob]) -> None:
    """A platform whose build runs target code needs the builder to run it (QEMU or a node).

    The cpu image never runs target code (cross-compiled, scratch runtime), so it builds for
    arm64 with no emulator at all; vulkan's runtime runs apt-get, cuda/rocm compile natively.
    """
    for job in jobs:
        if not job.backend.runs_target_code:
            continue
        for platform in job.platforms:
            if not builder.supports(platform.name):
                qemu = f"qemu-{platform.gnu_triplet.split('-')[0]}"
                why = (
                    "compiles on the target platform"
                    if not job.backend.cross_compile
                    else "runs the target's package manager in its runtime stage"
                )
                raise BuildError(
                    f"buildx builder {builder.name!r} cannot run {platform.name} code, which "
                    f"the {job.backend.name} image needs (it {why}); it runs: "
                    f"{', '.join(builder.platforms) or 'nothing'}",
                    f"register QEMU for {platform.arch} (apt-get install qemu-user-static "
                    f"binfmt-support; update-binfmts --enable {qemu}), "
                    f"or add a native node: docker buildx create --append --name <builder> "
                    f"--platform {platform.name} <endpoint>, then --builder <builder>",
                )


def check_output_support(builder: BuilderInfo, jobs: Sequence[BuildJob]) -> None:
    for job in jobs:
        if job.output == "load" and builder.driver not in ("docker", "docker-container", ""):
            raise UsageError(
                f"--load: buildx builder {builder.name!r} (driver {builder.driver}) cannot "
                "load into the local engine",
                "use --push or --oci PATH with this builder",
            )


# ------------------------------------------------------------------------ running buildx


def _cache_spec(value: str, export: bool) -> str:
    """REF -> registry cache, DIR -> local cache; a full `type=...` spec passes through."""
    if value.startswith("type=") or "," in value:
        return value
    looks_local = value.startswith(("/", "./", "../", "~")) or Path(value).is_dir()
    if looks_local:
        path = Path(value).expanduser()
        return f"type=local,dest={path},mode=max" if export else f"type=local,src={path}"
    return f"type=registry,ref={value},mode=max" if export else f"type=registry,ref={value}"


def build_arguments(
    project: Project, job: BuildJob, version: VersionInfo, snapshot_epoch: int,
    commit: str, build_number: int | None, request: BuildRequest, metadata_file: Path,
) -> list[str]:  # fmt: skip
    """The whole `docker buildx build` command line of one job (no secret ever goes here)."""
    created = datetime.fromtimestamp(snapshot_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    build_args: dict[str, str] = {
        "LLAMA_CPP_COMMIT": commit,
        "LLAMA_CPP_BUILD_NUMBER": str(build_number or 0),
        "IMAGE_VERSION": version.version,
        "IMAGE_CREATED": created,
        "CPU_VARIANTS": job.cpu_variants,
        # BuildKit dates the image config and layers from it: same commit, same dates.
        "SOURCE_DATE_EPOCH": str(snapshot_epoch),
    }
    build_args.update(dict(request.build_args))
    args = ["docker", "buildx", "build"]
    if request.builder:
        args += ["--builder", request.builder]
    args += [
        "--progress=plain",
        "--file", str(dockerfile_path(project, job.backend.name)),
        "--build-context", f"{SUPPORT_CONTEXT}={project.dockerfiles_dir}",
        "--platform", ",".join(p.name for p in job.platforms),
        "--metadata-file", str(metadata_file),
    ]  # fmt: skip
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    if request.attest and job.output in ("push", "push-by-digest"):
        args += ["--provenance=mode=max", "--sbom=true"]
    else:
        # Without attestations a single-platform push is one manifest, whose digest is the
        # platform's: what publish joins into the multi-platform index.
        args += ["--provenance=false"]
    if request.no_cache_filter:
        args += ["--no-cache-filter", ",".join(request.no_cache_filter)]
    for value in request.cache_from:
        args += ["--cache-from", _cache_spec(value, export=False)]
    for value in request.cache_to:
        args += ["--cache-to", _cache_spec(value, export=True)]
    # rewrite-timestamp: every file dated SOURCE_DATE_EPOCH, so the same inputs give the same
    # layers and digests (an unchanged re-publish uploads nothing). The engine's own store
    # refuses it (it unpacks what it loads): local images only get the config's dates.
    if job.output == "load":
        for tag in job.tags:
            args += ["--tag", tag]
        args += ["--load"]
    elif job.output == "push":
        for tag in job.tags:
            args += ["--tag", tag]
        args += ["--output", "type=image,push=true,rewrite-timestamp=true"]
    elif job.output == "push-by-digest":
        args += [
            "--output",
            f"type=image,name={job.repository},push-by-digest=true,name-canonical=true,"
            "push=true,rewrite-timestamp=true",
        ]
    else:
        assert job.oci_path is not None
        args += [
            "--output",
            f"type=oci,dest={job.oci_path},name={job.tags[0]},rewrite-timestamp=true",
        ]
    args.append(str(project.third_party))
    return args


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_buildx(args: Sequence[str], log_path: Path, label: str, quiet: bool = False) -> float:
    """Run buildx, the full log to `log_path`, one terminal line per step; the seconds taken.

    On failure: the log's last lines on stderr and a BuildError with the first error our own
    scripts printed (or buildx's), naming the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    seen_steps: set[str] = set()
    # Per ninja total: nested builds (vulkan's shader generator) count on their own.
    last_tenth: dict[int, int] = {}
    script_error: str | None = None
    tail: list[str] = []
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(
                list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                errors="replace", start_new_session=True,
            )  # fmt: skip
        except FileNotFoundError:
            raise ToolMissingError("the docker CLI is not installed", "install Docker") from None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                line = line.rstrip("\n")
                tail = [*tail[-39:], line]
                if (match := _SCRIPT_ERROR_RE.match(line)) and script_error is None:
                    script_error = match.group("msg")
                if quiet:
                    continue
                if (match := _STEP_RE.match(line)) and match.group("step") not in seen_steps:
                    # Only the first line of a step; cache hits say CACHED on the next line.
                    step = match.group("step")
                    if step.startswith(("internal]", "internal ")) or "load " in step:
                        continue
                    seen_steps.add(step)
                    what = " ".join(match.group("what").split())
                    console.err.print(
                        f"  {label} [{step}] {what[:90]}", markup=False, soft_wrap=True
                    )
                elif match := _NINJA_RE.match(line):
                    done, total = int(match.group("done")), int(match.group("total"))
                    tenth = done * 10 // max(total, 1)
                    if tenth > last_tenth.get(total, -1):
                        last_tenth[total] = tenth
                        elapsed = time.monotonic() - started
                        console.err.print(
                            f"  {label} compiling {done}/{total} ({elapsed:.0f} s)",
                            markup=False,
                            soft_wrap=True,
                        )
            proc.wait()
        except BaseException:
            _kill(proc)
            raise
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        for line in tail[-25:]:
            console.err.print(f"  | {line}", markup=False, highlight=False, soft_wrap=True)
        buildx_error = next((ln for ln in reversed(tail) if ln.startswith("ERROR:")), None)
        message = script_error or (buildx_error or f"buildx exited with {proc.returncode}")
        raise BuildError(f"{label}: {message[:400]}", f"full log: {log_path}")
    return seconds


# ------------------------------------------------------------------------ what came out


def _image_sizes(client: Any, ref: str, platform: str) -> tuple[int | None, int | None, str | None]:
    """(uncompressed, compressed, digest) of a local image, by docker-py.

    With the containerd image store `Size` is the compressed content; the layers' own sizes
    (docker history) add up to the uncompressed size, but only once the layers are unpacked,
    which the engine does for a foreign platform when a container is created: so one is
    created (never started) and removed first.
    """
    from docker.errors import DockerException

    try:
        image = client.images.get(ref)
        container = client.containers.create(ref, platform=platform)
        container.remove(force=True)
        history = client.api.history(ref)
    except DockerException:
        return None, None, None
    uncompressed = sum(int(layer.get("Size") or 0) for layer in history)
    compressed = image.attrs.get("Size")
    digest = None
    for repo_digest in image.attrs.get("RepoDigests") or []:
        digest = str(repo_digest).rsplit("@", 1)[-1]
        break
    return uncompressed, int(compressed) if isinstance(compressed, int) else None, digest


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _index_manifests(index: dict[str, Any]) -> dict[str, str]:
    """platform -> manifest digest of an OCI index / Docker manifest list (attestations out)."""
    found: dict[str, str] = {}
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        if plat.get("os") == "unknown" or not plat.get("architecture"):
            continue  # attestation manifests
        name = f"{plat['os']}/{plat['architecture']}"
        found.setdefault(name, entry["digest"])
    return found


def _registry_manifests(repository: str, digest: str, builder: str | None) -> dict[str, str]:
    args = ["buildx", "imagetools", "inspect", "--raw", f"{repository}@{digest}"]
    if builder:
        args[1:1] = ["--builder", builder]
    result = _docker(*args)
    if result.returncode != 0:
        raise BuildError(
            f"pushed {repository}@{digest[:19]}… but cannot read it back: "
            f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}",
            "check the registry and its credentials",
        )
    data = json.loads(result.stdout)
    if "manifests" not in data:
        return {}
    return _index_manifests(data)


def _oci_manifests(path: Path) -> dict[str, str]:
    """platform -> manifest digest inside an OCI layout tarball."""
    with tarfile.open(path) as tar:

        def read(name: str) -> dict[str, Any]:
            member = tar.extractfile(name)
            if member is None:
                raise BuildError(f"{path}: {name} missing from the OCI layout")
            data: dict[str, Any] = json.load(member)
            return data

        top = read("index.json")
        result: dict[str, str] = {}
        for entry in top.get("manifests") or []:
            media = entry.get("mediaType", "")
            digest = entry["digest"]
            if "index" in media or "manifest.list" in media:
                result.update(_index_manifests(read(f"blobs/sha256/{digest.split(':', 1)[1]}")))
            elif plat := entry.get("platform"):
                result.setdefault(f"{plat['os']}/{plat['architecture']}", digest)
            else:
                manifest = read(f"blobs/sha256/{digest.split(':', 1)[1]}")
                config = read(f"blobs/sha256/{manifest['config']['digest'].split(':', 1)[1]}")
                result.setdefault(f"{config['os']}/{config['architecture']}", digest)
        return result


def collect_results(
    job: BuildJob, metadata: dict[str, Any], seconds: float, commit: str,
    version: VersionInfo, builder: str | None, client: Any,
) -> list[BuildResult]:  # fmt: skip
    digest = metadata.get("containerimage.digest")
    per_platform: dict[str, str] = {}
    indexes: dict[str, str] = {}
    refs: dict[str, str] = {}
    sizes: dict[str, tuple[int | None, int | None]] = {}
    if job.output == "load":
        only = job.platforms[0].name
        uncompressed, compressed, local_digest = _image_sizes(client, job.tags[0], only)
        if local_digest is None and not digest:
            raise BuildError(
                f"{job.key}: buildx succeeded but the engine has no image {job.tags[0]}",
                "is --builder a builder of this engine? (`docker buildx ls`)",
            )
        per_platform[only] = local_digest or str(digest)
        refs[only] = job.tags[0]
        sizes[only] = (uncompressed, compressed)
    elif job.output == "push-by-digest" or (job.output == "push" and len(job.platforms) == 1):
        if not isinstance(digest, str):
            raise BuildError(f"{job.key}: buildx reported no digest for the pushed image")
        manifests = _registry_manifests(job.repository, digest, builder)
        for platform in job.platforms:
            # An index (attestations on) holds the platform's manifest; else it is the digest.
            per_platform[platform.name] = manifests.get(platform.name, digest)
            if platform.name in manifests:
                indexes[platform.name] = digest
    elif job.output == "push":
        if not isinstance(digest, str):
            raise BuildError(f"{job.key}: buildx reported no digest for the pushed image")
        per_platform = _registry_manifests(job.repository, digest, builder)
    else:
        assert job.oci_path is not None
        per_platform = _oci_manifests(job.oci_path)
    results: list[BuildResult] = []
    for platform in job.platforms:
        platform_digest = per_platform.get(platform.name)
        if not platform_digest:
            raise BuildError(f"{job.key}: no {platform.name} manifest in what buildx produced")
        if job.output == "oci":
            ref = f"oci-archive:{job.oci_path}@{platform_digest}"
        else:
            ref = refs.get(platform.name, f"{job.repository}@{platform_digest}")
        uncompressed, compressed = sizes.get(platform.name, (None, None))
        results.append(
            BuildResult(
                backend=job.backend.name,
                platform=platform.name,
                image=job.repository,
                ref=ref,
                digest=platform_digest,
                output=job.output,
                commit=commit,
                version=version.version,
                size_bytes=uncompressed,
                seconds=round(seconds, 1),
                cpu_variants=job.cpu_variants,
                compressed_bytes=compressed,
                index_digest=indexes.get(platform.name),
            )
        )
    return results


# ------------------------------------------------------------------------ the stage


@dataclass
class BuildOutcome:
    results: list[BuildResult] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


def _snapshot(project: Project) -> tuple[str, int, int | None]:
    """(commit, SOURCE_DATE_EPOCH, build number) of the verified snapshot."""
    from pipeline.sync import check_snapshot

    snapshot = check_snapshot(project)
    return snapshot.commit, snapshot.source_date_epoch, snapshot.build_number


def build(project: Project, request: BuildRequest, quiet: bool = False) -> BuildOutcome:
    """Render, check, build every job of `request`, write the reports. Returns the results."""
    matrix = load_matrix()
    version = load_version(project.version_file)
    jobs = plan_jobs(request, matrix, version)
    for key, _ in request.build_args:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise UsageError(f"--build-arg {key}=...: not a build arg name")
    override = dict(request.build_args).get("LLAMA_CPP_COMMIT")
    if override is not None and not COMMIT_RE.match(override):
        raise UsageError(f"--build-arg LLAMA_CPP_COMMIT={override}: expected a full 40-hex sha")
    render_all(project, [job.backend.name for job in jobs], matrix)
    commit, epoch, build_number = _snapshot(project)
    client = docker_client()
    check_buildx()
    builder = inspect_builder(request.builder)
    check_builder_platforms(builder, jobs)
    check_output_support(builder, jobs)
    outcome = BuildOutcome()
    for job in jobs:
        if job.oci_path is not None:
            job.oci_path.parent.mkdir(parents=True, exist_ok=True)
        label = f"{job.backend.name} {','.join(p.arch for p in job.platforms)}"
        log_path = logs_dir(project) / f"build-{job.key}.log"
        metadata_file = logs_dir(project) / f"build-{job.key}.metadata.json"
        metadata_file.unlink(missing_ok=True)
        args = build_arguments(
            project, job, version, epoch, commit, build_number, request, metadata_file
        )
        if not quiet:
            console.err.print(f"building {label} ({job.output}; log: {log_path})", markup=False)
        seconds = run_buildx(args, log_path, label, quiet=quiet)
        results = collect_results(
            job, _read_metadata(metadata_file), seconds, commit, version, request.builder, client
        )
        for result in results:
            outcome.results.append(result)
            outcome.reports.append(write_build_result(project, result))
    return outcome


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def results_table(results: Sequence[BuildResult]) -> Table:
    table = Table(title="images built")
    for column in ("backend", "platform", "ref", "digest", "size", "seconds"):
        # Refs and digests are copied from here: fold them, never cut them.
        table.add_column(
            column,
            justify="right" if column in ("size", "seconds") else "left",
            overflow="fold",
            no_wrap=column not in ("ref", "digest"),
        )
    for r in results:
        table.add_row(r.backend, r.platform, r.ref, r.digest, _mb(r.size_bytes), f"{r.seconds:.0f}")
    return table


# ------------------------------------------------------------------------ command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "platforms", nargs="*", metavar="ARCH|PLATFORM",
        help="amd64, arm64, or linux/<arch> (default: this machine's)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", metavar="B[,B...]", help="backends (default: the matrix's default)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--load", dest="output", action="store_const", const="load",
        help="load each platform into the local engine as <image>:<version>-<backend>-<arch> "
        "(the default)",
    )  # fmt: skip
    mode.add_argument(
        "--push", dest="output", action="store_const", const="push",
        help="push one multi-platform image per backend (tag: --tag, or "
        "<image>:<version>-<backend>)",
    )  # fmt: skip
    mode.add_argument(
        "--push-by-digest", dest="output", action="store_const", const="push-by-digest",
        help="push each platform untagged to the repository (version.json's image, or --tag "
        "REPO); `nox -s publish` tags the digests",
    )  # fmt: skip
    mode.add_argument(
        "--oci", metavar="PATH", type=Path,
        help="write an OCI layout tarball (PATH.tar, or a directory for <backend>.tar)",
    )  # fmt: skip
    parser.add_argument("--builder", metavar="NAME", help="buildx builder (e.g. multi-node)")
    parser.add_argument(
        "--cache-from", metavar="REF|DIR", action="append", default=[],
        help="BuildKit cache to import: a registry ref, a directory, or a type=... spec",
    )  # fmt: skip
    parser.add_argument(
        "--cache-to", metavar="REF|DIR", action="append", default=[],
        help="BuildKit cache to export (mode=max)",
    )  # fmt: skip
    parser.add_argument(
        "--tag", metavar="TAG", action="append", default=[],
        help="image reference, or a tag of version.json's image (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-variants", metavar="SET",
        help="ggml CPU kernels: all (every variant, picked at run time; releases) or baseline "
        "(one portable set, about half the compile time; CI). Default: the matrix's.",
    )  # fmt: skip
    parser.add_argument(
        "--build-arg", metavar="KEY=VALUE", action="append", default=[],
        help="extra build arg (BUILDER_IMAGE, RUNTIME_IMAGE, LLAMA_CPP_COMMIT, ...)",
    )  # fmt: skip
    parser.add_argument(
        "--no-cache-filter", metavar="STAGE", action="append", default=[],
        help="rebuild these Dockerfile stages without the cache (e.g. rootfs, runtime)",
    )  # fmt: skip
    parser.add_argument(
        "--attest", action="store_true",
        help="with --push/--push-by-digest: SBOM and max-mode provenance attestations",
    )  # fmt: skip


def parse_request(args: argparse.Namespace, matrix: Matrix) -> BuildRequest:
    platforms = tuple(args.platforms) or (host_platform(),)
    normalized = tuple(dict.fromkeys(matrix.platform(p).name for p in platforms))
    backends = tuple(b for b in (args.backend or matrix.default_backend).split(",") if b)
    output: Output = "oci" if args.oci is not None else (args.output or "load")
    build_args: list[tuple[str, str]] = []
    for item in args.build_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--build-arg {item!r}: expected KEY=VALUE")
        build_args.append((key, value))
    return BuildRequest(
        platforms=normalized,
        backends=backends,
        output=output,
        oci_path=args.oci.resolve() if args.oci is not None else None,
        builder=args.builder,
        cache_from=tuple(args.cache_from),
        cache_to=tuple(args.cache_to),
        tags=tuple(args.tag),
        cpu_variants=args.cpu_variants,
        build_args=tuple(build_args),
        attest=args.attest,
        no_cache_filter=tuple(args.no_cache_filter),
    )


def _handler(args: argparse.Namespace) -> int:
    project = Project.discover()
    request = parse_request(args, load_matrix())
    outcome = build(project, request)
    console.out.print(results_table(outcome.results))
    for path in outcome.reports:
        console.err.print(f"report: {path.relative_to(project.root)}", markup=False)
    return 0


COMMANDS: list[Command] = [
    (
        "build",
        "Build images with docker buildx: [ARCH|PLATFORM ...] [--backend B[,B...]] "
        "[--load | --push | --push-by-digest | --oci PATH].",
        _add_arguments,
        _handler,
    )
]
