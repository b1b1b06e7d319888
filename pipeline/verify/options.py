"""`nox -s verify`'s options: the image to check and who must have signed it, resolved with the
matrix (which images must carry an SBOM) and version.json (the default image)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.core.project import Project
from pipeline.core.version import load_version
from pipeline.matrix import Matrix, load_matrix


@dataclass(frozen=True)
class VerifyOptions:
    """What `nox -s verify` checks, and against which signer."""

    project: Project
    matrix: Matrix = field(repr=False)
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
    return VerifyOptions(
        project, load_matrix(), image, args.key, args.identity, args.issuer, dict(env)
    )
