"""`nox -s publish`'s options, resolved once before anything is read from a registry: the
matrix and version.json, the backends asked for, the target repository, the tag rules, and the
release tag checked against version.json. Registry credentials and the GitHub ref come from
`env`, never from the command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.arguments import switch
from pipeline.core.errors import ConfigError, PipelineError, UsageError
from pipeline.core.project import Project
from pipeline.core.version import SemVer
from pipeline.matrix import Backend, Matrix, TargetPlatform
from pipeline.matrix.choose import Resolved, backend_argument, backends_named, platforms_named
from pipeline.oci.credentials import registry_host
from pipeline.oci.image import ImageName
from pipeline.oci.registry import RetryPolicy
from pipeline.oci.tags import EDGE, STABLE, TagRules, load_tag_rules
from pipeline.publish.gates import Gates, load_gates
from pipeline.records.candidate import CANDIDATE_RECORD


@dataclass(frozen=True)
class PublishOptions(Resolved):
    """What `nox -s publish` was asked, resolved (see `PublishOptions.named`)."""

    rules: TagRules = field(repr=False)
    target: ImageName  # the repository tags go to
    dry_run: bool = False
    force: bool = False
    backends: tuple[Backend, ...] = ()  # empty: every backend with build records
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    reports: Path | None = None  # None: the project's reports directory
    no_sign: bool = False  # publish unsigned (signing needs COSIGN_KEY or GitHub's OIDC token)
    # The GPU backends the release had no GPU runner for: they need what matrix.yaml's
    # publish_without_gpu says instead of their gpu tier (the plan says so).
    no_gpu_runner: tuple[str, ...] = ()
    channel: str = STABLE  # whose tag rules (tags.yaml: stable, edge)
    # Only these platforms of each backend (a CI-size release); None: every one it is built for.
    platforms: tuple[TargetPlatform, ...] | None = None

    @property
    def reports_dir(self) -> Path:
        return self.reports or self.project.reports_dir

    def gpu_runner(self, backend: str) -> bool:
        """Whether the release had a runner with `backend`'s GPU (its gpu tier could run)."""
        return backend not in self.no_gpu_runner

    @classmethod
    def named(
        cls,
        project: Project,
        *,
        backends: str | None = None,
        platforms: Sequence[str] | None = None,
        registry: str | None = None,
        image: str | None = None,
        release_tag: str | None = None,
        env: Mapping[str, str] | None = None,
        matrix: Matrix | None = None,
        no_gpu_runner: bool | str | Sequence[str] = (),
        **rest: Any,
    ) -> PublishOptions:
        env = dict(os.environ) if env is None else dict(env)
        inputs = Resolved.load(project, matrix, env)
        check_release_tag(inputs.version.version, release_tag, env)
        rules = load_tag_rules()
        pin = inputs.version.llama_cpp
        rules.check_backends(
            ((b.name, b.tag_suffix) for b in inputs.matrix.backends.values()),
            SemVer.parse(inputs.version.version),
            pin.commit,
            pin.ref,
        )
        try:
            target = ImageName.parse(image or inputs.version.image)
        except PipelineError as exc:
            raise UsageError(f"--image: {exc.message}", exc.hint) from None
        if registry:
            target = ImageName(registry_host(registry, "--registry"), target.repository)
        return cls(
            **vars(inputs),
            rules=rules,
            target=target,
            backends=backends_named(backends, inputs.matrix) if backends else (),
            platforms=platforms_named(platforms, inputs.matrix) if platforms else None,
            env=env,
            no_gpu_runner=_without_gpu_runner(no_gpu_runner, inputs.matrix),
            **rest,
        )


def _without_gpu_runner(named: bool | str | Sequence[str], matrix: Matrix) -> tuple[str, ...]:
    """--no-gpu-runner: True (given bare) is every backend; else the backends named."""
    if named is True:
        return tuple(matrix.backends)
    if not named:
        return ()
    return tuple(b.name for b in backends_named(named, matrix))


def check_release_tag(version: str, release_tag: str | None, env: Mapping[str, str]) -> None:
    """A `vX.Y.Z` git tag being released must agree with version.json's version."""
    candidates = [release_tag] if release_tag else []
    if env.get("GITHUB_REF_TYPE") == "tag" and env.get("GITHUB_REF_NAME"):
        candidates.append(env["GITHUB_REF_NAME"])
    for tag in candidates:
        if tag != f"v{version}":
            raise ConfigError(
                f"release tag {tag!r} does not match version.json's version {version}",
                f"tag the release commit v{version}, or correct version.json",
            )


@dataclass(frozen=True)
class PromoteOptions(Resolved):
    candidate: Path
    rules: TagRules = field(repr=False)
    gates: Gates = field(repr=False)
    repository: ImageName | None = None  # None: the candidate's
    dry_run: bool = False
    no_sign: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)

    @classmethod
    def named(cls, project: Project, candidate: Path | None = None, **rest: Any) -> PromoteOptions:
        inputs = Resolved.load(project, env=rest.get("env"))
        return cls(
            **vars(inputs),
            candidate=candidate or project.build_dir / "track" / CANDIDATE_RECORD,
            rules=load_tag_rules(),
            gates=load_gates(),
            **rest,
        )


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    switch(parser, "--dry-run", "print the full plan (every tag, its action and why) and stop")
    backend_argument(parser, "backends to publish (default: every reported one)")
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
    switch(parser, "--force", "overwrite immutable tags that point to another digest (logged)")
    switch(parser, "--no-sign", "publish without cosign signatures and attestations")
    parser.add_argument(
        "--platform",
        action="append",
        help="only these platforms of each backend (a CI-size release; default: every one)",
    )
    parser.add_argument(
        "--channel",
        choices=(STABLE, EDGE),
        default=STABLE,
        help="whose tags: stable (X.Y.Z, latest...; the default) or edge (edge, b<N>: the train)",
    )
    parser.add_argument(
        "--no-gpu-runner",
        nargs="?",
        const=True,
        default=(),
        metavar="BACKENDS",
        help="no GPU smoke ran (for these backends, comma-separated; bare: for any): they "
        "publish on what matrix.yaml's publish_without_gpu allows",
    )


def resolve_publish(args: argparse.Namespace) -> PublishOptions:
    return PublishOptions.named(
        Project.discover(),
        backends=args.backend,
        platforms=args.platform,
        registry=args.registry,
        image=args.image,
        release_tag=args.release_tag,
        dry_run=args.dry_run,
        force=args.force,
        reports=args.reports,
        no_sign=args.no_sign,
        no_gpu_runner=args.no_gpu_runner,
        channel=args.channel,
    )


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "candidate",
        nargs="?",
        type=Path,
        metavar="CANDIDATE",
        help="a candidate record (default: build/track/candidate.json, the newest track made)",
    )
    parser.add_argument("--image", help="the repository (default: the candidate's)")
    switch(parser, "--dry-run", "hold the candidate to the gates and print the plan; move nothing")
    switch(parser, "--no-sign", "move the tags without attesting the gates' figures")


def resolve_promote(args: argparse.Namespace) -> PromoteOptions:
    return PromoteOptions.named(
        Project.discover(),
        candidate=args.candidate,
        repository=ImageName.parse(args.image) if args.image else None,
        dry_run=args.dry_run,
        no_sign=args.no_sign,
    )
