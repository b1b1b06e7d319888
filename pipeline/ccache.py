"""The compiler cache as files, shared by the build stage (which carries it between machines:
pipeline/build/carry.py) and the bench (which measures what it carries): its size, the hit rate
a build log reports, and replacing an exported directory only once the new one is complete."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The Hits line under "Cacheable calls" (the one under "Local storage" repeats it).
_HITS = re.compile(
    r"Cacheable calls:.*\n(?:#\d+ [\d.]+ )?\s*Hits:\s+(\d+)\s*/\s*(\d+)", re.MULTILINE
)


def ccache_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def ccache_hits(log_text: str) -> tuple[int, int] | None:
    """(hits, cacheable calls) of a build log: the sum of its `ccache --show-stats` reports
    (one per compile step: the libraries, then the server; per platform in a multi-platform
    log). Each step zeroes the counters first, so none counts another's calls."""
    found = _HITS.findall(log_text)
    if not found:
        return None
    return sum(int(h) for h, _ in found), sum(int(c) for _, c in found)


@contextmanager
def replaced_directory(directory: Path) -> Iterator[Path]:
    """A staging directory that replaces `directory` when the block succeeds; else removed."""
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
