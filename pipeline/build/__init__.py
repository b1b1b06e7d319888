"""`nox -s build`: images from the rendered Dockerfiles with `docker buildx build`.

Takes the verified snapshot (sync's record) and the rendered Dockerfiles (render's, refused when
stale), checks what a build needs (engine, buildx, a builder able to run the target's code where
the backend runs any), runs buildx (full log under build/logs/, one line per step on the
terminal), asks where the image went what came out, and writes one record per (backend,
platform): build/reports/build-<backend>-<arch>.json, which smoke and publish read.

Outputs: `--load` (default) loads each platform into the engine as its own image, tagged
<image>:<version>-<backend>-<arch>; `--push` pushes one multi-platform image per backend;
`--push-by-digest` pushes each platform untagged (the release workflow: publish joins the
digests later); `--oci PATH` writes an OCI layout tarball.
"""

from __future__ import annotations

import argparse
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from pipeline.build.carry import CCACHE_SEED_CONTEXT, ccache_dir, ccache_seed
from pipeline.build.command import Source, buildx_arguments
from pipeline.build.plan import BuildJob, check_builder_platforms, check_output_support, plan_jobs
from pipeline.build.readback import collect_records, push_layout
from pipeline.build.sbom import cyclonedx, read_inventory, write_sbom
from pipeline.build.toolkit import TOOLKIT_CONTEXT, toolkit_context
from pipeline.core import console
from pipeline.core.config import COMMIT_RE, VersionInfo, load_version
from pipeline.core.errors import UsageError
from pipeline.core.options import BuildOptions, Command, add_build_arguments, resolve_build
from pipeline.matrix import load_matrix
from pipeline.matrix.dockerfile import current_dockerfile
from pipeline.oci.buildx import check_buildx, inspect_builder, run_buildx
from pipeline.oci.ccache import ccache_bytes, replaced_directory
from pipeline.oci.engine import docker_client
from pipeline.records import PUSHED_OUTPUTS, BuildRecord, write_record
from pipeline.records.snapshot import Snapshot, check_snapshot

__all__ = ["COMMANDS", "build"]

_BUILD_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_build_args(options: BuildOptions) -> None:
    for key, _ in options.build_args:
        if not _BUILD_ARG_RE.match(key):
            raise UsageError(f"--build-arg {key}=...: not a build arg name")
    override = dict(options.build_args).get("LLAMA_CPP_COMMIT")
    if override is not None and not COMMIT_RE.match(override):
        raise UsageError(f"--build-arg LLAMA_CPP_COMMIT={override}: expected a full 40-hex sha")


def build(options: BuildOptions, snapshot: Snapshot) -> list[BuildRecord]:
    """Build every job of `options` from `snapshot`; each job's records are written as soon as
    it is done (a later failure keeps them), and all of them are returned."""
    project = options.project
    matrix = load_matrix()
    version = load_version(project.version_file)
    jobs = plan_jobs(options, matrix, version)
    _check_build_args(options)
    dockerfiles = {
        job.backend.name: options.dockerfile
        or current_dockerfile(project, matrix, job.backend, version)
        for job in jobs
    }
    source = Source(snapshot.commit, snapshot.source_date_epoch, snapshot.build_number)
    client = docker_client()
    check_buildx()
    builder = inspect_builder(options.builder)
    check_builder_platforms(builder, jobs)
    check_output_support(builder, jobs)
    records: list[BuildRecord] = []
    for job in jobs:
        records += _run_job(options, job, version, source, dockerfiles[job.backend.name], client)
    return records


def _run_job(
    options: BuildOptions,
    job: BuildJob,
    version: VersionInfo,
    source: Source,
    dockerfile: Path,
    client: object,
) -> list[BuildRecord]:
    project = options.project
    if job.oci_path is not None:
        job.oci_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = project.logs_dir / f"build-{job.key}.log"
    layout_dir = project.build_dir / "oci" / job.key
    shutil.rmtree(layout_dir, ignore_errors=True)
    contexts = _contexts(options, job)
    args = buildx_arguments(
        project, job, version, source, options, dockerfile, layout_dir, contexts=contexts
    )
    if not options.quiet:
        console.err.print(f"building {job.key} ({job.output}; log: {log_path})", markup=False)
        if job.host_only:
            console.err.print(
                f"cpu variants: {job.cpu_variants}: kernels for this machine's CPU only (its "
                f"instruction sets), a local try-out tagged {job.tags[0]}, not a release build; "
                "releases compile every variant (--cpu-variants all)",
                markup=False,
                soft_wrap=True,
            )
    seconds = run_buildx(
        args, log_path, job.key, quiet=options.quiet, time_limit=options.time_limit
    )
    pushed = push_layout(job, layout_dir) if job.output in PUSHED_OUTPUTS else None
    sboms = {}
    if job.backend.runtime.kind == "scratch":  # assembled file by file: its inventory is known
        sboms = _export_sboms(options, job, version, source, dockerfile, contexts)
    if options.ccache_to is not None:
        directory = ccache_dir(options.ccache_to, job)
        with replaced_directory(directory) as staging:
            # A fresh id: the copy of the mount runs now, never from the layer cache.
            fresh = replace(
                options, build_args=(*options.build_args, ("CCACHE_EXPORT_ID", uuid.uuid4().hex))
            )
            export = _StageExport(fresh, job, version, source, dockerfile, contexts)
            export.run("ccache-export", staging, "ccache")
        if not options.quiet:
            carried = ccache_bytes(directory)
            console.err.print(f"ccache: {carried / 1e6:.1f} MB in {directory}", markup=False)
    records = collect_records(job, seconds, source.commit, version.version, client, pushed, sboms)
    for record in records:
        write_record(project.reports_dir, record)
    return records


def _contexts(options: BuildOptions, job: BuildJob) -> dict[str, Path]:
    """Named build contexts besides `support`: a wheels-based CUDA toolkit, a ccache seed."""
    contexts: dict[str, Path] = {}
    seed = ccache_seed(options.ccache_from, job) if options.ccache_from is not None else None
    if seed is not None:
        contexts[CCACHE_SEED_CONTEXT] = seed
    cuda = job.backend.cuda
    if cuda is not None and cuda.toolkit == "wheels":
        directory = options.project.build_dir / "toolkit" / job.key
        contexts[TOOLKIT_CONTEXT] = toolkit_context(job.backend, job.platforms, directory)
    return contexts


@dataclass(frozen=True)
class _StageExport:
    """One stage of a job's Dockerfile written out as files, from the cache its build filled
    (the SBOM's inventory, the compiler cache): seconds after the image's own build."""

    options: BuildOptions
    job: BuildJob
    version: VersionInfo
    source: Source
    dockerfile: Path
    contexts: dict[str, Path]

    def run(self, stage: str, dest: Path, log: str) -> None:
        project = self.options.project
        args = buildx_arguments(
            project,
            self.job,
            self.version,
            self.source,
            self.options,
            self.dockerfile,
            dest,
            export=(stage, dest),
            contexts=self.contexts,
        )
        run_buildx(args, project.logs_dir / f"{log}-{self.job.key}.log", self.job.key, quiet=True)


def _export_sboms(
    options: BuildOptions,
    job: BuildJob,
    version: VersionInfo,
    source: Source,
    dockerfile: Path,
    contexts: dict[str, Path],
) -> dict[str, str]:
    """platform -> the file name of its CycloneDX SBOM (in build/reports/), from the inventory
    the image's rootfs stage made, exported from the build's cache."""
    project = options.project
    dest = project.build_dir / "sbom" / job.key
    shutil.rmtree(dest, ignore_errors=True)
    _StageExport(options, job, version, source, dockerfile, contexts).run("sbom", dest, "sbom")
    created = datetime.fromtimestamp(source.source_date_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    names: dict[str, str] = {}
    for platform in job.platforms:
        inventory = dest / "files.tsv"
        if len(job.platforms) > 1:  # the local exporter splits several platforms
            inventory = dest / platform.name.replace("/", "_") / "files.tsv"
        document = cyclonedx(
            read_inventory(inventory),
            image=job.repository,
            version=version.version,
            platform=platform.name,
            commit=source.commit,
            created=created,
        )
        name = f"sbom-{job.backend.name}-{platform.arch}.cdx.json"
        write_sbom(project.reports_dir / name, document)
        names[platform.name] = name
    shutil.rmtree(dest, ignore_errors=True)
    return names


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f} MB"


def records_table(records: Sequence[BuildRecord]) -> Table:
    table = Table(title="images built")
    for column in ("backend", "platform", "ref", "digest", "size", "seconds"):
        # Refs and digests are copied from here: fold them, never cut them.
        table.add_column(
            column,
            justify="right" if column in ("size", "seconds") else "left",
            overflow="fold",
            no_wrap=column not in ("ref", "digest"),
        )
    for r in records:
        table.add_row(r.backend, r.platform, r.ref, r.digest, _mb(r.size_bytes), f"{r.seconds:.0f}")
    return table


def _run(args: argparse.Namespace) -> int:
    options = resolve_build(args)
    records = build(options, check_snapshot(options.project))
    console.out.print(records_table(records))
    for record in records:
        path = options.project.reports_dir / record.filename
        console.err.print(f"report: {options.project.shown(path)}", markup=False)
    return 0


COMMANDS = (
    Command(
        "build",
        "Build images with docker buildx: [ARCH|PLATFORM ...] [--backend B[,B...]] "
        "[--load | --push | --push-by-digest | --oci PATH].",
        add_build_arguments,
        _run,
    ),
)
