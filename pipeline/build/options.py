"""`nox -s build`'s options: its command line and what it resolves to, once, before any work:
the backends and platforms as the matrix's objects, the CPU variant set (which knows whether it
is this machine's CPU only), the GPU targets, version.json. Defaults come from the matrix (the
default backend, this machine's platform, the local variant set for a local load) and from
version.json (the image), never from literals in the stage.

A new build option is a field here, its argument and its resolution, and the one place of the
stage that uses it (usually `pipeline/build/command.py`, the buildx command line).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.arguments import switch
from pipeline.core.errors import UsageError
from pipeline.core.project import Project
from pipeline.core.version import COMMIT_RE
from pipeline.matrix import Backend, CpuVariantSet, Matrix, TargetPlatform, load_matrix
from pipeline.matrix.choose import (
    Resolved,
    backend_argument,
    backends_named,
    gpu_architectures_named,
    platforms_argument,
    platforms_named,
)
from pipeline.records import Output

_BUILD_ARG_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class BuildOptions(Resolved):
    """Everything `nox -s build` was asked, resolved (see `BuildOptions.named`)."""

    platforms: tuple[TargetPlatform, ...]
    backends: tuple[Backend, ...]
    output: Output = "load"
    oci_path: Path | None = None
    builder: str | None = None
    cache_from: tuple[str, ...] = ()
    cache_to: tuple[str, ...] = ()
    ccache_from: Path | None = None  # seed the compiler cache from DIR/<backend>-<arch>
    ccache_to: Path | None = None  # export it there after the build
    tags: tuple[str, ...] = ()
    cpu_variants: CpuVariantSet | None = None  # None: each backend's default from the matrix
    gpu_architectures: tuple[str, ...] | None = None  # e.g. ("90",); None: the matrix's list
    build_args: tuple[tuple[str, str], ...] = ()
    attest: bool = False  # max-mode provenance in the pushed index (pushing only)
    no_cache_filter: tuple[str, ...] = ()  # stages rebuilt without the cache
    no_cache: bool = False
    quiet: bool = False  # no per-step terminal lines (the full log is written anyway)
    # Bench's measured builds: a salted copy of the rendered Dockerfile, and a bound in seconds.
    dockerfile: Path | None = None
    time_limit: float | None = None

    @classmethod
    def named(
        cls,
        project: Project,
        *,
        platforms: Sequence[str] = (),
        backends: Sequence[str] | str | None = None,
        cpu_variants: str | None = None,
        gpu_architectures: str | None = None,
        matrix: Matrix | None = None,
        **rest: Any,
    ) -> BuildOptions:
        """Options from names (as a command line or a test gives them), resolved against the
        matrix and the project's version.json; every other field as given."""
        inputs = Resolved.load(project, matrix)
        options = cls(
            **vars(inputs),
            platforms=platforms_named(platforms, inputs.matrix),
            backends=backends_named(backends, inputs.matrix),
            cpu_variants=inputs.matrix.cpu_variant_set(cpu_variants) if cpu_variants else None,
            gpu_architectures=gpu_architectures_named(gpu_architectures),
            **rest,
        )
        _check_build_args(options.build_args)
        _check_directories(options)
        return options


def _check_directories(options: BuildOptions) -> None:
    """What must be a directory is not a file: else the build would fail only at its end."""
    for flag, path in (("--ccache-from", options.ccache_from), ("--ccache-to", options.ccache_to)):
        if path is not None and path.expanduser().exists() and not path.expanduser().is_dir():
            raise UsageError(
                f"{flag} {path}: not a directory", "name a directory (--ccache-to makes it)"
            )
    oci = options.oci_path
    if oci is not None and oci.suffix != ".tar" and oci.exists() and not oci.is_dir():
        raise UsageError(
            f"--oci {oci}: neither a .tar file name nor a directory",
            "give PATH.tar, or a directory for <backend>.tar",
        )


def _check_build_args(build_args: Sequence[tuple[str, str]]) -> None:
    for key, value in build_args:
        if not _BUILD_ARG_RE.match(key):
            raise UsageError(f"--build-arg {key}=...: not a build arg name")
        if key == "LLAMA_CPP_COMMIT" and not COMMIT_RE.match(value):
            raise UsageError(f"--build-arg LLAMA_CPP_COMMIT={value}: expected a full 40-hex sha")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    platforms_argument(parser)
    backend_argument(
        parser, "backends (default: the matrix's default; auto: the one this host's GPU calls for)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--load",
        dest="output",
        action="store_const",
        const="load",
        help="load each platform into the local engine as <image>:<version>-<backend>-<arch> "
        "(the default)",
    )
    mode.add_argument(
        "--push",
        dest="output",
        action="store_const",
        const="push",
        help="push one multi-platform image per backend (tag: --tag, or "
        "<image>:<version>-<backend>)",
    )
    mode.add_argument(
        "--push-by-digest",
        dest="output",
        action="store_const",
        const="push-by-digest",
        help="push each platform untagged to the repository (version.json's image, or --tag "
        "REPO); `nox -s publish` tags the digests",
    )
    mode.add_argument(
        "--oci",
        metavar="PATH",
        type=Path,
        help="write an OCI layout tarball (PATH.tar, or a directory for <backend>.tar)",
    )
    parser.add_argument("--builder", metavar="NAME", help="buildx builder (e.g. multi-node)")
    parser.add_argument(
        "--cache-from",
        metavar="REF|DIR",
        action="append",
        default=[],
        help="BuildKit cache to import: a registry ref, a directory, or a type=... spec",
    )
    parser.add_argument(
        "--cache-to",
        metavar="REF|DIR",
        action="append",
        default=[],
        help="BuildKit cache to export (mode=max)",
    )
    parser.add_argument(
        "--ccache-from",
        metavar="DIR",
        type=Path,
        help="seed the compiler cache from DIR/<backend>-<arch> (what --ccache-to wrote on "
        "another machine); missing: compile without",
    )
    parser.add_argument(
        "--ccache-to",
        metavar="DIR",
        type=Path,
        help="after the build, write the compiler cache to DIR/<backend>-<arch> (CCACHE_MAXSIZE "
        "bounds it, default 2G)",
    )
    parser.add_argument(
        "--tag",
        metavar="TAG",
        action="append",
        default=[],
        help="image reference, or a tag of version.json's image (repeatable)",
    )
    parser.add_argument(
        "--cpu-variants",
        metavar="SET",
        help="ggml CPU kernels: all (every variant, picked at run time; releases), baseline "
        "(one portable set, about half the compile time; CI) or host (this machine's CPU "
        "only: a local try-out, tagged -host, never published). Default: host for a local "
        "--load, else the backend's (all).",
    )
    parser.add_argument(
        "--gpu-architectures",
        metavar="LIST",
        help="GPU backends: the GPU targets to compile, e.g. 90 or 75,90 (default: the matrix's "
        "list; fewer compile faster, and the image's label says which it carries)",
    )
    parser.add_argument(
        "--build-arg",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="extra build arg (BUILDER_IMAGE, RUNTIME_IMAGE, LLAMA_CPP_COMMIT, ...)",
    )
    parser.add_argument(
        "--no-cache-filter",
        metavar="STAGE",
        action="append",
        default=[],
        help="rebuild these Dockerfile stages without the cache (e.g. rootfs, runtime)",
    )
    switch(
        parser,
        "--attest",
        "with --push/--push-by-digest: max-mode provenance attestations in the pushed index",
    )
    switch(parser, "--no-cache", "rebuild every stage without the layer cache")


def resolve_build(args: argparse.Namespace) -> BuildOptions:
    output: Output = "oci" if args.oci is not None else (args.output or "load")
    build_args: list[tuple[str, str]] = []
    for item in args.build_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--build-arg {item!r}: expected KEY=VALUE")
        build_args.append((key, value))
    matrix = load_matrix()
    return BuildOptions.named(
        Project.discover(),
        matrix=matrix,
        platforms=args.platforms,
        backends=args.backend,
        # A local load that does not choose gets the matrix's local set (this machine's CPU).
        cpu_variants=args.cpu_variants or (matrix.local_cpu_variants if output == "load" else None),
        gpu_architectures=args.gpu_architectures,
        output=output,
        oci_path=args.oci.resolve() if args.oci is not None else None,
        builder=args.builder,
        cache_from=tuple(args.cache_from),
        cache_to=tuple(args.cache_to),
        ccache_from=args.ccache_from,
        ccache_to=args.ccache_to,
        tags=tuple(args.tag),
        build_args=tuple(build_args),
        attest=args.attest,
        no_cache_filter=tuple(args.no_cache_filter),
        no_cache=args.no_cache,
    )
