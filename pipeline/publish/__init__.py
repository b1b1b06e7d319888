"""`nox -s publish`: join smoke-tested per-platform digests into one index per backend, tag it
by the rules in tags.yaml (pipeline/publish/tags.py), push, and verify through the registry API.

Takes the build and smoke records and refuses digests without a passed smoke record of that
same digest. The plan is computed before anything is written (pipeline/publish/plan.py): every
tag of every backend gets an action and a reason, from what the registry holds now.
`--dry-run` prints the plan and stops. Pushing (pipeline/publish/push.py): `docker buildx
imagetools create` joins the digests into an index under the first tag (immutable tags first),
the other tags get the same index bytes through the registry API; credentials reach buildx
through a docker config of our own in a temporary directory, never through a command line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import console
from pipeline.core.config import load_version
from pipeline.core.errors import CredentialsError, PublishError, RegistryError, UsageError
from pipeline.core.options import Command, PublishOptions, add_publish_arguments, resolve_publish
from pipeline.matrix import load_matrix
from pipeline.oci.buildx import docker_config
from pipeline.oci.cosign import Cosign, Signer
from pipeline.oci.image import ImageName
from pipeline.oci.registry import RegistryClient
from pipeline.publish.plan import (
    PublishPlan,
    auths_for,
    check_release_tag,
    check_reports,
    group_by_backend,
    make_plan,
    print_plan,
    required_tiers,
    resolve_target,
)
from pipeline.publish.push import Signing, check_sources, stage_backend, tag_backend, verify
from pipeline.publish.sources import Registries
from pipeline.publish.tags import load_tag_rules
from pipeline.records import (
    BuildRecord,
    SmokeRecord,
    load_build_records,
    load_smoke_records,
    require_build_records,
    write_publish_record,
)

__all__ = ["COMMANDS", "PublishOutcome", "publish"]


@dataclass
class PublishOutcome:
    plan: PublishPlan
    pushed: list[str]
    seconds: float
    phases: dict[str, float]

    def record(self, verified: bool) -> dict[str, object]:
        """publish.json: the plan, what was pushed, whether it was verified, how long it took."""
        return {
            **self.plan.to_json(),
            "pushed": self.pushed,
            "verified": verified,
            "seconds": round(self.seconds, 3),
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }


def _chosen(builds: Sequence[BuildRecord], backends: Sequence[str]) -> list[BuildRecord]:
    if not backends:
        return list(builds)
    unknown = sorted(set(backends) - {b.backend for b in builds})
    if unknown:
        raise UsageError(
            f"no build reports for backend(s) {', '.join(unknown)}",
            f"reports exist for {', '.join(sorted({b.backend for b in builds}))}",
        )
    return [b for b in builds if b.backend in backends]


def _readable(client: RegistryClient, target: ImageName, dry_run: bool, notes: list[str]) -> bool:
    """Whether we may read the target repository; a dry run without access still plans."""
    try:
        client.ping(target.repository)
    except (CredentialsError, RegistryError) as exc:
        if not dry_run:
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
    signer: Signer | None,
    options: PublishOptions,
    smokes: Sequence[SmokeRecord],
    config_dir: Path,
) -> Iterator[Signing | None]:
    if signer is None:
        yield None
        return
    cosign = Cosign(options.env, config_dir)
    by_key = {(s.backend, s.platform): s for s in smokes}
    with cosign.own_verifier(signer) as own:
        yield Signing(cosign, signer, own, by_key, options.reports_dir)


def publish(
    options: PublishOptions, builds: Sequence[BuildRecord], smokes: Sequence[SmokeRecord]
) -> PublishOutcome:
    """Plan, then (unless a dry run) stage, sign, tag and verify; publish.json records it."""
    started = time.monotonic()
    phases: dict[str, float] = {}
    project = options.project
    info = load_version(project.version_file)
    check_release_tag(info.version, options.release_tag, options.env)
    rules = load_tag_rules()
    target = resolve_target(info, options)
    require_build_records(builds, options.reports_dir)
    builds = _chosen(builds, options.backends)
    required = required_tiers(builds, options.no_gpu_runner)
    refusals = check_reports(builds, smokes, info, required)
    groups, suffixes, incomplete = group_by_backend(builds)
    signer, unsignable = _signing_refusals(options, builds)
    refusals += incomplete + unsignable
    if refusals and not options.dry_run:
        raise refusals[0]
    notes = [refusal.message for refusal in refusals]
    if options.no_gpu_runner:
        matrix = load_matrix()
        notes += [
            f"{name}: published on its {', '.join(tiers)} smoke tier only: the release had no "
            "GPU runner (matrix.yaml: publish_without_gpu)"
            for name, tiers in required.items()
            if tiers is not None and matrix.backend(name).smoke.needs_gpu
        ]
    auths = auths_for(target, builds, options.env)

    def outcome(pushed: list[str], verified: bool) -> PublishOutcome:
        done = PublishOutcome(plan, pushed, time.monotonic() - started, phases)
        write_publish_record(project.reports_dir, done.record(verified))
        return done

    with docker_config(auths) as config_dir, Registries(auths, options.retry) as registries:
        client = registries.client(target.registry)
        readable = _readable(client, target, options.dry_run, notes)
        try:
            check_sources(registries, [b for b in builds if b.pushed], info)
        except (PublishError, RegistryError, CredentialsError) as exc:
            if not options.dry_run:
                raise
            notes.append(exc.message)
        plan = make_plan(registries, info, rules, target, groups, suffixes, options, readable)
        plan.notes = notes
        phases["plan"] = time.monotonic() - started
        print_plan(plan)
        if plan.conflicts and not options.force:
            names = ", ".join(f"{target}:{d.tag}" for _, d in plan.conflicts)
            outcome([], verified=False)
            raise PublishError(
                f"immutable tag(s) {names} already exist with another digest; nothing was pushed",
                "bump version.json's version, or re-run with --force to overwrite (logged)",
            )
        if options.dry_run:
            return outcome([], verified=False)
        mark = time.monotonic()
        # Every backend staged and signed before any tag moves: nothing is half-published.
        with _signing(signer, options, smokes, config_dir) as signing:
            for backend in plan.backends:
                stage_backend(registries, backend, signing)
        phases["stage"] = time.monotonic() - mark
        mark = time.monotonic()
        pushed = [
            f"{target}:{tag}" for backend in plan.backends for tag in tag_backend(backend, client)
        ]
        phases["push"] = time.monotonic() - mark
        mark = time.monotonic()
        checked = verify(plan, client)
        phases["verify"] = time.monotonic() - mark
    done = outcome(pushed, verified=True)
    console.out.print(
        f"pushed {len(pushed)} tag(s), verified {checked} tag(s) of "
        f"{len(plan.backends)} backend(s) in {done.seconds:.1f} s"
    )
    return done


def _run(args: argparse.Namespace) -> int:
    options = resolve_publish(args)
    reports = options.reports_dir
    publish(options, load_build_records(reports), load_smoke_records(reports))
    return 0


COMMANDS = (
    Command(
        "publish",
        "Tag and push smoke-tested digests as one index per backend.",
        add_publish_arguments,
        _run,
    ),
)
