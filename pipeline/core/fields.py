"""The one typed reader of the pipeline's data files (matrix.yaml, tags.yaml, the catalogue, the
smoke settings, version.json, snapshot.json...): every loader reads its mappings through
`Fields`, so every error names the file, the key and what was expected, in the same words, and a
typo fails when the file is read, before anything is built.

    spec = Fields(data, "matrix.yaml: backends.cpu", known=BACKEND_KEYS)
    title = spec.text("title")
    cross = spec.boolean("cross_compile", default=False)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

from pipeline.core.errors import ConfigError, PipelineError


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Missing()


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _child(where: str, key: str) -> str:
    """`matrix.yaml` + backends -> `matrix.yaml: backends`; then `...: backends.cpu`."""
    return f"{where}.{key}" if ":" in where else f"{where}: {key}"


class Fields:
    """One mapping of a data file, read key by key. `where` names it in every error
    ("matrix.yaml: backends.cpu"); `known`, when given, are the only keys it may have. Errors
    are `error` (ConfigError: exit 3) unless the file is a record with an error of its own."""

    def __init__(
        self,
        data: Any,
        where: str,
        known: Iterable[str] | None = None,
        *,
        expected: str = "a mapping",
        error: Callable[..., PipelineError] = ConfigError,
        hint: str | None = None,
    ) -> None:
        self.where = where
        self.error = error
        self.hint = hint
        if not isinstance(data, dict):
            # Nested mappings are checked by the reader of the mapping holding them (`sub`,
            # `entries`, `items`), which names their key: this is a file's top level.
            self.fail(f"top level is {type(data).__name__}, expected {expected}")
        self.data: dict[str, Any] = data
        if known is not None:
            self.no_unknown(known)

    # ---------------------------------------------------------------------------- plumbing

    def fail(self, message: str, hint: str | None = None) -> NoReturn:
        raise self.error(f"{self.where}: {message}", hint or self.hint)

    def no_unknown(self, known: Iterable[str]) -> None:
        known = tuple(known)
        unknown = sorted(str(k) for k in set(self.data) - set(known))
        if unknown:
            self.fail(
                f"unknown key(s) {', '.join(repr(k) for k in unknown)}",
                f"valid keys: {', '.join(sorted(known))}",
            )

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = REQUIRED, expected: str = "a value") -> Any:
        """The value as the file has it (REQUIRED: a missing key is an error naming
        `expected`; else `default` when the key is absent)."""
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            self.fail(f"missing key '{key}' (expected {expected})")
        return default

    def typed(
        self, key: str, kind: type | tuple[type, ...], expected: str, default: Any = REQUIRED
    ) -> Any:
        """The value, checked to be a `kind` (bool is never taken for an int)."""
        value = self.raw(key, default, expected)
        if value is default and key not in self.data:
            return value
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.fail(f"key '{key}' is {_shown(value)}, expected {expected}")
        return value

    def wrong(self, key: str, expected: str) -> NoReturn:
        """Refuse the value of `key` (of the right type, but not a right value)."""
        self.fail(f"key '{key}' is {self.data.get(key)!r}, expected {expected}")

    # ----------------------------------------------------------------------------- scalars

    def text(
        self,
        key: str,
        pattern: re.Pattern[str] | None = None,
        *,
        default: Any = REQUIRED,
        allow_empty: bool = False,
        expected: str = "a string",
    ) -> Any:
        """A string, stripped (white space folded in a `description`); checked against
        `pattern`. `default` (None allowed) when absent."""
        value = self.typed(key, str, expected, default)
        if key not in self.data:
            return value
        if not allow_empty and not value.strip():
            self.fail(f"key '{key}' is empty")
        if pattern is not None and value and not pattern.match(value):
            self.fail(f"key '{key}' is {value!r}, expected /{pattern.pattern}/")
        return " ".join(value.split()) if key == "description" else value.strip()

    def optional_text(self, key: str, pattern: re.Pattern[str] | None = None) -> str | None:
        """A string or null (absent: None)."""
        if self.data.get(key) is None:
            return None
        text: str = self.text(key, pattern, expected="a string or null")
        return text

    def choice(self, key: str, choices: Iterable[str], *, default: Any = REQUIRED) -> Any:
        options = tuple(choices)
        expected = " or ".join([", ".join(options[:-1]), options[-1]] if options[:-1] else options)
        value = self.typed(key, str, expected, default)
        if key in self.data and value not in options:
            self.wrong(key, expected)
        return value

    def boolean(self, key: str, *, default: Any = REQUIRED) -> Any:
        return self.typed(key, bool, "true or false", default)

    def integer(self, key: str, *, minimum: int | None = None, default: Any = REQUIRED) -> Any:
        expected = "a whole number" + (f" of at least {minimum}" if minimum is not None else "")
        value = self.typed(key, int, expected, default)
        if key in self.data and minimum is not None and value < minimum:
            self.wrong(key, expected)
        return value

    def number(
        self,
        key: str,
        *,
        above: float | None = None,
        at_most: float | None = None,
        default: Any = REQUIRED,
    ) -> Any:
        """An int or a float, as a float; `above` < value <= `at_most` where given."""
        bounds = [f"above {above:g}"] if above is not None else []
        bounds += [f"at most {at_most:g}"] if at_most is not None else []
        expected = "a number" + (f" ({', '.join(bounds)})" if bounds else "")
        value = self.typed(key, (int, float), expected, default)
        if key not in self.data:
            return value
        if (above is not None and value <= above) or (at_most is not None and value > at_most):
            self.wrong(key, expected)
        return float(value)

    # ------------------------------------------------------------------------- collections

    def strings(
        self, key: str, pattern: re.Pattern[str] | None = None, *, default: Any = REQUIRED
    ) -> Any:
        """A list of distinct strings (each matching `pattern`), as a tuple."""
        value = self.typed(key, list, "a list of strings", default)
        if key not in self.data:
            return value
        items: list[str] = []
        for item in value:
            if not isinstance(item, str) or (pattern is not None and not pattern.match(item)):
                expected = f"strings matching /{pattern.pattern}/" if pattern else "strings"
                self.fail(f"key '{key}' holds {item!r}, expected {expected}")
            if item in items:
                self.fail(f"key '{key}' lists {item!r} twice")
            items.append(item)
        return tuple(items)

    def mapping(self, key: str, *, default: Any = REQUIRED, expected: str = "a mapping") -> Any:
        return self.typed(key, dict, expected, default)

    def string_map(self, key: str, *, default: Any = REQUIRED) -> dict[str, str]:
        """A mapping of strings to strings (quoted in YAML)."""
        value = self.mapping(key, default=default, expected="a mapping of names to strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            self.fail(f"key '{key}' must map names to quoted strings")
        return dict(value)

    def sub(
        self, key: str, known: Iterable[str] | None = None, *, expected: str = "a mapping"
    ) -> Fields:
        """The mapping under `key`, read the same way."""
        return Fields(
            self.typed(key, dict, expected),
            _child(self.where, key),
            known,
            expected=expected,
            error=self.error,
            hint=self.hint,
        )

    def entries(
        self,
        key: str | None = None,
        known: Iterable[str] | None = None,
        *,
        name: re.Pattern[str] | None = None,
        non_empty: bool = True,
    ) -> Iterator[tuple[str, Fields]]:
        """(name, its Fields) for a mapping of named specs: this mapping, or the one under
        `key`. Names are checked against `name`."""
        if key is None:
            data, where = self.data, self.where
        else:
            data = self.mapping(key, expected="a mapping of names to specs")
            where = _child(self.where, key)
        if non_empty and not data:
            self.fail(f"key '{key}' is empty" if key else "is empty")
        for spec_name, spec in data.items():
            if not isinstance(spec_name, str) or (name is not None and not name.match(spec_name)):
                pattern = f" /{name.pattern}/" if name is not None else ""
                self.fail(f"{spec_name!r} is not a valid name here (expected{pattern})")
            if not isinstance(spec, dict):
                self.fail(f"{spec_name} is {_shown(spec)}, expected a mapping")
            yield spec_name, Fields(spec, _child(where, spec_name), known, error=self.error)

    def items(self, key: str, label: str = "", *, non_empty: bool = True) -> list[Fields]:
        """A list of mappings under `key`, each read the same way and named `label` and its
        number in errors ("rule 1", "rule 2"...)."""
        value = self.typed(key, list, "a list of mappings")
        if non_empty and not value:
            self.fail(f"key '{key}' must be a non-empty list")
        read = []
        for index, item in enumerate(value, 1):
            if not isinstance(item, dict):
                self.fail(f"{label or key} {index} is {_shown(item)}, expected a mapping")
            read.append(Fields(item, f"{self.where}: {label or key} {index}", error=self.error))
        return read
