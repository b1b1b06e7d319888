"""The whole `docker buildx build` command line of one job, for its image or for one stage's
files written out from the same cache. No secret ever goes on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.build.options import BuildOptions
from pipeline.build.plan import BuildJob

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


@dataclass(frozen=True)
class BuildCommand:
    """One job's buildx invocations: its image, and (from the cache the image's build just
    filled, seconds after it) the files of one of its stages (`sbom`: the image's inventory;
    `ccache-export`: the compiler cache)."""

    options: BuildOptions
    job: BuildJob
    source: Source
    dockerfile: Path
    contexts: Mapping[str, Path] = field(default_factory=dict)  # named contexts besides support
    build_args: tuple[tuple[str, str], ...] = ()  # besides the options' own

    def _common(self) -> list[str]:
        options, job, source = self.options, self.job, self.source
        created = datetime.fromtimestamp(source.source_date_epoch, UTC)
        build_args: dict[str, str] = {
            "LLAMA_CPP_COMMIT": source.commit,
            "LLAMA_CPP_BUILD_NUMBER": str(source.build_number or 0),
            "IMAGE_VERSION": options.version.version,
            "IMAGE_CREATED": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "CPU_VARIANTS": job.cpu_variants.name,
            # BuildKit dates the image config and layers from it: same commit, same dates.
            "SOURCE_DATE_EPOCH": str(source.source_date_epoch),
        }
        if job.gpu_architectures:
            build_args["GPU_ARCHITECTURES"] = ";".join(job.gpu_architectures)
        build_args.update(dict(options.build_args))
        build_args.update(dict(self.build_args))
        args = ["docker", "buildx", "build"]
        if options.builder:
            args += ["--builder", options.builder]
        args += [
            "--progress=plain",
            "--file",
            str(self.dockerfile),
            "--build-context",
            f"{SUPPORT_CONTEXT}={options.project.image_files_dir}",
            *(f"--build-context={name}={path}" for name, path in self.contexts.items()),
            "--platform",
            ",".join(p.name for p in job.platforms),
        ]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        if job.backend.web_ui and HOST_CA_BUNDLE.is_file():
            # npm in the `ui` stage trusts what this machine trusts (a TLS-intercepting proxy).
            args += ["--secret", f"id=host-ca,src={HOST_CA_BUNDLE}"]
        return args

    def image(self, layout_dir: Path) -> list[str]:
        """The command that builds the job's image; pushed outputs go to `layout_dir`."""
        options = self.options
        args = self._common()
        if options.attest and self.job.output in ("push", "push-by-digest"):
            # Provenance from BuildKit; the SBOM is the pipeline's own (pipeline/build/sbom.py):
            # the image is assembled file by file, so no scanner has to guess what is in it.
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
        args += _output_arguments(self.job, layout_dir)
        args.append(str(options.project.third_party))
        return args

    def stage_files(self, stage: str, directory: Path) -> list[str]:
        """The command that writes `stage`'s files into `directory`."""
        return [
            *self._common(),
            "--provenance=false",
            "--target",
            stage,
            "--output",
            f"type=local,dest={directory}",
            str(self.options.project.third_party),
        ]
