"""Child processes in groups of their own, and the time as records write it.

git (sync) and buildx (build, bench) each run in a new session, so a terminal's Ctrl-C reaches
only the pipeline, which then stops the whole group: nothing keeps writing into a directory
that is being cleaned up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
from typing import Any


def stop_group(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), SIGKILL it after
    `grace` seconds, and reap `proc`. A process that already exited is only reaped."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the second (`2026-12-01T20:47:02Z`)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
