"""`nox -s publish`'s options, resolved once before anything is read from a registry: the
matrix and version.json, the backends asked for, the target repository, the tag rules, and the
release tag checked against version.json. Registry credentials and the GitHub ref come from
`env`, never from the command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.arguments import switch
from pipeline.core.errors import ConfigError, PipelineError, UsageError
from pipeline.core.project import Project
from pipeline.matrix import Backend, Matrix
from pipeline.matrix.choose import Resolved, backend_argument, backends_named
from pipeline.oci.credentials import registry_host
from pipeline.oci.image import ImageName
from pipeline.oci.registry import RetryPolicy
from pipeline.publish.tags import SemVer, TagRules, load_tag_rules


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
    # The release had no GPU runner: GPU backends need what matrix.yaml's publish_without_gpu
    # says instead of their gpu tier (the plan says so).
    no_gpu_runner: bool = False

    @property
    def reports_dir(self) -> Path:
        return self.reports or self.project.reports_dir

    @classmethod
    def named(
        cls,
        project: Project,
        *,
        backends: str | None = None,
        registry: str | None = None,
        image: str | None = None,
        release_tag: str | None = None,
        env: Mapping[str, str] | None = None,
        matrix: Matrix | None = None,
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
            env=env,
            **rest,
        )


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
    switch(
        parser,
        "--no-gpu-runner",
        "no GPU smoke ran: GPU backends publish on what matrix.yaml's publish_without_gpu allows",
    )


def resolve_publish(args: argparse.Namespace) -> PublishOptions:
    return PublishOptions.named(
        Project.discover(),
        backends=args.backend,
        registry=args.registry,
        image=args.image,
        release_tag=args.release_tag,
        dry_run=args.dry_run,
        force=args.force,
        reports=args.reports,
        no_sign=args.no_sign,
        no_gpu_runner=args.no_gpu_runner,
    )
