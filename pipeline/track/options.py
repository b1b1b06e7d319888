"""`nox -s track`'s options: which upstream release (default: the newest b<N> tag of the remote),
which backends and platforms (default: every one the release publishes here), where the edge
channel lives, and how the images are built, resolved once before anything runs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.arguments import remote_argument, resolve_remote, switch
from pipeline.core.errors import UsageError
from pipeline.core.project import Project
from pipeline.matrix import Backend, TargetPlatform
from pipeline.matrix.choose import (
    Resolved,
    backend_argument,
    backends_named,
    gpu_architectures_named,
    platforms_named,
)
from pipeline.oci.image import ImageName

BUMPS = ("patch", "minor", "major")


@dataclass(frozen=True)
class TrackOptions(Resolved):
    ref: str | None  # an upstream tag, branch or sha; None: the newest b<N> release tag
    remote: str
    repository: ImageName  # where candidates go (digests, edge tags); stable tags beside
    backends: tuple[Backend, ...]
    platforms: tuple[TargetPlatform, ...] | None  # None: each backend's own
    cpu_variants: str | None = None  # None: each backend's own (every variant: `all`)
    gpu_architectures: tuple[str, ...] | None = None
    apt_sources: tuple[str, ...] = ()  # apt lines the builds also install from
    bump: str = "patch"  # how a candidate's version follows the stable one's
    force: bool = False  # build even when edge already holds this upstream build
    packages: bool = True  # a newer Debian package of the stable images is a reason to build
    no_sign: bool = False
    reproducible: bool = False  # rebuild the host's cpu image; the candidate says if identical
    from_edge: bool = False  # build nothing: the candidate is what edge holds of the pin
    # The backends whose GPU this machine shows: they smoke their gpu tier too.
    gpu_visible: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)

    @property
    def work_dir(self) -> Path:
        return self.project.build_dir / "track"

    def gpu_runner(self, backend: Backend) -> bool:
        return backend.name in self.gpu_visible

    def platforms_of(self, backend: Backend) -> tuple[TargetPlatform, ...]:
        if self.platforms is None:
            return backend.platforms
        return tuple(p for p in self.platforms if p in backend.platforms)

    @classmethod
    def named(
        cls,
        project: Project,
        *,
        backends: str | None = None,
        platforms: tuple[str, ...] | None = None,
        image: str | None = None,
        registry: str | None = None,
        remote: str | None = None,
        gpu_architectures: str | None = None,
        env: Mapping[str, str] | None = None,
        **rest: Any,
    ) -> TrackOptions:
        env = dict(os.environ) if env is None else dict(env)
        inputs = Resolved.load(project, env=env)
        visible = tuple(n for n, b in inputs.matrix.backends.items() if b.smoke.gpu_visible())
        if backends:
            chosen = backends_named(backends, inputs.matrix)
        else:  # what a release publishes here: a GPU-only backend needs its GPU
            every = inputs.matrix.backends.values()
            chosen = tuple(b for b in every if b.smoke.required(b.name in visible) is not None)
        for backend in chosen:
            if backend.smoke.required(backend.name in visible) is None:
                raise UsageError(
                    f"{backend.name} is published only after its gpu tier, and no GPU is "
                    "visible here",
                    "track it on a machine with its GPU, or leave it out (--backend)",
                )
        repository = ImageName.parse(image or inputs.version.image)
        if registry:
            repository = ImageName(registry.rstrip("/"), repository.repository)
        return cls(
            **vars(inputs),
            remote=resolve_remote(remote, inputs.version.llama_cpp.repository, env),
            repository=repository,
            backends=chosen,
            platforms=platforms_named(platforms, inputs.matrix) if platforms else None,
            gpu_architectures=gpu_architectures_named(gpu_architectures),
            gpu_visible=visible,
            env=env,
            **rest,
        )


def add_track_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref", nargs="?", metavar="REF", help="upstream tag, branch or sha (default: newest b<N>)"
    )
    remote_argument(parser, "the upstream to follow")
    backend_argument(parser, "backends (default: every one the release publishes here)")
    parser.add_argument(
        "--platform",
        action="append",
        help="only these platforms (default: each backend's); repeat or comma-separate",
    )
    parser.add_argument("--image", help="the repository of the edge and stable tags")
    parser.add_argument("--registry", help="registry host replacing the image's")
    parser.add_argument(
        "--cpu-variants", metavar="SET", help="CPU kernels (default: every variant, as released)"
    )
    parser.add_argument("--gpu-architectures", metavar="LIST", help="GPU targets to compile")
    parser.add_argument(
        "--apt-source",
        action="append",
        default=[],
        metavar="LINE",
        help="an apt source line the builds also install from (and packages are checked in)",
    )
    parser.add_argument(
        "--bump",
        choices=BUMPS,
        default="patch",
        help="the candidate's version after the stable one (default: patch)",
    )
    switch(parser, "--force", "build even when edge already holds this upstream build")
    switch(parser, "--no-packages", "do not rebuild the stable pin for newer Debian packages")
    switch(parser, "--no-sign", "publish the candidate to edge unsigned")
    parser.add_argument(
        "--reproducible",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="build the cpu image of this machine's platform again, without the layer cache, "
        "and record whether its digest is the pushed one (default: off)",
    )
    switch(
        parser,
        "--from-edge",
        "build nothing: write the candidate of what edge holds of version.json's pin and "
        "version (none: exit 0 without one)",
    )


def resolve_track(args: argparse.Namespace) -> TrackOptions:
    for line in args.apt_source:
        if "\n" in line or not line.startswith("deb "):
            raise UsageError(f"--apt-source {line!r}: expected one line starting with 'deb '")
    return TrackOptions.named(
        Project.discover(),
        ref=args.ref,
        remote=args.remote,
        backends=args.backend,
        platforms=tuple(args.platform) if args.platform else None,
        image=args.image,
        registry=args.registry,
        cpu_variants=args.cpu_variants,
        gpu_architectures=args.gpu_architectures,
        apt_sources=tuple(args.apt_source),
        bump=args.bump,
        force=args.force,
        packages=not args.no_packages,
        no_sign=args.no_sign,
        reproducible=args.reproducible,
        from_edge=args.from_edge,
    )
