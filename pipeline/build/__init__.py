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
import shutil
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from pipeline.build.carry import CCACHE_SEED_CONTEXT, ccache_dir, ccache_seed
from pipeline.build.command import BuildCommand, Source
from pipeline.build.options import BuildOptions, add_build_arguments, resolve_build
from pipeline.build.plan import BuildJob, check_builder_platforms, check_output_support, plan_jobs
from pipeline.build.readback import check_push_access, collect_records, push_layout
from pipeline.build.sbom import cyclonedx, read_inventory, write_sbom
from pipeline.build.toolkit import TOOLKIT_CONTEXT, toolkit_context
from pipeline.core import console
from pipeline.core.arguments import Command
from pipeline.matrix.dockerfile import current_dockerfile
from pipeline.oci.buildx import check_buildx, inspect_builder, run_buildx
from pipeline.oci.ccache import ccache_bytes, replaced_directory
from pipeline.oci.engine import docker_client
from pipeline.records import PUSHED_OUTPUTS, BuildRecord, write_record
from pipeline.records.snapshot import Snapshot, check_snapshot

__all__ = ["COMMANDS", "build"]


def build(options: BuildOptions, snapshot: Snapshot) -> list[BuildRecord]:
    """Build every job of `options` from `snapshot`; each job's records are written as soon as
    it is done (a later failure keeps them), and all of them are returned."""
    jobs = plan_jobs(options)
    dockerfiles = {
        job.backend.name: options.dockerfile
        or current_dockerfile(options.project, options.matrix, job.backend, options.version)
        for job in jobs
    }
    source = Source(snapshot.commit, snapshot.source_date_epoch, snapshot.build_number)
    client = docker_client()
    check_buildx()
    builder = inspect_builder(options.builder)
    check_builder_platforms(builder, jobs)
    check_output_support(builder, jobs)
    check_push_access(jobs, options.access)
    records: list[BuildRecord] = []
    for job in jobs:
        command = BuildCommand(
            options, job, source, dockerfiles[job.backend.name], _contexts(options, job)
        )
        records += _run_job(command, client)
    return records


def _run_job(command: BuildCommand, client: object) -> list[BuildRecord]:
    """Build one job's image, push it (pushed outputs), write its SBOMs and compiler cache out,
    and record what came out."""
    options, job = command.options, command.job
    project = options.project
    if job.oci_path is not None:
        job.oci_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = project.logs_dir / f"build-{job.key}.log"
    layout_dir = project.build_dir / "oci" / job.key
    shutil.rmtree(layout_dir, ignore_errors=True)
    if not options.quiet:
        console.err.print(f"building {job.key} ({job.output}; log: {log_path})", markup=False)
        if job.host_only:
            console.err.print(
                f"cpu variants: {job.cpu_variants.name}: kernels for this machine's CPU only "
                f"(its instruction sets), a local try-out tagged {job.tags[0]}, not a release "
                "build; releases compile every variant (--cpu-variants all)",
                markup=False,
                soft_wrap=True,
            )
    seconds = run_buildx(
        command.image(layout_dir),
        log_path,
        job.key,
        quiet=options.quiet,
        time_limit=options.time_limit,
    )
    pushed = push_layout(job, layout_dir, options.access) if job.output in PUSHED_OUTPUTS else None
    sboms = {}
    if job.backend.runtime.kind == "scratch":  # assembled file by file: its inventory is known
        sboms = _export_sboms(command)
    if options.ccache_to is not None:
        _export_ccache(command, ccache_dir(options.ccache_to, job))
    version = options.version.version
    records = collect_records(job, seconds, command.source.commit, version, client, pushed, sboms)
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


def _stage_files(command: BuildCommand, stage: str, dest: Path, log: str) -> None:
    """One stage of the job's Dockerfile written out as files, from the cache its build filled
    (the SBOM's inventory, the compiler cache): seconds after the image's own build."""
    logs = command.options.project.logs_dir
    job = command.job
    run_buildx(command.stage_files(stage, dest), logs / f"{log}-{job.key}.log", job.key, quiet=True)


def _export_ccache(command: BuildCommand, directory: Path) -> None:
    with replaced_directory(directory) as staging:
        # A fresh id: the copy of the mount runs now, never from the layer cache.
        fresh = BuildCommand(
            command.options,
            command.job,
            command.source,
            command.dockerfile,
            command.contexts,
            (("CCACHE_EXPORT_ID", uuid.uuid4().hex),),
        )
        _stage_files(fresh, "ccache-export", staging, "ccache")
    if not command.options.quiet:
        carried = ccache_bytes(directory)
        console.err.print(f"ccache: {carried / 1e6:.1f} MB in {directory}", markup=False)


def _export_sboms(command: BuildCommand) -> dict[str, str]:
    """platform -> the file name of its CycloneDX SBOM (in build/reports/), from the inventory
    the image's rootfs stage made, exported from the build's cache."""
    options, job, source = command.options, command.job, command.source
    project = options.project
    dest = project.build_dir / "sbom" / job.key
    shutil.rmtree(dest, ignore_errors=True)
    _stage_files(command, "sbom", dest, "sbom")
    created = datetime.fromtimestamp(source.source_date_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    names: dict[str, str] = {}
    for platform in job.platforms:
        inventory = dest / "files.tsv"
        if len(job.platforms) > 1:  # the local exporter splits several platforms
            inventory = dest / platform.name.replace("/", "_") / "files.tsv"
        document = cyclonedx(
            read_inventory(inventory),
            image=job.repository,
            version=options.version.version,
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
    plan_jobs(options)  # every usage error of the request before the snapshot is even read
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
