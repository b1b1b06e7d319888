"""Typed readers for the YAML data files (matrix.yaml and the like): each error names the file,
the key, and what was expected, so a typo fails before anything is built."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.core.errors import ConfigError


def field_of(data: Mapping[str, Any], key: str, kind: type, where: str, expected: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing key '{key}' (expected {expected})")
    value = data[key]
    # bool is an int: a uid of `true` is a typo, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{where}: key '{key}' is {type(value).__name__} {value!r}, expected {expected}"
        )
    return value


def no_unknown_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}",
            f"valid keys: {', '.join(sorted(known))}",
        )


def text_of(
    data: Mapping[str, Any],
    key: str,
    where: str,
    pattern: re.Pattern[str] | None = None,
    allow_empty: bool = False,
) -> str:
    value: str = field_of(data, key, str, where, "a string")
    if not allow_empty and not value.strip():
        raise ConfigError(f"{where}: key '{key}' is empty")
    if pattern is not None and value and not pattern.match(value):
        raise ConfigError(f"{where}: key '{key}' is {value!r}, expected /{pattern.pattern}/")
    return value.strip() if key != "description" else " ".join(value.split())


def strings_of(
    data: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str] | None = None
) -> tuple[str, ...]:
    value = field_of(data, key, list, where, "a list of strings")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or (pattern is not None and not pattern.match(item)):
            expected = f"strings matching /{pattern.pattern}/" if pattern else "strings"
            raise ConfigError(f"{where}: key '{key}' holds {item!r}, expected {expected}")
        if item in items:
            raise ConfigError(f"{where}: key '{key}' lists {item!r} twice")
        items.append(item)
    return tuple(items)
