"""`nox -s verify -- IMAGE[:TAG]`: what a user checks before running a published image.

For the image (or index) the reference resolves to: its cosign signature; then for each
platform image, a signed smoke attestation saying that very digest passed its smoke test, and
(for images assembled file by file) a signed CycloneDX SBOM of that platform. Anything missing,
unsigned, signed by another key or about another digest fails with one line (exit 16).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from pipeline.core import console
from pipeline.core.arguments import Command
from pipeline.core.datafile import write_json_atomic
from pipeline.core.errors import VerifyError
from pipeline.matrix import Matrix
from pipeline.oci.buildx import docker_config
from pipeline.oci.cosign import (
    PROMOTION_PREDICATE,
    SBOM_PREDICATE,
    SMOKE_PREDICATE,
    Cosign,
    Verifier,
    verifier_from_env,
)
from pipeline.oci.image import LABEL_PREFIX, split_reference
from pipeline.oci.registry import RegistryClient
from pipeline.records.promotion import PromotionRecord
from pipeline.verify.options import VerifyOptions, add_verify_arguments, resolve_verify

__all__ = ["COMMANDS", "verify"]


@dataclass
class PlatformVerdict:
    platform: str
    digest: str
    smoke: str = ""
    sbom: str = ""
    promotion: str = ""


@dataclass
class VerifyRecord:
    """What `verify` found: build/reports/verify.json."""

    image: str
    digest: str
    signature: str
    platforms: list[PlatformVerdict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "image": self.image,
            "digest": self.digest,
            "signature": self.signature,
            "platforms": [vars(p) for p in self.platforms],
            "seconds": round(self.seconds, 3),
        }


def _smoke_passed(statements: list[dict[str, Any]], platform: str, digest: str) -> str:
    """Every smoke tier attested for this digest: each must say it passed."""
    passed = []
    for statement in statements:
        predicate = statement.get("predicate") or {}
        if predicate.get("digest") != digest or predicate.get("platform") != platform:
            continue
        tier = predicate.get("tier") or "no-gpu"
        if predicate.get("passed") is not True:
            raise VerifyError(
                f"{platform} {digest[:19]}…: its {tier} smoke attestation says it failed"
            )
        listed = predicate.get("checks")
        if not isinstance(listed, list) or not listed:
            raise VerifyError(
                f"{platform} {digest[:19]}…: its {tier} smoke attestation passes without checks"
            )
        passed.append(f"{tier} {len(listed)} checks ({predicate.get('model') or 'a model'})")
    if not passed:
        raise VerifyError(
            f"{platform} {digest[:19]}…: no smoke attestation is about this digest",
            "publish attests each platform image with the smoke report of that same digest",
        )
    return "passed " + ", ".join(sorted(passed))


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sbom_listed(statements: list[dict[str, Any]], platform: str, digest: str) -> str:
    for statement in statements:
        bom = _mapping(statement.get("predicate"))
        component = _mapping(_mapping(bom.get("metadata")).get("component"))
        properties = component.get("properties")
        if bom.get("bomFormat") == "CycloneDX" and {"name": "platform", "value": platform} in (
            properties if isinstance(properties, list) else []
        ):
            listed = bom.get("components")
            parts: list[Any] = listed if isinstance(listed, list) else []
            inner = [_mapping(part).get("components") for part in parts]
            files = sum(len(files) for files in inner if isinstance(files, list))
            return f"CycloneDX {bom.get('specVersion')}: {files} files"
    raise VerifyError(f"{platform} {digest[:19]}…: no SBOM attestation for {platform}")


def _promotion(cosign: Cosign, verifier: Verifier, ref: str) -> str:
    """The gates a promotion held this image to (`nox -s promote` attests them), each with
    the candidate's and stable's figures; an image published by hand has none."""
    statements = cosign.attested(verifier, ref, PROMOTION_PREDICATE)
    if not statements:
        return "not promoted by the train (published directly)"
    lines = []
    for statement in statements:
        record = PromotionRecord.from_json(statement.get("predicate"), ref)
        gates = "; ".join(gate.line().removeprefix("gate ") for gate in record.gates)
        lines.append(f"{record.version} after {record.stable_version or 'none'}: {gates}")
    return " | ".join(lines)


def _needs_sbom(matrix: Matrix, labels: Mapping[str, str]) -> bool:
    """Images assembled file by file (a scratch runtime) ship an SBOM; others need none."""
    backend = matrix.backends.get(labels.get(f"{LABEL_PREFIX}.backend", ""))
    return backend is not None and backend.runtime.kind == "scratch"


def verify(options: VerifyOptions) -> VerifyRecord:
    """Verify every signature and attestation of the image `options.image` names."""
    started = time.monotonic()
    # Who must have signed, checked before the registry is asked.
    verifier = verifier_from_env(options.key, options.identity, options.issuer, options.env)
    name, reference = split_reference(options.image)
    credentials = options.access.credentials(name.registry)
    with RegistryClient(
        name.registry, credentials, token_hosts=options.access.token_hosts
    ) as client:
        top = client.manifest(name.repository, reference)
        if top is None:
            raise VerifyError(f"{options.image} is not in the registry {name.registry}")
        images = list(client.platform_images(name.repository, top))
    auths = {name.registry: credentials} if credentials else {}
    with docker_config(auths) as config_dir:
        cosign = Cosign(options.env, config_dir)
        signed = f"{name}@{top.digest}"
        cosign.verify(verifier, signed)
        record = VerifyRecord(options.image, top.digest, "valid")
        for image in images:
            ref = f"{name}@{image.digest}"
            verdict = PlatformVerdict(image.platform, image.digest)
            smokes = cosign.statements(verifier, ref, SMOKE_PREDICATE)
            verdict.smoke = _smoke_passed(smokes, image.platform, image.digest)
            if _needs_sbom(options.matrix, image.labels):
                boms = cosign.statements(verifier, ref, SBOM_PREDICATE)
                verdict.sbom = _sbom_listed(boms, image.platform, image.digest)
            else:
                verdict.sbom = "not required (not assembled file by file)"
            verdict.promotion = _promotion(cosign, verifier, ref)
            record.platforms.append(verdict)
    record.seconds = time.monotonic() - started
    return record


def _print(record: VerifyRecord) -> None:
    table = Table(title=f"verified {record.image} ({record.digest})")
    for column in ("platform", "digest", "smoke", "sbom", "promotion"):
        table.add_column(column, overflow="fold")
    for p in record.platforms:
        table.add_row(p.platform, p.digest, p.smoke, p.sbom, p.promotion)
    console.out.print(table)
    console.out.print(
        f"signature valid; {len(record.platforms)} platform(s) in {record.seconds:.1f} s"
    )


def _run(args: argparse.Namespace) -> int:
    options = resolve_verify(args, os.environ)
    record = verify(options)
    _print(record)
    options.project.reports_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(options.project.reports_dir / "verify.json", record.to_json())
    return 0


COMMANDS = (
    Command(
        "verify",
        "Check a published image: its signature, each platform's smoke attestation and SBOM.",
        add_verify_arguments,
        _run,
    ),
)
