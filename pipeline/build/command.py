"""The whole `docker buildx build` command line of one job. No secret ever goes on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.build.plan import BuildJob
from pipeline.core.config import Project, VersionInfo
from pipeline.core.options import BuildOptions

# The named build context the templates take their support files (entrypoint...) from.
SUPPORT_CONTEXT = "support"
# Debian's system CA bundle (update-ca-certificates writes it).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Source:
    """What the build is of: the snapshot's commit, its date and upstream's build number."""

    commit: str
    source_date_epoch: int
    build_number: int | None


def cache_spec(value: str, export: bool) -> str:
    """REF -> registry cache, DIR -> local cache; a full `type=...` spec passes through."""
    if value.startswith("type=") or "," in value:
        return value
    looks_local = value.startswith(("/", "./", "../", "~")) or Path(value).is_dir()
    if looks_local:
        path = Path(value).expanduser()
        return f"type=local,dest={path},mode=max" if export else f"type=local,src={path}"
    return f"type=registry,ref={value},mode=max" if export else f"type=registry,ref={value}"


def _output_arguments(job: BuildJob, layout_dir: Path) -> list[str]:
    # rewrite-timestamp: every file dated SOURCE_DATE_EPOCH, so the same inputs give the same
    # layers and digests (an unchanged re-publish uploads nothing). The engine's own store
    # refuses it (it unpacks what it loads): local images only get the config's dates.
    if job.output == "load":
        return [*(a for tag in job.tags for a in ("--tag", tag)), "--load"]
    if job.output == "oci":
        assert job.oci_path is not None
        dest = f"dest={job.oci_path}"
    else:  # pushed from this layout by the registry client (pipeline/build/readback.py)
        dest = f"dest={layout_dir},tar=false"
    return ["--output", f"type=oci,{dest},name={job.tags[0]},rewrite-timestamp=true"]


def buildx_arguments(
    project: Project,
    job: BuildJob,
    version: VersionInfo,
    source: Source,
    options: BuildOptions,
    dockerfile: Path,
    layout_dir: Path,
    *,
    export: tuple[str, Path] | None = None,
    contexts: Mapping[str, Path] | None = None,
) -> list[str]:
    """The `docker buildx build` command line of `job`; pushed outputs go to `layout_dir`.
    With `export` (stage, directory): the command that writes that stage's files there instead
    (`sbom`: the image's inventory; `ccache-export`: the compiler cache), from the same cache:
    seconds after the image's own build."""
    created = datetime.fromtimestamp(source.source_date_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    build_args: dict[str, str] = {
        "LLAMA_CPP_COMMIT": source.commit,
        "LLAMA_CPP_BUILD_NUMBER": str(source.build_number or 0),
        "IMAGE_VERSION": version.version,
        "IMAGE_CREATED": created,
        "CPU_VARIANTS": job.cpu_variants,
        # BuildKit dates the image config and layers from it: same commit, same dates.
        "SOURCE_DATE_EPOCH": str(source.source_date_epoch),
    }
    if options.gpu_architectures and job.backend.gpu_architectures:
        build_args["GPU_ARCHITECTURES"] = options.gpu_architectures
    build_args.update(dict(options.build_args))
    args = ["docker", "buildx", "build"]
    if options.builder:
        args += ["--builder", options.builder]
    args += [
        "--progress=plain",
        "--file",
        str(dockerfile),
        "--build-context",
        f"{SUPPORT_CONTEXT}={project.dockerfiles_dir}",
        *(f"--build-context={name}={path}" for name, path in (contexts or {}).items()),
        "--platform",
        ",".join(p.name for p in job.platforms),
    ]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    if job.backend.web_ui and HOST_CA_BUNDLE.is_file():
        # npm in the `ui` stage trusts what this machine trusts (a TLS-intercepting proxy's CA).
        args += ["--secret", f"id=host-ca,src={HOST_CA_BUNDLE}"]
    if export is not None:  # from the cache the image's build just filled
        stage, directory = export
        return [
            *args,
            "--provenance=false",
            "--target",
            stage,
            "--output",
            f"type=local,dest={directory}",
            str(project.third_party),
        ]
    if options.attest and job.output in ("push", "push-by-digest"):
        # Provenance from BuildKit; the SBOM is the pipeline's own (pipeline/build/sbom.py): the
        # image is assembled file by file, so no scanner has to guess what is in it.
        args += ["--provenance=mode=max"]
    else:
        # Without attestations a single-platform push is one manifest, whose digest is the
        # platform's: what publish joins into the multi-platform index.
        args += ["--provenance=false"]
    if options.no_cache:
        args += ["--no-cache"]
    if options.no_cache_filter:
        args += ["--no-cache-filter", ",".join(options.no_cache_filter)]
    for value in options.cache_from:
        args += ["--cache-from", cache_spec(value, export=False)]
    for value in options.cache_to:
        args += ["--cache-to", cache_spec(value, export=True)]
    args += _output_arguments(job, layout_dir)
    args.append(str(project.third_party))
    return args
