"""version.json: this project's release, the llama.cpp pin and the published image name; loaded,
validated (every error names the key) and rewritten atomically.

The pin lives here and nowhere else: .ci/provision and the tests read it from this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.datafile import parse_json, read_data_file, write_json_atomic
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
_REF_RE = re.compile(r"^[^\x00-\x20\x7f~^:?*\[\\]+$")


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
