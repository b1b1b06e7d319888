"""arm64: our arm64 cold build (cross-compiled) ÷ our amd64 cold build, and the same arm64
build forced through QEMU (builder on the target platform), bounded."""

from __future__ import annotations

from pipeline.bench import upstream as up
from pipeline.bench.builds import build_record, ninja_progress, salted_dockerfile
from pipeline.bench.core import Bench, BenchBuild, Measured
from pipeline.bench.report import Figure, Goal, Metric
from pipeline.core.errors import BuildTimedOut, UsageError
from pipeline.oci.image import split_reference
from pipeline.oci.registry import RegistryClient

GOAL_ARM64_RATIO = 1.3


def _has_platform(reference: str, platform: str) -> bool:
    """Whether the registry's `name:tag` holds an image for `platform`."""
    image, tag = split_reference(reference)
    with RegistryClient(image.registry) as client:
        manifest = client.manifest(image.repository, tag)
    return manifest is not None and platform in manifest.platform_digests()


def measure(bench: Bench) -> Measured:
    amd64 = bench.cold_build("ours")
    if not amd64:
        raise UsageError("arm64 compares with the amd64 cold build: run `--only build,arm64`")
    project, snapshot = bench.sync("ours")
    salted = salted_dockerfile(project, f"bench-{bench.run_id}-arm64")
    request = BenchBuild(project, "linux/arm64", bench.tag("ours", "cpu-arm64"), salted, True)
    cross = build_record(bench, "build-ours-arm64-cold", request, snapshot).seconds
    limit = bench.options.qemu_minutes * 60
    qemu_s: float | None = None
    if not _has_platform(up.LAB_BASE, "linux/arm64"):
        qemu = Figure.missing(f"not run: {up.LAB_BASE} has no linux/arm64 image")
    else:
        emulated = salted_dockerfile(project, f"bench-{bench.run_id}-arm64-qemu", emulated=True)
        try:
            tag = bench.tag("ours", "cpu-arm64-qemu")
            request = BenchBuild(project, "linux/arm64", tag, emulated, True, time_limit=limit)
            qemu_s = build_record(bench, "build-ours-arm64-qemu", request, snapshot).seconds
            qemu = Figure.of(qemu_s)
        except BuildTimedOut:
            reached = ninja_progress(project.logs_dir / "build-cpu-arm64.log")
            qemu = Figure.missing(
                f"did not finish in {bench.options.qemu_minutes:g} min (reached {reached})"
            )
    metrics = (
        Metric(
            "arm64.cross",
            "cold build, cpu arm64 (cross-compiled)",
            "s",
            Figure.of(cross),
            Figure.of(amd64.seconds),
            other_label="ours amd64",
            goal=Goal("<=", GOAL_ARM64_RATIO, on="ratio"),
        ),
        Metric(
            "arm64.qemu",
            "cold build, cpu arm64 (builder under QEMU)",
            "s",
            qemu,
            Figure.of(cross),
            other_label="cross",
        ),
    )
    notes = (
        "the QEMU reference build is our Dockerfile with `--platform=$BUILDPLATFORM` replaced by "
        f"`$TARGETPLATFORM`, bounded at {bench.options.qemu_minutes:g} min",
    )
    return Measured(metrics, notes, {"cross_s": cross, "qemu_s": qemu_s, "qemu_limit_s": limit})
