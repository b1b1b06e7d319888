"""`nox -s render`: write dockerfiles/rendered/<backend>.Dockerfile for every backend.

The rendered files are this stage's record: committed, so a reviewer reads a diff of what is
built, and checked by build (which refuses one that is not what the templates render) and by
a test. A file is rewritten only when its text changed, so its mtime says when it last did.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core import console
from pipeline.core.arguments import Command
from pipeline.matrix.dockerfile import render_dockerfile
from pipeline.render.options import RenderOptions, add_render_arguments, resolve_render

__all__ = ["COMMANDS", "render"]


def render(options: RenderOptions) -> list[Path]:
    """Write the rendered Dockerfile of each backend; their paths."""
    project = options.project
    project.rendered_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for backend in options.backends:
        text = render_dockerfile(project, options.matrix, backend, options.version)
        path = project.rendered_dockerfile(backend.name)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        written.append(path)
    return written


def _run(args: argparse.Namespace) -> int:
    options = resolve_render(args)
    for path in render(options):
        console.out.print(options.project.shown(path))
    return 0


COMMANDS = (
    Command(
        "render",
        "Render the Dockerfile of every backend into dockerfiles/rendered/<backend>.Dockerfile.",
        add_render_arguments,
        _run,
    ),
)
