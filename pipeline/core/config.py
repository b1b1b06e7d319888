"""Where things live, and version.json: loading, validating and rewriting the pin."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError

DEFAULT_REPOSITORY = "https://github.com/ggml-org/llama.cpp"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Semantic Versioning 2.0.0, the official regex (prerelease and build metadata allowed).
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
IMAGE_RE = re.compile(
    r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)+$"
)


class Under:
    """A path of the project's layout: `relative` under the root, or under another of its
    paths (`of`). Read on a Project, it is that project's path."""

    def __init__(self, relative: str, of: str | None = None) -> None:
        self.relative = relative
        self.of = of

    def __get__(self, project: Project, owner: type[Project]) -> Path:
        base = project.root if self.of is None else getattr(project, self.of)
        return Path(base) / self.relative


@dataclass(frozen=True)
class Project:
    """The repository's layout; every stage finds its inputs and outputs through it."""

    root: Path

    @classmethod
    def discover(cls, start: Path | None = None) -> Project:
        """The nearest directory at or above `start` (or $PIPELINE_ROOT) holding version.json."""
        env_root = os.environ.get("PIPELINE_ROOT")
        here = Path(env_root) if env_root else (start or Path.cwd())
        here = here.resolve()
        for candidate in (here, *here.parents):
            if (candidate / "version.json").is_file():
                return cls(candidate)
        raise ConfigError(
            f"no version.json found in {here} or any parent directory",
            "run from the project checkout, or set PIPELINE_ROOT",
        )

    # Where things live. Each is a path under the root (or under another of these).
    version_file = Under("version.json")
    third_party = Under("third_party/llama.cpp")
    vendor_dir = Under("vendor", of="third_party")
    snapshot_file = Under("snapshot.json", of="third_party")
    build_dir = Under("build")
    reports_dir = Under("reports", of="build_dir")  # what one stage hands the next
    logs_dir = Under("logs", of="build_dir")  # full build logs, named in every error about them
    models_dir = Under("models", of="build_dir")  # generated test models, cached by shape
    dockerfiles_dir = Under("dockerfiles")  # templates, entrypoint, scripts (`support`)
    rendered_dir = Under("rendered", of="dockerfiles_dir")  # committed: diffs show what is built

    def rendered_dockerfile(self, backend: str) -> Path:
        return self.rendered_dir / f"{backend}.Dockerfile"

    def shown(self, path: Path) -> str:
        """`path` relative to the root when it is inside it, for messages."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


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


def _require(data: dict[str, Any], key: str, kind: type, where: str, expected: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}' (expected {expected})")
    value = data[key]
    if not isinstance(value, kind):
        raise ConfigError(
            f"{where}: key '{key}' is {type(value).__name__} {value!r}, expected {expected}"
        )
    return value


def parse_version(data: Any, where: str = "version.json") -> VersionInfo:
    """Validate a decoded version.json; every error names the key and what was expected."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level is {type(data).__name__}, expected an object")
    version = _require(data, "version", str, where, "a semantic version such as 0.1.0")
    if not SEMVER_RE.match(version):
        raise ConfigError(
            f"{where}: key 'version' is {version!r}, expected a semantic version such as 0.1.0"
        )
    llama = _require(data, "llama_cpp", dict, where, "an object with repository, commit, ref")
    sub = f"{where}: llama_cpp"
    repository = llama.get("repository", DEFAULT_REPOSITORY)
    if not isinstance(repository, str) or not repository.strip():
        raise ConfigError(f"{sub}: key 'repository' is {repository!r}, expected a git URL")
    commit = _require(llama, "commit", str, sub, "a full 40-hex commit sha")
    if not COMMIT_RE.match(commit):
        raise ConfigError(
            f"{sub}: key 'commit' is {commit!r}, expected a full 40-hex lowercase commit sha"
        )
    ref = llama.get("ref")
    if ref is not None and (not isinstance(ref, str) or not ref.strip()):
        raise ConfigError(f"{sub}: key 'ref' is {ref!r}, expected a tag/branch name or null")
    unknown = set(llama) - {"repository", "commit", "ref"}
    if unknown:
        raise ConfigError(
            f"{sub}: unknown key(s) {sorted(unknown)} (expected repository, commit, ref)"
        )
    image = _require(data, "image", str, where, "an image name such as docker.io/acme/llama-server")
    if not IMAGE_RE.match(image):
        raise ConfigError(
            f"{where}: key 'image' is {image!r}, expected a lowercase image name "
            "such as docker.io/acme/llama-server"
        )
    extra = {k: v for k, v in data.items() if k not in {"version", "llama_cpp", "image"}}
    return VersionInfo(version, LlamaCppPin(repository, commit, ref), image, extra)


def read_data_file(path: Path, missing_hint: str) -> str:
    """The text of a data file the pipeline needs (version.json, the YAML data), or one
    ConfigError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found", missing_hint) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not UTF-8 text") from None


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}") from None


def load_yaml(path: Path) -> Any:
    """A YAML data file of the pipeline's (matrix, tag rules, presets, smoke settings)."""
    return parse_yaml(read_data_file(path, "restore it from the repository"), path.name)


def load_version(path: Path) -> VersionInfo:
    text = read_data_file(path, "create it or run from the project checkout")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse_version(data, path.name)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON beside `path` and rename over it: readers see the old or the new file, whole."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_version(path: Path, info: VersionInfo) -> None:
    write_json_atomic(path, info.to_json())
