"""The train's reproducibility check: the cpu image of this machine's platform built a second
time, without the layer cache, from a copy of the candidate's work root (the same snapshot, the
same Dockerfile, the same build arguments), into an OCI layout, and its platform digest compared
with the one the candidate pushed. Anyone rebuilding a published digest gets exactly it, or the
candidate record says that they would not.

The compiler cache stays warm (a cold compile is what `nox -s bench -- --only reproducible`
measures); what it proves here is that nothing the build writes depends on when it ran."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.matrix.backends import host_platform
from pipeline.records import load_build_records
from pipeline.track.chain import Chain, StageFailed

BACKEND = "cpu"


def _digest(reports: Path, platform: str) -> str | None:
    return next(
        (
            r.digest
            for r in load_build_records(reports)
            if (r.backend, r.platform) == (BACKEND, platform)
        ),
        None,
    )


def _copy_root(root: Path, again: Path) -> None:
    """What the build reads, the snapshot hard-linked (it is large, and nothing writes it)."""
    shutil.rmtree(again, ignore_errors=True)
    again.mkdir(parents=True)
    shutil.copy2(root / "version.json", again / "version.json")
    shutil.copytree(root / "dockerfiles", again / "dockerfiles")
    shutil.copytree(root / "third_party", again / "third_party", copy_function=os.link)


def reproducible(chain: Chain, build_arguments: Sequence[str]) -> str:
    """`identical: DIGEST`, `differs: A (pushed) vs B (rebuilt)` or `not checked: why`; the
    rebuild's StageRun joins `chain.runs` (its time shows beside the stages')."""
    platform = host_platform()
    pushed = _digest(chain.root / "build" / "reports", platform)
    if pushed is None:
        return f"not checked: the candidate has no {BACKEND} {platform} image"
    again = chain.root.with_name(chain.root.name + "-again")
    _copy_root(chain.root, again)
    rebuild = Chain(again, chain.env, chain.runs)
    layout = again / "build" / "oci"
    try:
        rebuild.run(
            f"rebuild {BACKEND} {platform}",
            "build",
            platform,
            "--backend",
            BACKEND,
            "--no-cache",
            "--oci",
            str(layout),
            *build_arguments,
        )
    except StageFailed as exc:
        return f"not checked: the rebuild failed (exit {exc.exit_code}; log {exc.run.log})"
    rebuilt = _digest(again / "build" / "reports", platform)
    shutil.rmtree(layout, ignore_errors=True)  # the image is in the engine's cache; not kept twice
    if rebuilt == pushed:
        return f"identical: {pushed}"
    return f"differs: {pushed} (pushed) vs {rebuilt} (rebuilt)"
