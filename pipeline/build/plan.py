"""What a build request becomes: one buildx invocation (a BuildJob) per backend and output, and
the checks that a builder can carry them out. Every usage error is raised here, before work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import VersionInfo
from pipeline.core.errors import BuildError, UsageError
from pipeline.core.options import BuildOptions
from pipeline.matrix import Backend, Matrix, TargetPlatform, host_platform
from pipeline.oci.buildx import BuilderInfo
from pipeline.records import Output


@dataclass(frozen=True)
class BuildJob:
    """One `docker buildx build` invocation: one backend, one or more platforms."""

    backend: Backend
    platforms: tuple[TargetPlatform, ...]
    output: Output
    tags: tuple[str, ...]  # full references; for push-by-digest, the repository name
    repository: str
    cpu_variants: str
    oci_path: Path | None = None
    host_only: bool = False  # the variant set is this machine's CPU only (matrix.yaml)

    @property
    def key(self) -> str:
        """`cpu-amd64`: the name of its log and of its OCI layout directory."""
        return f"{self.backend.name}-{'-'.join(p.arch for p in self.platforms)}"


def split_repository(reference: str) -> tuple[str, str | None]:
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


def _job(
    backend: Backend,
    platforms: tuple[TargetPlatform, ...],
    output: Output,
    tags: tuple[str, ...],
    variants: str,
    oci_path: Path | None = None,
    host_only: bool = False,
) -> BuildJob:
    return BuildJob(
        backend,
        platforms,
        output,
        tags,
        split_repository(tags[0])[0],
        variants,
        oci_path,
        host_only,
    )


def _oci_path(path: Path, backend: str, several_backends: bool) -> Path:
    if several_backends and path.suffix == ".tar":
        raise UsageError(
            f"--oci {path}: several backends need a directory, not a .tar file",
            "give a directory: each backend goes to <dir>/<backend>.tar",
        )
    return path if path.suffix == ".tar" else path / f"{backend}.tar"


def _check_host_only(name: str, options: BuildOptions) -> None:
    """A set compiled for this machine's CPU: only its own platform, and never a release push."""
    others = [p for p in options.platforms if p != host_platform()]
    if others:
        raise UsageError(
            f"--cpu-variants {name} compiles for this machine's CPU, which cannot run "
            f"{', '.join(others)}",
            "build other platforms with --cpu-variants all or baseline",
        )
    if options.output == "push-by-digest":
        raise UsageError(
            f"--cpu-variants {name} is a local try-out, not a release build: it is never pushed "
            "by digest for publishing",
            "release builds use --cpu-variants all (the default for pushes)",
        )


def plan_jobs(options: BuildOptions, matrix: Matrix, version: VersionInfo) -> list[BuildJob]:
    """The buildx invocations for a request; every usage error is raised here, before any work."""
    targets = matrix.targets(options.backends, options.platforms)
    if options.cpu_variants is not None:
        chosen = matrix.cpu_variant_set(options.cpu_variants)
        if chosen.host_only:
            _check_host_only(chosen.name, options)
    tags = tuple(_full_tag(t, version.image) for t in options.tags)
    several_platforms = len(options.platforms) > 1
    several_backends = len(options.backends) > 1
    jobs: list[BuildJob] = []
    for backend_name in dict.fromkeys(t.backend.name for t in targets):
        backend = matrix.backend(backend_name)
        platforms = tuple(t.platform for t in targets if t.backend.name == backend_name)
        variants = options.cpu_variants or backend.cpu_variants
        default_tag = f"{version.image}:{version.version}-{backend.name}"
        host_only = matrix.cpu_variant_set(variants).host_only
        # Never mistaken for a release build: a host-only build's tags say whose CPU it is for.
        local = f"-{variants}" if host_only else ""
        if options.output == "load":
            # One local image per platform: the engine's store keeps one platform per tag.
            if tags and (several_platforms or several_backends):
                raise UsageError(
                    "--tag with --load names one image, but this builds one per backend and "
                    "platform",
                    "build one backend and platform, or drop --tag (tags end in -<backend>-<arch>)",
                )
            for platform in platforms:
                job_tags = tags or (f"{default_tag}-{platform.arch}{local}",)
                jobs.append(
                    _job(backend, (platform,), "load", job_tags, variants, host_only=host_only)
                )
        elif options.output == "push-by-digest":
            if len(tags) > 1:
                raise UsageError("--push-by-digest takes one --tag: the repository to push to")
            repository, tag = split_repository(tags[0]) if tags else (version.image, None)
            if tag:
                raise UsageError(
                    f"--tag {options.tags[0]}: --push-by-digest pushes no tag",
                    "give the repository only, e.g. --tag 127.0.0.1:5000/acme/llama-server",
                )
            # One push per platform, so each record holds that platform's own manifest digest.
            for platform in platforms:
                jobs.append(_job(backend, (platform,), "push-by-digest", (repository,), variants))
        elif options.output == "push":
            if tags and several_backends:
                raise UsageError(
                    "--tag with --push and several backends would push them all to one tag",
                    "push one backend per call",
                )
            suffix = "" if several_platforms else f"-{platforms[0].arch}"
            jobs.append(
                _job(
                    backend,
                    platforms,
                    "push",
                    tags or (f"{default_tag}{suffix}{local}",),
                    variants,
                    host_only=host_only,
                )
            )
        else:  # oci
            assert options.oci_path is not None
            path = _oci_path(options.oci_path, backend.name, several_backends)
            jobs.append(
                _job(
                    backend,
                    platforms,
                    "oci",
                    tags or (f"{default_tag}{local}",),
                    variants,
                    path,
                    host_only,
                )
            )
    return jobs


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
        if job.output == "load" and not builder.loads_into_engine:
            raise UsageError(
                f"--load: buildx builder {builder.name!r} (driver {builder.driver}) cannot "
                "load into the local engine",
                "use --push or --oci PATH with this builder",
            )
