"""The compiler cache as files, shared by the build stage (which carries it between machines:
pipeline/build/carry.py) and the bench (which measures what it carries): its size, the hit rate
a build log reports, and replacing an exported directory only once the new one is complete."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# ccache's report, a line of BuildKit's plain log each: "Cacheable calls: n / m" and under it
# "Hits: h / n" (repeated again under "Local storage"). Other steps' lines may come between.
_STAT = re.compile(
    r"^(?:#(?P<step>\d+) [\d.]+ )?\s*(?P<what>Cacheable calls|Hits):"
    r"\s+(?P<n>\d+)\s*/\s*(?P<of>\d+)",
    re.MULTILINE,
)


def ccache_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def ccache_hits(log_text: str) -> tuple[int, int] | None:
    """(hits, cacheable calls) of a build log: the sum of its `ccache --show-stats` reports
    (one per compile step: the libraries, then the server; per platform in a multi-platform
    log). Each step zeroes the counters first, so none counts another's calls."""
    pending: set[str] = set()  # steps whose report has begun and whose Hits line is due
    hits = calls = reports = 0
    for line in _STAT.finditer(log_text):
        step = line["step"] or ""
        if line["what"] == "Cacheable calls":
            pending.add(step)
        elif step in pending:
            pending.discard(step)
            hits, calls, reports = hits + int(line["n"]), calls + int(line["of"]), reports + 1
    return (hits, calls) if reports else None


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
