"""`nox -s verify`'s options: the image to check and who must have signed it, resolved with the
matrix (which images must carry an SBOM) and version.json (the default image)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.core.errors import PipelineError, UsageError
from pipeline.core.project import Project
from pipeline.matrix.choose import Resolved
from pipeline.oci.image import split_reference


@dataclass(frozen=True)
class VerifyOptions(Resolved):
    """What `nox -s verify` checks, and against which signer."""

    image: str  # name[:tag] or name@sha256:…
    key: str | None = None  # the public key (default: $COSIGN_PUBLIC_KEY)
    identity: str | None = None  # keyless: a regex the signing certificate's identity matches
    issuer: str | None = None  # keyless: the OIDC issuer (default: GitHub Actions')
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    image = "the published image (default: version.json's image at its version)"
    parser.add_argument("image", nargs="?", metavar="IMAGE[:TAG|@DIGEST]", help=image)
    parser.add_argument("--key", metavar="PUB", help="public key (default: $COSIGN_PUBLIC_KEY)")
    parser.add_argument(
        "--identity", metavar="REGEX", help="keyless: the signing workflow's identity (a regex)"
    )
    parser.add_argument("--issuer", metavar="URL", help="keyless: the OIDC issuer")


def resolve_verify(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> VerifyOptions:
    inputs = Resolved.load(Project.discover(), env=env)
    image = args.image or f"{inputs.version.image}:{inputs.version.version}"
    try:
        split_reference(image)
    except PipelineError as exc:
        raise UsageError(exc.message, "give IMAGE[:TAG] or IMAGE@sha256:…") from None
    if args.identity is not None:
        try:
            re.compile(args.identity)
        except re.error as exc:
            raise UsageError(
                f"--identity {args.identity!r}: not a regular expression: {exc}"
            ) from None
    return VerifyOptions(
        **vars(inputs),
        image=image,
        key=args.key,
        identity=args.identity,
        issuer=args.issuer,
        env=dict(env),
    )
