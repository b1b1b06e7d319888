"""Render the Dockerfile templates (dockerfiles/*.j2) into build/dockerfiles/<backend>.Dockerfile.

The inputs are pipeline/matrix.yaml, version.json and the templates, nothing else: no dates,
no environment, no snapshot. The same inputs give byte-identical files, so a rendered
Dockerfile can be read and diffed as what will be built; per-build values (the commit's date,
the CPU variant set) are build args that `nox -s build` fills in.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import jinja2

from pipeline import console
from pipeline.cli import Command
from pipeline.config import Project, VersionInfo, load_version
from pipeline.errors import ConfigError
from pipeline.matrix import Backend, Matrix, configure_flags, load_matrix

# Namespace of this project's own image labels (backend, CPU variant set).
LABEL_PREFIX = "org.llamacpp-images"


def dockerfile_path(project: Project, backend: str) -> Path:
    return project.build_dir / "dockerfiles" / f"{backend}.Dockerfile"


_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_./=:,+@%-]+$")


def _shell_quote(value: object) -> str:
    """A POSIX shell word: bare when safe, else in double quotes with \\ " $ ` escaped
    (double quotes rather than single ones: shellcheck then knows `$` is meant literally)."""
    text = str(value)
    if _SHELL_SAFE.match(text):
        return text
    for char in ("\\", '"', "$", "`"):
        text = text.replace(char, "\\" + char)
    return f'"{text}"'


def _dockerfile_quote(value: object) -> str:
    """A Dockerfile word in double quotes: the instruction parser unescapes \\, \" and \\$."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{text}"'


def _environment(templates: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates),
        undefined=jinja2.StrictUndefined,
        # Block tags on their own lines leave no blank lines or indentation behind.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["shquote"] = _shell_quote
    env.filters["dquote"] = _dockerfile_quote
    return env


def render_backend(project: Project, matrix: Matrix, backend: Backend, version: VersionInfo) -> str:
    """The Dockerfile text of one backend."""
    env = _environment(project.dockerfiles_dir)
    try:
        template = env.get_template(backend.template)
        text = template.render(
            backend=backend,
            matrix=matrix,
            version=version,
            cmake_flags=configure_flags(matrix, backend),
            label_prefix=LABEL_PREFIX,
        )
    except jinja2.TemplateNotFound as exc:
        raise ConfigError(
            f"template {exc.name} for backend {backend.name!r} not found in "
            f"{project.dockerfiles_dir}",
            "check the backend's 'template' key in pipeline/matrix.yaml",
        ) from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"{exc.filename or exc.name}:{exc.lineno}: template syntax: {exc.message}"
        ) from None
    except jinja2.UndefinedError as exc:
        raise ConfigError(
            f"template {backend.template} for backend {backend.name!r}: {exc.message}"
        ) from None
    # Collapse the blank lines that skipped blocks leave, so the output reads like hand-written.
    lines: list[str] = []
    for line in text.rstrip("\n").split("\n"):
        line = line.rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines) + "\n"


def render_all(
    project: Project, backends: Sequence[str] | None = None, matrix: Matrix | None = None
) -> list[Path]:
    """Write build/dockerfiles/<backend>.Dockerfile for the given backends (default: all).

    A file is rewritten only when its text changed, so its mtime says when it last changed.
    """
    matrix = matrix or load_matrix()
    version = load_version(project.version_file)
    names = list(backends) if backends else list(matrix.backends)
    chosen = [matrix.backend(name) for name in names]
    out_dir = project.build_dir / "dockerfiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for backend in chosen:
        text = render_backend(project, matrix, backend, version)
        path = dockerfile_path(project, backend.name)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        written.append(path)
    return written


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        metavar="B[,B...]",
        help="render only these backends (default: every backend in pipeline/matrix.yaml)",
    )


def _handler(args: argparse.Namespace) -> int:
    project = Project.discover()
    backends = [b for b in args.backend.split(",") if b] if args.backend else None
    for path in render_all(project, backends):
        console.out.print(str(path.relative_to(project.root)))
    return 0


COMMANDS: list[Command] = [
    (
        "render",
        "Render the Dockerfile of every backend into build/dockerfiles/<backend>.Dockerfile.",
        _add_arguments,
        _handler,
    )
]
