"""Every stage's options: the command line, the environment, version.json and the matrix,
resolved in one place into one frozen dataclass per stage.

Defaults come from the matrix (the default backend, the platforms a backend is built for, the
host's platform checked against them) and from version.json (the remote, the image), never
from literals in a stage. A stage function takes its resolved options and the record of the
stage before it; the CLI (pipeline/cli.py) parses, resolves here, and calls it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Project, load_version
from pipeline.core.errors import UsageError
from pipeline.matrix import Matrix, host_platform, load_matrix
from pipeline.oci.registry import RetryPolicy
from pipeline.records import Output

REMOTE_ENV = "LLAMA_CPP_REMOTE"


def _number(
    kind: type[int] | type[float], minimum: float, what: str, maximum: float = float("inf")
) -> Callable[[str], float]:
    """An argparse type: a number of `kind` in [minimum, maximum]; else a usage error naming it."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


port_number = _number(int, 1, "a port number (1-65535)", 65535)
positive_int = _number(int, 1, "a whole number of at least 1")
positive_seconds = _number(float, 0.001, "a number of seconds (up to a day)", 86_400)
positive_minutes = _number(float, 0.001, "a number of minutes (up to a day)", 1_440)


@dataclass(frozen=True)
class Command:
    """One `python -m pipeline <name>`: its arguments and the function that runs it."""

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------ shared resolution


def resolve_remote(cli: str | None, repository: str, env: Mapping[str, str] = os.environ) -> str:
    """--remote, then $LLAMA_CPP_REMOTE, then version.json's repository."""
    for candidate in (cli, env.get(REMOTE_ENV, "")):
        if candidate and candidate.strip():
            remote = candidate.strip()
            break
    else:
        remote = repository
    if remote.startswith("-"):
        raise UsageError(f"remote {remote!r} looks like an option, not a URL")
    return remote


def resolve_platforms(values: Sequence[str] | None, matrix: Matrix) -> tuple[str, ...]:
    """Platform names (`arm64`, `linux/arm64`, comma-separated or repeated), checked against the
    matrix; none given: this machine's."""
    given = [p for value in values or () for p in value.split(",") if p.strip()]
    return tuple(dict.fromkeys(matrix.platform(p).name for p in given or [host_platform()]))


def resolve_backends(text: str | None, matrix: Matrix) -> tuple[str, ...]:
    """Backend names (comma-separated), checked; none given: the matrix's default. `auto`: the
    one this host's GPUs call for (pipeline/matrix/hostgpu.py), with the evidence printed."""
    names = [b.strip() for b in (text or matrix.default_backend).split(",") if b.strip()]
    if "auto" in names:
        from pipeline.core.console import err
        from pipeline.matrix.hostgpu import detect_backend

        detection = detect_backend(matrix)
        err.print(detection.line(), markup=False, soft_wrap=True)
        names = [detection.backend if name == "auto" else name for name in names]
    return tuple(matrix.backend(name).name for name in dict.fromkeys(names))


def _switch(parser: argparse.ArgumentParser, flag: str, help_text: str) -> None:
    """An on/off option, off unless given."""
    parser.add_argument(flag, action="store_true", help=help_text)


def remote_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--remote",
        metavar="URL",
        help=f"{what} (default: ${REMOTE_ENV}, then version.json's repository)",
    )


def _backend_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--backend", metavar="B[,B...]", help=help_text)


# --------------------------------------------------------------------------- sync, bump


@dataclass(frozen=True)
class SyncOptions:
    project: Project
    remote: str
    prune: bool = True


def add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    remote_argument(parser, "fetch from this mirror")
    _switch(parser, "--no-prune", "keep the whole upstream tree")
    _switch(
        parser,
        "--check",
        "verify the existing snapshot against snapshot.json and the pin (offline)",
    )


def resolve_sync(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> SyncOptions:
    project = Project.discover()
    if args.check and (args.remote or args.no_prune):
        raise UsageError("--check takes no other option", "run 'pipeline sync --check' alone")
    repository = load_version(project.version_file).llama_cpp.repository
    return SyncOptions(project, resolve_remote(args.remote, repository, env), not args.no_prune)


@dataclass(frozen=True)
class BumpOptions:
    project: Project
    remote: str
    ref: str | None = None  # None: the newest b<number> release tag


def add_bump_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref", nargs="?", metavar="REF", help="tag, branch or sha (default: newest b<number> tag)"
    )
    remote_argument(parser, "resolve REF on this mirror")


def resolve_bump(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> BumpOptions:
    project = Project.discover()
    repository = load_version(project.version_file).llama_cpp.repository
    return BumpOptions(project, resolve_remote(args.remote, repository, env), args.ref)


# ------------------------------------------------------------------------------- render


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    _backend_argument(parser, "render only these backends (default: every backend)")


def resolve_render(args: argparse.Namespace) -> tuple[Project, tuple[str, ...]]:
    matrix = load_matrix()
    backends = resolve_backends(args.backend, matrix) if args.backend else tuple(matrix.backends)
    return Project.discover(), backends


# -------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildOptions:
    """Everything `nox -s build` was asked (see `resolve_build` for the defaults)."""

    project: Project
    platforms: tuple[str, ...]  # names such as linux/arm64
    backends: tuple[str, ...]
    output: Output = "load"
    oci_path: Path | None = None
    builder: str | None = None
    cache_from: tuple[str, ...] = ()
    cache_to: tuple[str, ...] = ()
    ccache_from: Path | None = None  # seed the compiler cache from DIR/<backend>-<arch>
    ccache_to: Path | None = None  # export it there after the build
    tags: tuple[str, ...] = ()
    cpu_variants: str | None = None  # None: each backend's default from the matrix
    gpu_architectures: str | None = None  # e.g. "90" or "75;90"; None: the matrix's list
    build_args: tuple[tuple[str, str], ...] = ()
    attest: bool = False  # max-mode provenance in the pushed index (pushing only)
    no_cache_filter: tuple[str, ...] = ()  # stages rebuilt without the cache
    no_cache: bool = False
    quiet: bool = False  # no per-step terminal lines (the full log is written anyway)
    # Bench's measured builds: a salted copy of the rendered Dockerfile, and a bound in seconds.
    dockerfile: Path | None = None
    time_limit: float | None = None


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "platforms",
        nargs="*",
        metavar="ARCH|PLATFORM",
        help="amd64, arm64, or linux/<arch> (default: this machine's)",
    )
    _backend_argument(
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
    _switch(parser, "--no-cache", "rebuild every stage without the layer cache")
    _switch(
        parser,
        "--attest",
        "with --push/--push-by-digest: max-mode provenance attestations in the pushed index",
    )


def _gpu_architectures(text: str | None) -> str | None:
    if text is None:
        return None
    items = [item.strip() for item in re.split(r"[,;]", text) if item.strip()]
    # CMake's forms: 90 (SASS and PTX), 90-real (SASS only), 90-virtual (PTX only: the driver
    # compiles it at first start; the quickest build), gfx1100 (ROCm).
    if not items or not all(re.fullmatch(r"[0-9a-z]+(-real|-virtual)?", i) for i in items):
        raise UsageError(
            f"--gpu-architectures {text!r}: expected a list such as 90, 75,90-real or 90-virtual"
        )
    return ";".join(items)


def resolve_build(args: argparse.Namespace) -> BuildOptions:
    matrix = load_matrix()
    output: Output = "oci" if args.oci is not None else (args.output or "load")
    build_args: list[tuple[str, str]] = []
    for item in args.build_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--build-arg {item!r}: expected KEY=VALUE")
        build_args.append((key, value))
    return BuildOptions(
        project=Project.discover(),
        platforms=resolve_platforms(args.platforms, matrix),
        backends=resolve_backends(args.backend, matrix),
        output=output,
        oci_path=args.oci.resolve() if args.oci is not None else None,
        builder=args.builder,
        cache_from=tuple(args.cache_from),
        cache_to=tuple(args.cache_to),
        ccache_from=args.ccache_from,
        ccache_to=args.ccache_to,
        tags=tuple(args.tag),
        # A local load that does not choose gets the matrix's local set (this machine's CPU).
        cpu_variants=args.cpu_variants or (matrix.local_cpu_variants if output == "load" else None),
        gpu_architectures=_gpu_architectures(args.gpu_architectures),
        build_args=tuple(build_args),
        attest=args.attest,
        no_cache_filter=tuple(args.no_cache_filter),
        no_cache=args.no_cache,
    )


# -------------------------------------------------------------------------------- smoke


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
class SmokeOptions:
    project: Project
    platforms: tuple[str, ...]
    backend: str
    image: str | None = None  # None: the images the build records name
    model: ModelSource = field(default_factory=ModelSource)
    report_dir: Path | None = None  # also write JSON + JUnit here
    port: int | None = None
    healthy_timeout: float | None = None  # None: smoke.yaml's bound
    tier: str | None = None  # None: `gpu` where the backend has it and a GPU is visible


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
        "backend has one and this machine shows an NVIDIA GPU, else no-gpu), or real (a "
        "trained model's answers checked, smoke.yaml's real:)",
    )


def resolve_smoke(args: argparse.Namespace) -> SmokeOptions:
    matrix = load_matrix()
    if (args.hf_repo or args.hf_file) and not (args.hf_repo and args.hf_file):
        raise UsageError("--hf-repo and --hf-file go together", "give both, or --model PATH")
    path = Path(args.model).expanduser().resolve() if args.model else None
    return SmokeOptions(
        project=Project.discover(),
        platforms=resolve_platforms(args.platform, matrix),
        backend=resolve_backends(args.backend, matrix)[0],
        image=args.image,
        model=ModelSource(path, args.hf_repo, args.hf_file, args.hf_revision, args.preset),
        report_dir=args.report,
        port=args.port,
        healthy_timeout=args.timeout,
        tier=args.tier,
    )


# ------------------------------------------------------------------------------ publish


@dataclass(frozen=True)
class PublishOptions:
    """What `nox -s publish` was asked; registry credentials and the GitHub ref come from
    `env`, never from the command line."""

    project: Project
    dry_run: bool = False
    force: bool = False
    backends: tuple[str, ...] = ()  # empty: every backend with build records
    registry: str | None = None
    image: str | None = None
    release_tag: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    reports: Path | None = None  # None: the project's reports directory
    no_sign: bool = False  # publish unsigned (signing needs COSIGN_KEY or GitHub's OIDC token)
    # The release had no GPU runner: GPU backends need what matrix.yaml's publish_without_gpu
    # says instead of their gpu tier (the plan says so).
    no_gpu_runner: bool = False

    @property
    def reports_dir(self) -> Path:
        return self.reports or self.project.reports_dir


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    _switch(parser, "--dry-run", "print the full plan (every tag, its action and why) and stop")
    _backend_argument(parser, "backends to publish (default: every reported one)")
    parser.add_argument(
        "--registry",
        help="registry host replacing version.json's (ghcr.io, "
        "127.0.0.1:5000); default: the image's, Docker Hub",
    )
    parser.add_argument("--image", help="full repository name replacing version.json's image")
    parser.add_argument(
        "--reports",
        type=Path,
        help="directory of build-*.json and smoke-*.json (default build/reports)",
    )
    parser.add_argument(
        "--release-tag", help="the vX.Y.Z git tag being released; must match version.json"
    )
    _switch(parser, "--force", "overwrite immutable tags that point to another digest (logged)")
    _switch(parser, "--no-sign", "publish without cosign signatures and attestations")
    _switch(
        parser,
        "--no-gpu-runner",
        "no GPU smoke ran: GPU backends publish on what matrix.yaml's publish_without_gpu allows",
    )


def resolve_publish(args: argparse.Namespace) -> PublishOptions:
    backends = resolve_backends(args.backend, load_matrix()) if args.backend else ()
    return PublishOptions(
        project=Project.discover(),
        dry_run=args.dry_run,
        force=args.force,
        backends=backends,
        registry=args.registry,
        image=args.image,
        release_tag=args.release_tag,
        reports=args.reports,
        no_sign=args.no_sign,
        no_gpu_runner=args.no_gpu_runner,
    )


# ------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyOptions:
    """What `nox -s verify` checks, and against which signer."""

    project: Project
    image: str  # name[:tag] or name@sha256:…
    key: str | None = None  # the public key (default: $COSIGN_PUBLIC_KEY)
    identity: str | None = None  # keyless: a regex the signing certificate's identity matches
    issuer: str | None = None  # keyless: the OIDC issuer (default: GitHub Actions')
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image",
        nargs="?",
        metavar="IMAGE[:TAG|@DIGEST]",
        help="the published image (default: version.json's image at its version)",
    )
    parser.add_argument("--key", metavar="PUB", help="public key (default: $COSIGN_PUBLIC_KEY)")
    parser.add_argument(
        "--identity", metavar="REGEX", help="keyless: the signing workflow's identity (a regex)"
    )
    parser.add_argument("--issuer", metavar="URL", help="keyless: the OIDC issuer")


def resolve_verify(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> VerifyOptions:
    project = Project.discover()
    image = args.image
    if image is None:
        info = load_version(project.version_file)
        image = f"{info.image}:{info.version}"
    return VerifyOptions(project, image, args.key, args.identity, args.issuer, dict(env))
