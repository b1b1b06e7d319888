"""`nox -s publish`: join smoke-tested per-platform digests into one index per backend, tag it
by the rules in tags.yaml (pipeline/oci/tags.py), push, and verify through the registry API.

It reads top to bottom: the records reviewed against each other and version.json (refusing
digests without a passed smoke record of that same digest), the plan made from what the
registry holds now (every tag of every backend gets an action and a reason), then, unless
`--dry-run`: every backend's index staged by digest and signed (push.py), only then the tags
moved (immutable tags first), and every tag verified. Registry credentials reach cosign through
a docker config of our own in a temporary directory, never through a command line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import console
from pipeline.core.arguments import Command
from pipeline.core.errors import CredentialsError, PublishError, RegistryError
from pipeline.oci.buildx import docker_config
from pipeline.oci.cosign import Cosign, Signer
from pipeline.oci.registry import RegistryClient
from pipeline.publish.options import (
    PublishOptions,
    add_promote_arguments,
    add_publish_arguments,
    resolve_promote,
    resolve_publish,
)
from pipeline.publish.plan import PublishPlan, Review, auths_for, make_plan, print_plan, review
from pipeline.publish.promote import promote
from pipeline.publish.push import Signing, check_sources, stage_backend, tag_backend, verify
from pipeline.publish.sources import Registries
from pipeline.records import (
    BuildRecord,
    SmokeRecord,
    load_build_records,
    load_smoke_records,
    require_build_records,
)
from pipeline.records.publish import PublishRecord, write_publish_record

__all__ = ["COMMANDS", "PublishOutcome", "publish"]


@dataclass(frozen=True)
class PublishOutcome:
    plan: PublishPlan
    record: PublishRecord  # what publish.json holds


def _readable(client: RegistryClient, options: PublishOptions, notes: list[str]) -> bool:
    """Whether we may read the target repository; a dry run without access still plans."""
    try:
        client.ping(options.target.repository)
    except (CredentialsError, RegistryError) as exc:
        if not options.dry_run:
            raise
        notes.append(f"{exc.message}: what the tags point to now is unknown")
        return False
    return True


NO_SIGNER = PublishError(
    "no signing identity: set COSIGN_KEY (a key file, env://VAR or a KMS URI; its password in "
    "COSIGN_PASSWORD), or publish from GitHub Actions with `id-token: write`",
    "or pass --no-sign to publish unsigned images",
)


def _signing_refusals(
    options: PublishOptions, builds: Sequence[BuildRecord]
) -> tuple[Signer | None, list[PublishError]]:
    """Who signs, and what keeps publish from signing: checked before anything is written."""
    if options.no_sign:
        return None, []
    refusals = []
    signer = Signer.from_env(options.env)
    if signer is None:
        refusals.append(NO_SIGNER)
    for build in builds:
        if build.sbom and not (options.reports_dir / build.sbom).is_file():
            refusals.append(
                PublishError(
                    f"{build.filename} names the SBOM {build.sbom}, which is not in "
                    f"{options.reports_dir}",
                    "keep the sbom-*.json files beside the build reports (CI: upload them too)",
                )
            )
    return signer, refusals


@contextmanager
def _signing(
    signer: Signer | None, options: PublishOptions, checked: Review, config_dir: Path
) -> Iterator[Signing | None]:
    if signer is None:
        yield None
        return
    cosign = Cosign(options.env, config_dir)
    with cosign.own_verifier(signer) as own:
        yield Signing(cosign, signer, own, checked.tested, options.reports_dir)


def publish(
    options: PublishOptions, builds: Sequence[BuildRecord], smokes: Sequence[SmokeRecord]
) -> PublishOutcome:
    """Review, plan, then (unless a dry run) stage and sign, tag and verify; publish.json
    records it."""
    started = time.monotonic()
    phases: dict[str, float] = {}
    require_build_records(builds, options.reports_dir)
    # Review: what the records allow, before any registry is asked.
    checked = review(options, builds, smokes)
    signer, unsignable = _signing_refusals(options, checked.builds)
    refusals = [*checked.refusals, *unsignable]
    if refusals and not options.dry_run:
        raise refusals[0]
    notes = [refusal.message for refusal in refusals] + list(checked.notes)
    auths = auths_for(options.target, checked.builds, options.access)

    def outcome(plan: PublishPlan, pushed: list[str], verified: bool) -> PublishOutcome:
        record = plan.record(pushed, verified, time.monotonic() - started, phases)
        write_publish_record(options.project.reports_dir, record)
        return PublishOutcome(plan, record)

    with (
        docker_config(auths) as config_dir,
        Registries(auths, options.retry, options.access.token_hosts) as registries,
    ):
        # Plan: what every tag points to now, and what happens to it.
        client = registries.client(options.target.registry)
        readable = _readable(client, options, notes)
        try:
            check_sources(registries, [b for b in checked.builds if b.pushed], options.version)
        except (PublishError, RegistryError, CredentialsError) as exc:
            if not options.dry_run:
                raise
            notes.append(exc.message)
        plan = make_plan(options, checked.groups, registries, readable)
        plan.notes = notes
        phases["plan"] = time.monotonic() - started
        print_plan(plan)
        if plan.conflicts and not options.force:
            names = ", ".join(f"{options.target}:{d.tag}" for _, d in plan.conflicts)
            outcome(plan, [], verified=False)
            raise PublishError(
                f"immutable tag(s) {names} already exist with another digest; nothing was pushed",
                "bump version.json's version, or re-run with --force to overwrite (logged)",
            )
        if options.dry_run:
            return outcome(plan, [], verified=False)
        # Stage and sign: every backend's index in place by digest, signed, before any tag
        # moves: nothing is half-published.
        mark = time.monotonic()
        with _signing(signer, options, checked, config_dir) as signing:
            for backend in plan.backends:
                stage_backend(registries, backend, signing)
        phases["stage"] = time.monotonic() - mark
        # Tag, immutable tags first.
        mark = time.monotonic()
        pushed = [
            f"{options.target}:{tag}"
            for backend in plan.backends
            for tag in tag_backend(backend, client)
        ]
        phases["push"] = time.monotonic() - mark
        # Verify every tag through the registry.
        mark = time.monotonic()
        checked_tags = verify(plan, client)
        phases["verify"] = time.monotonic() - mark
    done = outcome(plan, pushed, verified=True)
    console.out.print(
        f"pushed {len(pushed)} tag(s), verified {checked_tags} tag(s) of "
        f"{len(plan.backends)} backend(s) in {done.record.seconds:.1f} s"
    )
    return done


def _run(args: argparse.Namespace) -> int:
    options = resolve_publish(args)
    reports = options.reports_dir
    publish(options, load_build_records(reports), load_smoke_records(reports))
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    promote(resolve_promote(args))
    return 0


COMMANDS = (
    Command(
        "publish",
        "Tag and push smoke-tested digests as one index per backend.",
        add_publish_arguments,
        _run,
    ),
    Command(
        "promote",
        "Move the stable tags to a candidate's digests (nox -s track), if it passes the gates.",
        add_promote_arguments,
        _run_promote,
    ),
)
