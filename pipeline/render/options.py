"""`nox -s render`: which backends' Dockerfiles to write (default: every backend's), resolved
against the matrix, with the version.json they are rendered from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipeline.core.project import Project
from pipeline.matrix import Backend
from pipeline.matrix.choose import Resolved, backend_argument, backends_named


@dataclass(frozen=True)
class RenderOptions(Resolved):
    backends: tuple[Backend, ...]

    @classmethod
    def named(cls, project: Project, backends: str | None = None) -> RenderOptions:
        inputs = Resolved.load(project)
        every = tuple(inputs.matrix.backends.values())
        return cls(
            **vars(inputs), backends=backends_named(backends, inputs.matrix) if backends else every
        )


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    backend_argument(parser, "render only these backends (default: every backend)")


def resolve_render(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions.named(Project.discover(), args.backend)
