"""`nox -s smoke`: run an image and check its live server before anything is published.

Takes the build records (build's hand-off: which image, which digest, which backend) or an
IMAGE named on the command line, and a model (generated, local, or from a Hub), validated
before any container starts. Each container's life is owned by one context manager
(pipeline.oci.engine.ServerContainer); each check is named, timed and recorded
(pipeline/smoke/run.py). The record, build/reports/smoke-<backend>-<arch>.json (and JUnit
with --report), is what publish requires before it lets a digest out.
"""

from __future__ import annotations

import argparse
import shlex
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.core.arguments import Command
from pipeline.core.console import err
from pipeline.core.errors import ModelError, SmokeError, UsageError
from pipeline.core.project import Project
from pipeline.matrix import Backend
from pipeline.modelfiles.catalogue import catalogue_model, ensure_catalogue_model
from pipeline.modelfiles.gguf import download_hf_model, ensure_model, validate_gguf
from pipeline.oci.credentials import RegistryAccess
from pipeline.oci.engine import (
    BUILD_HINT,
    docker_client,
    has_digest,
    image_digest,
    local_image,
    pull,
)
from pipeline.oci.image import split_reference
from pipeline.records import (
    CPUS_TIER,
    MODEL_TIERS,
    NO_GPU_TIER,
    REAL_TIER,
    BuildRecord,
    SmokeRecord,
    find_build_record,
    load_build_records,
    write_record,
)

# The checks register themselves where they are defined, in this order.
from pipeline.smoke import checks, router, rpc, tiers  # noqa: F401
from pipeline.smoke.cpus import run_cpus
from pipeline.smoke.junit import junit_xml, print_record
from pipeline.smoke.options import ModelSource, SmokeOptions, add_smoke_arguments, resolve_smoke
from pipeline.smoke.real import run_real
from pipeline.smoke.run import ModelMount, SmokeRun, SmokeTarget
from pipeline.smoke.settings import Settings, load_settings

__all__ = ["COMMANDS", "smoke"]

# The model tiers' own runs; the other tiers are SmokeRun.run.
MODEL_TIER_RUNS = {REAL_TIER: run_real, CPUS_TIER: run_cpus}


def resolve_model(
    project: Project, source: ModelSource, settings: Settings, tier: str | None = None
) -> ModelMount:
    """Validate the model before any container starts; refuse anything that is not GGUF, and
    for the real tier anything but its catalogue model's pinned bytes."""
    if tier in MODEL_TIERS or source.preset:
        if tier in MODEL_TIERS and (source.path or source.hf_repo or source.preset):
            raise UsageError(
                f"the {tier} tier runs its own model (smoke.yaml's real.model), not "
                "--model/--hf-repo/--preset",
                "drop the model option, or run another tier",
            )
        entry = catalogue_model(source.preset or settings.real.model)
        if entry.sha256 is None:
            raise ModelError(
                f"preset {entry.name} is not pinned (no sha256 in the catalogue): smoke runs "
                "pinned models only",
                f"pull it (nox -s models -- pull {entry.name}) and pin what it prints",
            )
        path = ensure_catalogue_model(entry)
        label = f"catalogue:{entry.name}@{entry.sha256[:12]}"
        info = validate_gguf(path)
    elif source.hf_repo and source.hf_file:
        hub_model = download_hf_model(source.hf_repo, source.hf_file, source.hf_revision)
        path, info = hub_model.path, hub_model.info
        label = f"hf:{source.hf_repo}/{source.hf_file}@{hub_model.commit or hub_model.revision}"
    else:
        path = source.path or ensure_model(project)
        label = str(path) if source.path else f"generated:{path.name}"
        info = validate_gguf(path)
    if not path.stat().st_mode & 0o004:
        raise ModelError(
            f"model file {path} is not readable by others (mode {path.stat().st_mode & 0o777:o}); "
            "the container's non-root user could not open it",
            f"chmod a+r {shlex.quote(str(path))}",
        )
    # Keep the model's own file name inside the container: llama-server names it in /props.
    name = path.name if path.name.endswith(".gguf") else f"{path.name}.gguf"
    container_path = f"{settings.server.model_dir}/{name}"
    return ModelMount(path, info, container_path, label)


def _ensure_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise SmokeError(
                f"port {port} on 127.0.0.1 is in use",
                "choose another --port, or omit --port to use a free one",
            ) from None


def _targets(
    client: Any, options: SmokeOptions, builds: Sequence[BuildRecord]
) -> list[SmokeTarget]:
    """What to run per platform: the build record's image, or IMAGE (with the backend and
    digest of a build record naming it, if one does; else the digest it names, if any)."""
    targets = []
    for platform in options.platforms:
        built = [b for b in builds if b.platform == platform.name]
        if options.image is None:
            reports = options.project.reports_dir
            record = find_build_record(built, options.backend.name, platform.name, reports)
            backend = options.matrix.backend(record.backend)
            targets.append(SmokeTarget(record.ref, platform, backend, record.digest))
            continue
        named = [b for b in built if b.ref == options.image]
        backend = options.matrix.backend(named[-1].backend) if named else options.backend
        digest = named[-1].digest if named else options.image.partition("@")[2] or None
        targets.append(SmokeTarget(options.image, platform, backend, digest))
    return [_present(client, target, options.access) for target in targets]


def _present(client: Any, target: SmokeTarget, access: RegistryAccess) -> SmokeTarget:
    """The target's image in the engine, pulled for its platform when the engine lacks it and
    it names a digest (a pushed image), and checked to be the digest the build recorded."""
    image = local_image(client, target.image)
    if image is None and "@" in target.image:
        registry = split_reference(target.image)[0].registry
        image = pull(client, target.image, target.platform.name, access.credentials(registry))
    if image is None:
        raise SmokeError(f"image {target.image} not found locally", BUILD_HINT)
    if target.digest is None:  # an image that speaks for itself
        return target._replace(digest=image_digest(image))
    if not has_digest(image, target.digest):
        raise SmokeError(
            f"{target.image} in the engine is {image_digest(image)}, but the build recorded "
            f"{target.digest}",
            "smoke tests exactly what was built: rebuild, or pull that digest",
        )
    return target


def default_tier(backend: Backend) -> str:
    """`gpu` where the backend has that tier and this machine shows its GPU, else `no-gpu`."""
    return "gpu" if backend.smoke.gpu_visible() else NO_GPU_TIER


def write_smoke_record(
    record: SmokeRecord, project: Project, report_dir: Path | None
) -> list[Path]:
    """The record into build/reports/ always; JSON and JUnit into `report_dir` too."""
    written = [write_record(project.reports_dir, record)]
    if report_dir is not None:
        written.append(write_record(report_dir, record))
        xml = report_dir / f"{record.stem}.xml"
        xml.write_text(junit_xml([record]), encoding="utf-8")
        written.append(xml)
    return written


def smoke(options: SmokeOptions, builds: Sequence[BuildRecord]) -> list[SmokeRecord]:
    """Smoke-test the image of every platform asked for; each record is written as soon as
    its run ends. SmokeError afterwards when any check failed."""
    project = options.project
    settings = load_settings()
    model = resolve_model(project, options.model, settings, options.tier)
    if options.port is not None:
        _ensure_port_free(options.port)
    client = docker_client()
    records: list[SmokeRecord] = []
    failures = []
    for target in _targets(client, options, builds):
        special = options.tier in MODEL_TIERS
        # The real and cpus tiers run in the environment of the backend's device tier.
        tier = default_tier(target.backend) if special or not options.tier else options.tier
        shown = f"{options.tier} (on {tier})" if special else tier
        err.print(
            f"smoke: {target.image} on {target.platform.name} with {model.label}, tier {shown}"
        )
        run = SmokeRun(
            client,
            target,
            model,
            settings,
            commit=options.version.llama_cpp.commit,
            tier=tier,
            host_port=options.port,
            healthy_timeout=options.healthy_timeout,
        )
        model_run = MODEL_TIER_RUNS.get(options.tier or "")
        record = model_run(run) if model_run else run.run()
        write_smoke_record(record, project, options.report_dir)
        print_record(record)
        records.append(record)
        if not record.passed:
            failures.append(f"{target.platform.name}: {', '.join(record.failed)}")
    if failures:
        raise SmokeError(
            f"smoke failed ({'; '.join(failures)})", "see the table and log lines above"
        )
    return records


def _run(args: argparse.Namespace) -> int:
    options = resolve_smoke(args)
    smoke(options, load_build_records(options.project.reports_dir))
    return 0


COMMANDS = (
    Command(
        "smoke",
        "Run an image and check its live server (health, completions, embeddings, entrypoint).",
        add_smoke_arguments,
        _run,
    ),
)
