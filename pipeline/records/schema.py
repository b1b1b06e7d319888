"""How a record is read: its dataclass is its schema. A field without a default is a required
key, its annotation the type its value must have (nested records and tuples of them included);
keys a newer pipeline adds are ignored. A record that is not one is a RecordInvalidError (exit
15), whichever stage reads it; `validate` checks what the types alone do not say."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, fields
from typing import Any, ClassVar, TypeVar

from pipeline.core.errors import RecordInvalidError

SCHEMA = 1


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(k) for k in typing.get_args(kind))
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _decoded(kind: Any, value: Any) -> Any:
    """`value` as the annotated `kind`; ValueError when it is not one."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _decoded(option, value)
            except ValueError:
                continue
        raise ValueError(kind)
    if typing.get_origin(kind) is tuple:  # tuple[CheckResult, ...]: a list of nested records
        (item, _) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ValueError(kind)
        return tuple(_decoded(item, element) for element in value)
    if typing.get_origin(kind) is dict:  # dict[str, float]: a JSON object of one value type
        (key_kind, value_kind) = typing.get_args(kind)
        if not isinstance(value, dict):
            raise ValueError(kind)
        return {_decoded(key_kind, k): _decoded(value_kind, v) for k, v in value.items()}
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind.from_json(value, "")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int: a size of `true` is not a size.
    if kind is None or kind is type(None):
        ok = value is None
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(kind)
    return value


R = TypeVar("R", bound="Record")


class Record:
    """A record decoded from JSON by its own dataclass fields; `KIND` names it in messages."""

    KIND: ClassVar[str]
    HINT: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        """The record as JSON values (tuples become lists), the schema number first."""
        data: dict[str, Any] = json.loads(json.dumps(asdict(self)))  # type: ignore[call-overload]
        if "schema" in data:
            data = {"schema": data.pop("schema"), **data}
        return data

    @classmethod
    def from_json(cls: type[R], data: Any, where: str) -> R:
        def invalid(what: str) -> RecordInvalidError:
            return RecordInvalidError(f"{where}: {what} (not a {cls.KIND})", cls.HINT)

        if not isinstance(data, dict):
            raise invalid("expected a JSON object")
        hints = typing.get_type_hints(cls)
        if "schema" in hints and data.get("schema") != SCHEMA:
            raise RecordInvalidError(
                f"{where}: schema {data.get('schema')!r}, this pipeline reads schema {SCHEMA}",
                cls.HINT,
            )
        values: dict[str, Any] = {}
        for spec in fields(cls):  # type: ignore[arg-type]
            wrong = f"key {spec.name!r} is missing or not {_type_name(hints[spec.name])}"
            if spec.name not in data:
                if spec.default is MISSING and spec.default_factory is MISSING:
                    raise invalid(wrong)
                continue
            try:
                values[spec.name] = _decoded(hints[spec.name], data[spec.name])
            except (ValueError, RecordInvalidError):
                raise invalid(wrong) from None
        record = cls(**values)
        record.validate(where)
        return record

    def validate(self, where: str) -> None:
        """What the types alone do not say (digest syntax, known outputs)."""

    def refuse(self, where: str, key: str, expected: str) -> RecordInvalidError:
        """The one line a `validate` raises: the file, the key, its value and what it must be."""
        value = getattr(self, key)
        return RecordInvalidError(
            f"{where}: key {key!r} is {value!r:.120}, expected {expected} (not a {self.KIND})",
            self.HINT,
        )
