"""`nox -s smoke`'s options: which image (the build records', or IMAGE), on which platforms,
with which model and tier, resolved once against the matrix and version.json."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.arguments import port_number, positive_seconds
from pipeline.core.errors import PipelineError, UsageError
from pipeline.core.project import Project
from pipeline.matrix import Backend, Matrix, TargetPlatform
from pipeline.matrix.choose import Resolved, backends_named, platforms_named
from pipeline.oci.image import split_reference
from pipeline.records import MODEL_TIERS


@dataclass(frozen=True)
class ModelSource:
    """Where smoke's model comes from: a local GGUF, a Hub file, a catalogue preset, or (none
    of them) generated."""

    path: Path | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    hf_revision: str | None = None
    preset: str | None = None


@dataclass(frozen=True)
class SmokeOptions(Resolved):
    platforms: tuple[TargetPlatform, ...]
    backend: Backend
    image: str | None = None  # None: the images the build records name
    model: ModelSource = field(default_factory=ModelSource)
    report_dir: Path | None = None  # also write JSON + JUnit here
    port: int | None = None
    healthy_timeout: float | None = None  # None: smoke.yaml's bound
    tier: str | None = None  # None: `gpu` where the backend has it and a GPU is visible

    @classmethod
    def named(
        cls,
        project: Project,
        *,
        platforms: Sequence[str] = (),
        backend: str | None = None,
        matrix: Matrix | None = None,
        **rest: Any,
    ) -> SmokeOptions:
        """Options from names, resolved against the matrix and version.json."""
        inputs = Resolved.load(project, matrix)
        options = cls(
            **vars(inputs),
            platforms=platforms_named(platforms, inputs.matrix),
            backend=backends_named(backend, inputs.matrix)[0],
            **rest,
        )
        options.check()
        return options

    def check(self) -> None:
        """What would fail only once an image ran, or at the end: refused now."""
        if self.tier is not None and self.tier not in MODEL_TIERS:
            self.backend.smoke.tier(self.backend.name, self.tier)
        if self.image is not None:
            try:
                split_reference(self.image)
            except PipelineError as exc:
                raise UsageError(exc.message, "give IMAGE as name[:tag] or name@sha256:…") from None
        report = self.report_dir
        if report is not None and report.exists() and not report.is_dir():
            raise UsageError(f"--report {report}: not a directory", "name a directory (made)")
        if self.model.hf_revision and not self.model.hf_repo:
            raise UsageError("--hf-revision goes with --hf-repo and --hf-file")


def add_smoke_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", nargs="?", help="image reference (default: the build report's, per platform)"
    )
    parser.add_argument(
        "--platform",
        action="append",
        help="linux/amd64 or linux/arm64 (amd64, arm64); repeat or comma-separate; default: host's",
    )
    parser.add_argument("--backend", help="backend of the image (default: the matrix's default)")
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model", metavar="PATH", help="a local GGUF model (default: a generated tiny model)"
    )
    model.add_argument("--hf-repo", metavar="R", help="download the model from this Hub repository")
    model.add_argument(
        "--preset", metavar="NAME", help="a model of the catalogue (nox -s models -- list)"
    )
    parser.add_argument("--hf-file", metavar="F", help="the GGUF file in --hf-repo")
    parser.add_argument(
        "--hf-revision", metavar="REV", help="branch, tag or commit of --hf-repo (default: main)"
    )
    parser.add_argument(
        "--report", metavar="DIR", type=Path, help="also write JSON and JUnit XML here"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        help="host port on 127.0.0.1 to publish (default: a free one)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        help="seconds to wait for /health (default: smoke.yaml)",
    )
    parser.add_argument(
        "--tier",
        help="smoke tier: no-gpu (anywhere) or gpu (matrix.yaml; default: gpu where the "
        "backend has one and this machine shows an NVIDIA GPU, else no-gpu), real (a "
        "trained model's answers checked, smoke.yaml's real:), or cpus (the CPU kernels under "
        "QEMU's CPU models, smoke.yaml's cpus:)",
    )


def resolve_smoke(args: argparse.Namespace) -> SmokeOptions:
    if (args.hf_repo or args.hf_file) and not (args.hf_repo and args.hf_file):
        raise UsageError("--hf-repo and --hf-file go together", "give both, or --model PATH")
    path = Path(args.model).expanduser().resolve() if args.model else None
    return SmokeOptions.named(
        Project.discover(),
        platforms=args.platform,
        backend=args.backend,
        image=args.image,
        model=ModelSource(path, args.hf_repo, args.hf_file, args.hf_revision, args.preset),
        report_dir=args.report,
        port=args.port,
        healthy_timeout=args.timeout,
        tier=args.tier,
    )
