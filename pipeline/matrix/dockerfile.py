"""Dockerfile text from the templates (dockerfiles/*.j2), the matrix and version.json.

The inputs are those three, nothing else: no dates, no environment, no snapshot. The same
inputs give byte-identical text, so the rendered Dockerfiles are committed
(dockerfiles/rendered/<backend>.Dockerfile) and read in review as what will be built; per-build
values (the commit's date, the CPU variant set) are build args that `nox -s build` fills in.
`nox -s render` writes the files; build refuses one that is not what the templates render.
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

from pipeline.core.errors import ConfigError
from pipeline.core.project import Project
from pipeline.core.version import VersionInfo
from pipeline.matrix.backends import Backend, Matrix, configure_flags
from pipeline.oci.image import LABEL_PREFIX

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


def render_dockerfile(
    project: Project, matrix: Matrix, backend: Backend, version: VersionInfo
) -> str:
    """The Dockerfile text of one backend."""
    env = _environment(project.templates_dir)
    try:
        template = env.get_template(backend.template)
        text = template.render(
            backend=backend,
            matrix=matrix,
            version=version,
            cmake_flags=configure_flags(matrix, backend, gpu_architectures=False),
            label_prefix=LABEL_PREFIX,
        )
    except jinja2.TemplateNotFound as exc:
        raise ConfigError(
            f"template {exc.name} for backend {backend.name!r} not found in "
            f"{project.templates_dir}",
            "check the backend's 'template' key in pipeline/matrix/matrix.yaml",
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


def current_dockerfile(
    project: Project, matrix: Matrix, backend: Backend, version: VersionInfo
) -> Path:
    """The rendered Dockerfile of `backend`, checked to be what the templates render now."""
    path = project.rendered_dockerfile(backend.name)
    expected = render_dockerfile(project, matrix, backend, version)
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    if current != expected:
        state = "is missing" if current is None else "is not what the templates render now"
        raise ConfigError(
            f"{project.shown(path)} {state}",
            "run `nox -s render` and commit the result (rendered Dockerfiles are reviewed)",
        )
    return path
