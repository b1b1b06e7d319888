"""Carrying out a publish plan: the sources checked before anything is written; each backend's
sources copied into the target repository and its index put there by digest, then signed and
attested; only then every tag that needs it (immutable tags first); every tag verified after.
An interrupted publish leaves no tag pointing at anything unsigned.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import console
from pipeline.core.errors import PipelineError, PublishError
from pipeline.core.version import VersionInfo
from pipeline.oci.cosign import SBOM_PREDICATE, SMOKE_PREDICATE, Cosign, Signer, Verifier
from pipeline.oci.image import LABEL_REVISION, LABEL_VERSION, ImageName
from pipeline.oci.registry import PlatformImage, RegistryClient
from pipeline.oci.tags import PUSHING, Action
from pipeline.publish.plan import BackendPlan, PublishPlan
from pipeline.publish.sources import Registries, copy_image
from pipeline.records import BuildRecord, SmokeRecord


def label_problems(
    where: str, images: Sequence[PlatformImage], commit: str, version: str
) -> list[str]:
    """What is wrong with the revision and version labels of `images` (nothing: [])."""
    problems = []
    for image in images:
        for what, label, expected in (
            ("revision", LABEL_REVISION, commit),
            ("version", LABEL_VERSION, version),
        ):
            found = image.labels.get(label)
            if found != expected:
                problems.append(
                    f"{where} {image.platform} has {what} label {found}, expected {expected}"
                )
    return problems


def check_sources(
    registries: Registries, sources: Sequence[BuildRecord], info: VersionInfo
) -> None:
    """Before anything is pushed: each digest exists, is the platform its report names, and
    carries this release's revision and version labels."""
    problems: list[str] = []
    for source in sources:
        name = ImageName.parse(source.image)
        client = registries.client(name.registry)
        summary = client.summary(name.repository, source.index_digest or source.digest)
        where = f"{source.backend} {source.platform} ({source.source})"
        if summary is None:
            problems.append(f"{where} is not in the registry")
            continue
        if summary.platforms != [source.platform]:
            problems.append(f"{where} holds {', '.join(summary.platforms) or 'nothing'}")
        problems += label_problems(where, summary.images, info.llama_cpp.commit, info.version)
    if problems:
        raise PublishError(
            "refusing to publish: " + "; ".join(problems),
            "the build reports do not describe these images: rebuild and smoke-test them",
        )


@dataclass(frozen=True)
class Signing:
    """Who signs, and what every platform image gets attested with."""

    cosign: Cosign
    signer: Signer
    own: Verifier | None  # our own public key: what is signed already is not signed again
    # (backend, platform) -> the smoke records of its digest, one per tier publish required
    smokes: Mapping[tuple[str, str], tuple[SmokeRecord, ...]]
    reports_dir: Path

    def _needs(self, ref: str, kind: str | None = None) -> bool:
        if self.own is None:
            return True
        if kind is None:
            return not self.cosign.has_signature(self.own, ref)
        return not self.cosign.has_statement(self.own, ref, kind)

    def _attested_tiers(self, image: str) -> set[str]:
        """The smoke tiers our own key already attested for `image`."""
        if self.own is None:
            return set()
        statements = self.cosign.attested(self.own, image, SMOKE_PREDICATE)
        return {str((s.get("predicate") or {}).get("tier")) for s in statements}

    def sign_backend(self, plan: BackendPlan) -> None:
        """The index signed, each platform image attested with the smoke record of every tier
        it passed and with its SBOM."""
        index = f"{plan.target}@{plan.pushable.digest}"
        if self._needs(index):
            self.cosign.sign(self.signer, index)
        with tempfile.TemporaryDirectory(prefix="publish-attest-") as tmp:
            for source in plan.sources:
                image = f"{plan.target}@{source.digest}"
                attested = self._attested_tiers(image)
                for record in self.smokes[(source.backend, source.platform)]:
                    if record.tier in attested:
                        continue
                    smoke = Path(tmp) / f"{record.stem}.json"
                    smoke.write_text(json.dumps(record.to_json()), encoding="utf-8")
                    self.cosign.attest(self.signer, image, smoke, SMOKE_PREDICATE)
                if source.sbom and self._needs(image, SBOM_PREDICATE):
                    sbom = self.reports_dir / source.sbom
                    self.cosign.attest(self.signer, image, sbom, SBOM_PREDICATE)


def stage_backend(registries: Registries, plan: BackendPlan, signing: Signing | None) -> None:
    """The backend's index and all it refers to in the target repository, by digest (no tag
    moves yet), signed and attested."""
    for source in plan.sources:
        name = ImageName.parse(source.image)
        copy_image(registries, name, source.index_digest or source.digest, plan.target)
    client = registries.client(plan.target.registry)
    index = plan.pushable
    if client.manifest_digest(plan.target.repository, index.digest) != index.digest:
        client.put_manifest(plan.target.repository, index.digest, index)
    if signing is not None:
        signing.sign_backend(plan)


def tag_backend(plan: BackendPlan, client: RegistryClient) -> list[str]:
    """Point every tag that needs it at the staged index, immutable tags first; the tags
    written."""
    order = plan.push_order()
    for d in order:
        if d.action is Action.OVERWRITE and d.current:
            console.err.print(
                f"warning: --force: overwriting immutable tag {plan.target}:{d.tag} "
                f"(was {d.current.digest}, version {d.current.version or 'unknown'})"
            )
    done: list[str] = []
    try:
        for d in order:
            # Another publisher (a concurrent release, the train) may have moved the tag since
            # the plan read it: re-read it just before writing, and stop rather than overwrite.
            now = client.manifest_digest(plan.target.repository, d.tag)
            planned = d.current.digest if d.current else None
            if now not in (planned, plan.pushable.digest):
                raise PublishError(
                    f"{plan.target}:{d.tag} moved to {now} while this publish ran (it planned "
                    f"from {planned or 'no tag'}): another publisher is at work",
                    "re-run: the plan is made anew from what the registry holds then",
                )
            client.put_manifest(plan.target.repository, d.tag, plan.pushable)
            done.append(d.tag)
    except PipelineError as exc:
        left = [d.tag for d in order if d.tag not in done]
        state = f"tagged {', '.join(done) or 'nothing'}; not tagged {', '.join(left)}"
        raise type(exc)(
            f"{plan.backend}: {exc.message} ({state})",
            exc.hint or "re-run publish: tags already pushed show as unchanged",
        ) from exc
    return done


def verify(plan: PublishPlan, client: RegistryClient) -> int:
    """Every tag resolves to the expected index, with exactly the expected platforms, each
    carrying the expected revision and version labels. Returns the number of tags checked."""
    problems: list[str] = []
    checked = 0
    for backend in plan.backends:
        repository = backend.target.repository
        for d in backend.decisions:
            if d.action not in (*PUSHING, Action.UNCHANGED):
                continue
            checked += 1
            digest = client.manifest_digest(repository, d.tag)
            if digest != backend.pushable.digest:
                problems.append(f"{d.tag} is {digest}, expected {backend.pushable.digest}")
        summary = client.summary(repository, backend.pushable.digest)
        if summary is None:
            problems.append(f"index {backend.pushable.digest} of {backend.backend} is missing")
            continue
        platforms = sorted(summary.platforms)
        if platforms != sorted(backend.platforms):
            problems.append(
                f"{backend.backend} index lists {platforms}, expected {sorted(backend.platforms)}"
            )
        problems += label_problems(backend.backend, summary.images, plan.commit, str(plan.version))
    if problems:
        raise PublishError(
            "verification after push failed: " + "; ".join(problems),
            "inspect the repository; re-run publish once the cause is fixed",
        )
    return checked
