"""The build lock: one compile or timed measurement at a time on a shared machine (the lab has 2
cores). The bench holds it around every build and timing it makes, so another build does not
skew them; it is the same file `flock` takes in a shell, and the test suite's builds take it
too. $LLAMA_BUILD_LOCK names another file."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.core import console

LAB_LOCK = Path(os.environ.get("LLAMA_BUILD_LOCK") or "/tmp/lab-docker-build.lock")


@contextlib.contextmanager
def lab_lock(path: Path | None = LAB_LOCK, what: str = "") -> Iterator[None]:
    """Hold the lab's build lock (None: the caller already holds it); waiting says so."""
    if path is None:
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.err.print(f"[dim]waiting for the build lock {path} ({what})[/dim]")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
