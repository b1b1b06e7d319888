"""Compiler results carried between machines: a build seeds its ccache mount from a directory
(`--ccache-from DIR`, the `ccache-seed` build context) and exports the mount afterwards
(`--ccache-to DIR`, the `ccache-export` stage). One directory per backend and architecture under
DIR, which a CI cache restores on the next runner. BuildKit's registry cache carries layers,
never cache mounts; this carries the mount.

A missing seed means a build without one (slower, not failing); an export replaces the old
directory only once it is complete.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.build.plan import BuildJob
from pipeline.core.console import err

CCACHE_SEED_CONTEXT = "ccache-seed"


def ccache_dir(root: Path, job: BuildJob) -> Path:
    """`root/<backend>-<arch>`: the cache mount is per target architecture (plan_jobs refuses
    a carried cache for a job of several platforms)."""
    return root.expanduser().resolve() / job.key


def ccache_seed(root: Path, job: BuildJob) -> Path | None:
    """The seed directory for `job`; None (and a line saying so) when there is none: the
    Dockerfile's own empty `ccache-seed` stage stands in, so the build's cache keys are those
    of a build that was given no seed."""
    seed = ccache_dir(root, job)
    if seed.is_dir():
        return seed
    err.print(f"ccache: no seed at {seed}: compiling without one", markup=False)
    return None
