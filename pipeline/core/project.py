"""The repository's layout: where every stage finds its inputs and writes its outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ConfigError


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
    dockerfiles_dir = Under("dockerfiles")
    templates_dir = Under("templates", of="dockerfiles_dir")  # *.Dockerfile.j2 and macros
    image_files_dir = Under("image", of="dockerfiles_dir")  # copied into images (`support`)
    rendered_dir = Under("rendered", of="dockerfiles_dir")  # committed: diffs show what is built

    def rendered_dockerfile(self, backend: str) -> Path:
        return self.rendered_dir / f"{backend}.Dockerfile"

    def shown(self, path: Path) -> str:
        """`path` relative to the root when it is inside it, for messages."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)
