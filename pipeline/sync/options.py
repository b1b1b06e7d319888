"""`nox -s sync` and `nox -s bump`: their command lines and what they resolve to. The remote is
--remote, then $LLAMA_CPP_REMOTE, then version.json's repository."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.core.arguments import remote_argument, resolve_remote, switch
from pipeline.core.errors import UsageError
from pipeline.core.project import Project
from pipeline.core.version import load_version


@dataclass(frozen=True)
class SyncOptions:
    project: Project
    remote: str
    prune: bool = True


def add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    remote_argument(parser, "fetch from this mirror")
    switch(parser, "--no-prune", "keep the whole upstream tree")
    switch(
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
