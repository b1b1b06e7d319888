"""Reading and writing the pipeline's files: a data file's text (one ConfigError saying why it
cannot be read), YAML parsed with the line of its first error, and JSON written atomically.
What a file's values must be is `pipeline.core.fields`' business."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, PipelineError


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
    except RecursionError:
        raise ConfigError(f"{where} nests deeper than any data file of the pipeline") from None


def parse_json(
    text: str,
    where: str,
    error: Callable[..., PipelineError] = ConfigError,
    hint: str | None = None,
) -> Any:
    """JSON text of a data file or record; `error` (ConfigError unless the file is a record
    with an error type of its own) saying where it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise error(message, hint) from None
    except RecursionError:
        raise error(f"{where} nests deeper than any file of the pipeline", hint) from None


def load_yaml(path: Path) -> Any:
    """A YAML data file of the pipeline's (matrix, tag rules, presets, smoke settings)."""
    return parse_yaml(read_data_file(path, "restore it from the repository"), path.name)


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
