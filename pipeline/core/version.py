"""version.json: this project's release, the llama.cpp pin and the published image name; loaded,
validated (every error names the key) and rewritten atomically.

The pin lives here and nowhere else: .ci/provision and the tests read it from this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering
from pathlib import Path
from typing import Any

from pipeline.core.datafile import parse_json, read_data_file, write_json_atomic
from pipeline.core.errors import ConfigError
from pipeline.core.fields import Fields

DEFAULT_REPOSITORY = "https://github.com/ggml-org/llama.cpp"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}\Z")
# Semantic Versioning 2.0.0, the official regex (prerelease and build metadata allowed).
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
IMAGE_RE = re.compile(
    r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)+$"
)
# A git URL or path: one line of printable characters (it is rendered into Dockerfiles).
_REPOSITORY_RE = re.compile(r"^[^\x00-\x20\x7f]+$")
LLAMA_BUILD_RE = re.compile(r"^b\d+$")
_REF_RE = re.compile(r"^[^\x00-\x20\x7f~^:?*\[\\]+$")


@total_ordering
@dataclass(frozen=True)
class SemVer:
    """A semantic version, ordered by SemVer 2.0.0 §11 (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> SemVer:
        match = SEMVER_RE.match(text.strip())
        if not match:
            raise ConfigError(f"{text!r} is not a semantic version such as 1.2.3 or 1.3.0-rc.1")
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre)

    @classmethod
    def parse_or_none(cls, text: str | None) -> SemVer | None:
        if text is None:
            return None
        try:
            return cls.parse(text)
        except ConfigError:
            return None

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after its prereleases; numeric identifiers before alphanumeric ones.
        ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, ids)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{'.'.join(self.prerelease)}" if self.prerelease else base

    def bumped(self, part: str) -> SemVer:
        """The next release: `patch`, `minor` or `major` (a prerelease's own release for
        `patch` of X.Y.Z-rc.N: X.Y.Z)."""
        if part == "major":
            return SemVer(self.major + 1, 0, 0)
        if part == "minor":
            return SemVer(self.major, self.minor + 1, 0)
        if self.prerelease:
            return SemVer(self.major, self.minor, self.patch)
        return SemVer(self.major, self.minor, self.patch + 1)


def build_number(ref: str | None) -> int | None:
    """`b6543` -> 6543: upstream's build number, when a pin's ref is a release tag."""
    return int(ref[1:]) if ref and LLAMA_BUILD_RE.match(ref) else None


@dataclass(frozen=True)
class LlamaCppPin:
    repository: str
    commit: str
    ref: str | None

    @property
    def short(self) -> str:
        return self.commit[:7]


@dataclass(frozen=True)
class VersionInfo:
    """version.json, validated. `extra` keeps keys later stages add, so rewrites keep them."""

    version: str
    llama_cpp: LlamaCppPin
    image: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "llama_cpp": {
                "repository": self.llama_cpp.repository,
                "commit": self.llama_cpp.commit,
                "ref": self.llama_cpp.ref,
            },
            "image": self.image,
        }
        data.update(self.extra)
        return data


def parse_version(data: Any, where: str = "version.json") -> VersionInfo:
    """Validate a decoded version.json; every error names the key and what was expected."""
    top = Fields(data, where, expected="an object")
    version = top.text("version", expected="a semantic version such as 0.1.0")
    if not SEMVER_RE.match(version):
        top.wrong("version", "a semantic version such as 0.1.0")
    llama = top.sub(
        "llama_cpp",
        ("repository", "commit", "ref"),
        expected="an object with repository, commit, ref",
    )
    repository = llama.text(
        "repository", _REPOSITORY_RE, default=DEFAULT_REPOSITORY, expected="a git URL"
    )
    commit = llama.text("commit", expected="a full 40-hex commit sha")
    if not COMMIT_RE.match(commit):
        llama.wrong("commit", "a full 40-hex lowercase commit sha")
    ref = llama.optional_text("ref", _REF_RE)
    image = top.text("image", expected="an image name such as docker.io/acme/llama-server")
    if not IMAGE_RE.match(image):
        top.wrong("image", "a lowercase image name such as docker.io/acme/llama-server")
    extra = {k: v for k, v in top.data.items() if k not in {"version", "llama_cpp", "image"}}
    return VersionInfo(version, LlamaCppPin(repository, commit, ref), image, extra)


def load_version(path: Path) -> VersionInfo:
    text = read_data_file(path, "create it or run from the project checkout")
    return parse_version(parse_json(text, path.name), path.name)


def save_version(path: Path, info: VersionInfo) -> None:
    write_json_atomic(path, info.to_json())
