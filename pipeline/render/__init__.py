"""`nox -s render`: write dockerfiles/rendered/<backend>.Dockerfile for every backend.

The rendered files are this stage's record: committed, so a reviewer reads a diff of what is
built, and checked by build (which refuses one that is not what the templates render) and by
a test. A file is rewritten only when its text changed, so its mtime says when it last did.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pipeline.core import console
from pipeline.core.config import Project, load_version
from pipeline.core.options import Command, add_render_arguments, resolve_render
from pipeline.matrix import load_matrix
from pipeline.matrix.dockerfile import render_dockerfile


def render(project: Project, backends: Sequence[str]) -> list[Path]:
    """Write the rendered Dockerfile of each backend; their paths."""
    matrix = load_matrix()
    version = load_version(project.version_file)
    chosen = [matrix.backend(name) for name in backends]
    project.rendered_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for backend in chosen:
        text = render_dockerfile(project, matrix, backend, version)
        path = project.rendered_dockerfile(backend.name)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        written.append(path)
    return written


def _run(args: argparse.Namespace) -> int:
    project, backends = resolve_render(args)
    for path in render(project, backends):
        console.out.print(project.shown(path))
    return 0


COMMANDS = (
    Command(
        "render",
        "Render the Dockerfile of every backend into dockerfiles/rendered/<backend>.Dockerfile.",
        add_render_arguments,
        _run,
    ),
)
