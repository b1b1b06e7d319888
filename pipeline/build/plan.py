"""What a build request becomes: one buildx invocation (a BuildJob) per backend and output, and
the checks that a builder can carry them out. Every usage error is raised here, before work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.build.options import BuildOptions
from pipeline.core.errors import BuildError, RegistryError, UsageError
from pipeline.matrix import Backend, CpuVariantSet, TargetPlatform, host_platform
from pipeline.oci.buildx import BuilderInfo
from pipeline.oci.image import split_reference
from pipeline.records import PUSHED_OUTPUTS, Output


@dataclass(frozen=True)
class BuildJob:
    """One `docker buildx build` invocation: one backend, one or more platforms."""

    backend: Backend
    platforms: tuple[TargetPlatform, ...]
    output: Output
    tags: tuple[str, ...]  # full references; for push-by-digest, the repository name
    repository: str
    cpu_variants: CpuVariantSet
    # The GPU targets compiled (a GPU backend: the matrix's list unless asked for fewer).
    gpu_architectures: tuple[str, ...] | None = None
    oci_path: Path | None = None

    @property
    def host_only(self) -> bool:
        """Compiled for this machine's CPU only (matrix.yaml): a local try-out."""
        return self.cpu_variants.host_only

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
    """`dev` -> `<image>:dev`; a reference with a name passes through. Either must be an image
    reference (buildx would take it only once the build is done)."""
    full = tag if "/" in tag or ":" in tag else f"{image}:{tag}"
    try:
        split_reference(full)
    except RegistryError as exc:
        raise UsageError(f"--tag {tag!r}: {exc.message}", "give name[:tag], or a tag") from None
    return full


def _job(
    options: BuildOptions,
    backend: Backend,
    platforms: tuple[TargetPlatform, ...],
    output: Output,
    tags: tuple[str, ...],
    oci_path: Path | None = None,
) -> BuildJob:
    variants = options.cpu_variants or options.matrix.cpu_variant_set(backend.cpu_variants)
    gpu = None
    if backend.gpu_architectures_flag is not None:
        gpu = options.gpu_architectures or backend.gpu_architectures
    if gpu and backend.rocm is not None and (missing := backend.rocm.unshipped(gpu)):
        shipped = ", ".join(backend.rocm.rocblas_architectures)
        raise UsageError(
            f"--gpu-architectures {','.join(gpu)}: rocBLAS has no kernels for "
            f"{', '.join(missing)}, so {backend.name} cannot serve them",
            f"the targets Debian's rocBLAS ships (matrix.yaml): {shipped}",
        )
    return BuildJob(
        backend,
        platforms,
        output,
        tags,
        split_repository(tags[0])[0],
        variants,
        gpu,
        oci_path,
    )


def _oci_path(path: Path, backend: str, several_backends: bool) -> Path:
    if several_backends and path.suffix == ".tar":
        raise UsageError(
            f"--oci {path}: several backends need a directory, not a .tar file",
            "give a directory: each backend goes to <dir>/<backend>.tar",
        )
    return path if path.suffix == ".tar" else path / f"{backend}.tar"


def _check_host_only(variants: CpuVariantSet, options: BuildOptions) -> None:
    """A set compiled for this machine's CPU: only its own platform, and never a release push."""
    others = [p.name for p in options.platforms if p.name != host_platform()]
    if others:
        raise UsageError(
            f"--cpu-variants {variants.name} compiles for this machine's CPU, which cannot run "
            f"{', '.join(others)}",
            "build other platforms with --cpu-variants all or baseline",
        )
    if options.output in PUSHED_OUTPUTS:
        raise UsageError(
            f"--cpu-variants {variants.name} is a local try-out, not a release build: it is "
            f"never pushed (--{options.output})",
            "release builds use --cpu-variants all (the default for pushes)",
        )


def plan_jobs(options: BuildOptions) -> list[BuildJob]:
    """The buildx invocations for a request; every usage error is raised here, before any work."""
    targets = options.matrix.targets(options.backends, options.platforms)
    if options.cpu_variants is not None and options.cpu_variants.host_only:
        _check_host_only(options.cpu_variants, options)
    version = options.version
    tags = tuple(_full_tag(t, version.image) for t in options.tags)
    several_platforms = len(options.platforms) > 1
    several_backends = len(options.backends) > 1
    jobs: list[BuildJob] = []
    for backend in {t.backend.name: t.backend for t in targets}.values():
        platforms = tuple(t.platform for t in targets if t.backend.name == backend.name)
        carried = options.ccache_from is not None or options.ccache_to is not None
        if carried and len(platforms) > 1 and options.output in ("push", "oci"):
            raise UsageError(
                "--ccache-from/--ccache-to carry one architecture's compiler cache per build",
                "build one platform per call (the release does: --push-by-digest per platform)",
            )
        variants = options.cpu_variants or options.matrix.cpu_variant_set(backend.cpu_variants)
        default_tag = f"{version.image}:{version.version}-{backend.name}"
        # Never mistaken for a release build: a host-only build's tags say whose CPU it is for.
        local = f"-{variants.name}" if variants.host_only else ""
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
                jobs.append(_job(options, backend, (platform,), "load", job_tags))
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
                jobs.append(_job(options, backend, (platform,), "push-by-digest", (repository,)))
        elif options.output == "push":
            if tags and several_backends:
                raise UsageError(
                    "--tag with --push and several backends would push them all to one tag",
                    "push one backend per call",
                )
            suffix = "" if several_platforms else f"-{platforms[0].arch}"
            job_tags = tags or (f"{default_tag}{suffix}{local}",)
            jobs.append(_job(options, backend, platforms, "push", job_tags))
        else:  # oci
            assert options.oci_path is not None
            path = _oci_path(options.oci_path, backend.name, several_backends)
            job_tags = tags or (f"{default_tag}{local}",)
            jobs.append(_job(options, backend, platforms, "oci", job_tags, path))
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
