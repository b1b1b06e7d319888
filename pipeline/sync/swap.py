"""Making a new snapshot appear in one step: the lock, the renames, and the repair after a kill.

A sync stages the new vendor tree and snapshot.json beside the old ones, then swaps them in
with renames while SIGINT/SIGTERM wait; a sync killed outright (SIGKILL) leaves a staging
directory whose contents say how far it got, and the next sync finishes or undoes it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from pipeline.core import console
from pipeline.core.project import Project

STAGING_PREFIX = ".sync-"
# Told each named step of a sync as it is reached (tests interrupt or kill a sync right there).
PhaseHook = Callable[[str], None]


def no_hook(phase: str) -> None:
    """The default PhaseHook: nothing to do between steps."""


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One sync at a time per checkout: an advisory lock on the directory (no lock file; the
    kernel drops it when its holder dies). A second sync waits, then usually finds the
    snapshot it wanted already there."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.err.print(f"waiting for another sync of {directory} to finish", soft_wrap=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM across the renames that swap the snapshot, then deliver them.

    Python runs signal handlers in the main thread between bytecodes; recording the signal
    instead makes the three renames one step: an interrupt lands before or after, never
    between. (pthread_sigmask would not do: other threads could still take the signal.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[signal.Signals] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def swap(project: Project, staging: Path, on_phase: PhaseHook = no_hook) -> None:
    """Rename the staged vendor + snapshot.json into place, keeping the old vendor in
    `staging/old-vendor` (deleted with the staging directory afterwards).

    Recovery after SIGKILL (`recover_stale`) reads the step reached from what is where:
    `staging/snapshot.json` present and `staging/vendor` gone means the new vendor is in
    place but the metadata is not.
    """
    vendor, old = project.vendor_dir, staging / "old-vendor"
    with signals_deferred():
        had_old = vendor.exists()
        if had_old:
            vendor.rename(old)
        on_phase("swap-old-moved")
        try:
            (staging / "vendor").rename(vendor)
        except OSError:
            if had_old:
                old.rename(vendor)
            raise
        on_phase("swap-new-moved")
        try:
            os.replace(staging / "snapshot.json", project.snapshot_file)
        except OSError:
            vendor.rename(staging / "vendor")
            if had_old:
                old.rename(vendor)
            raise
    on_phase("committed")


def recover_stale(project: Project) -> None:
    """Undo or finish what a killed sync left (we hold the lock: no sync is running)."""
    vendor = project.vendor_dir
    for staging in sorted(project.third_party.glob(STAGING_PREFIX + "*")):
        old, staged_vendor = staging / "old-vendor", staging / "vendor"
        swapped_in = (staging / "snapshot.json").exists() and not staged_vendor.exists()
        if old.exists() and not vendor.exists():  # killed between the first two renames
            old.rename(vendor)
        elif swapped_in and vendor.exists():  # new vendor in place, metadata not: undo
            vendor.rename(staged_vendor)
            if old.exists():
                old.rename(vendor)
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def third_party_dir(project: Project) -> Iterator[Path]:
    """third_party/llama.cpp, created if needed and removed again if a failed first sync
    leaves it empty (bad input must not leave anything behind)."""
    created = [p for p in (project.third_party.parent, project.third_party) if not p.exists()]
    project.third_party.mkdir(parents=True, exist_ok=True)
    try:
        yield project.third_party
    except BaseException:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                break
        raise
