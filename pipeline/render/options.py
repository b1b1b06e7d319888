"""`nox -s render`: which backends' Dockerfiles to write (default: every backend's), resolved
against the matrix, with the version.json they are rendered from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from pipeline.core.project import Project
from pipeline.core.version import VersionInfo, load_version
from pipeline.matrix import Backend, Matrix, load_matrix
from pipeline.matrix.choose import backend_argument, backends_named


@dataclass(frozen=True)
class RenderOptions:
    project: Project
    matrix: Matrix = field(repr=False)
    version: VersionInfo
    backends: tuple[Backend, ...]

    @classmethod
    def named(cls, project: Project, backends: str | None = None) -> RenderOptions:
        matrix = load_matrix()
        chosen = backends_named(backends, matrix) if backends else tuple(matrix.backends.values())
        return cls(project, matrix, load_version(project.version_file), chosen)


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    backend_argument(parser, "render only these backends (default: every backend)")


def resolve_render(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions.named(Project.discover(), args.backend)
