"""Frozen dataclasses to and from plain JSON/YAML data, strictly.

One converter serves both the config loader and the artifact store, so a
field added to a dataclass is read and written the same way everywhere, and
an unknown or mistyped key is an error naming its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class SchemaError(ValueError):
    """Data does not fit a dataclass schema; the message names the dotted key."""


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build ``cls`` from ``data``; missing keys take the dataclass defaults."""
    if not isinstance(data, dict):
        raise SchemaError(f"{path or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise SchemaError(
            f"unknown key {where}{unknown[0]!s} (known keys: {', '.join(sorted(fields))})"
        )
    missing = [
        f.name for f in fields.values()
        if f.init and f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SchemaError(f"{path or cls.__name__}: missing key {missing[0]}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise SchemaError(f"{path or cls.__name__}: {exc}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, path)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_coerce(key_t, k, path): _coerce(val_t, v, f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SchemaError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SchemaError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SchemaError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise SchemaError(f"{path}: expected a string, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise SchemaError(f"{path}: expected null, got {value!r}")
    return value
