"""Typed config: YAML and JSON into trees of frozen dataclasses, validating every field.

The one config decoder of the project, generic over any dataclass tree that
follows the field conventions of docs/CONTRACTS.md (allowed types,
`help`/`min`/`max`/`path` metadata, every field with a default):
pipeline/config/__init__.py loads run configs with it, the train stage its saved model config.

Every error a user can cause is a `UserError` naming where the value was
stated (the YAML file or the `-o` override) and the dotted key, e.g.
`configs/x.yaml: train.phases[1].lr_start: expected a number >= 0, got -1 (...)`.
This module converts and validates; ion/schema/files.py reads the YAML files,
overrides.py applies `-o key=value`, plain.py turns a tree back into plain data.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from ion.errors import UserError
from ion.schema.plain import to_plain

# YAML 1.1 (PyYAML) reads `1e-3` as a string: it wants `1.0e-3`. Float fields
# accept that spelling rather than make users learn the quirk.
_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a value was stated: a config file or a command-line override."""

    label: str  # shown in messages: "configs/x.yaml" or "-o train.lr=abc"
    base_dir: Path  # relative `path` fields resolve against it
    is_override: bool = False

    def fix_hint(self, default: Any) -> str:
        dropped = "drop the -o" if self.is_override else "drop the key"
        return f"fix the value or {dropped} to use {_show(default)}"


@dataclasses.dataclass(frozen=True)
class _Stated:
    """A mapping entry read from YAML with the file that stated it (kept through `extends`)."""

    value: Any  # a scalar, a list, or a dict of _Stated (a nested mapping)
    origin: Origin


def display_path(path: Path) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _show(value: Any) -> str:
    """A value as the user wrote it (one line of JSON, which YAML also reads)."""
    return json.dumps(to_plain(_strip_origins(value)), default=str)


def _strip_origins(value: Any) -> Any:
    if isinstance(value, _Stated):
        return _strip_origins(value.value)
    if isinstance(value, dict):
        return {k: _strip_origins(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------ type dispatch


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The dataclass fields of `cls` with their resolved type hints, in order."""
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name!r} has no default (every config field needs one)")


def _optional_arg(tp: Any) -> Any | None:
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported config type {tp}: only Optional[X] unions are allowed")
        return args[0]
    return None


def describe_type(tp: Any) -> str:
    """The type in words, as error messages and the config reference show it."""
    inner = _optional_arg(tp)
    if inner is not None:
        return f"{describe_type(inner)} or null"
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({describe_type(args[0])})"
        return f"a list of {len(args)} items (" + "; ".join(describe_type(a) for a in args) + ")"
    if origin is dict:
        return f"a mapping of strings to ({describe_type(typing.get_args(tp)[1])})"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    raise TypeError(f"unsupported config type {tp!r}")


def bounds_text(meta: typing.Mapping[str, Any]) -> str:
    parts = []
    if "min" in meta:
        parts.append(f">= {meta['min']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    return " and ".join(parts)


# ------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class _Where:
    """The place a value is converted at: origin, dotted key, its field's metadata and default."""

    origin: Origin
    key: str
    meta: typing.Mapping[str, Any]
    default: Any

    def at(self, key: str, origin: Origin | None = None) -> "_Where":
        return dataclasses.replace(self, key=key, origin=origin or self.origin)

    def error(self, expected: str, got: Any) -> UserError:
        return UserError(f"{self.origin.label}: {self.key}: expected {expected}, got {_show(got)} "
                         f"({self.origin.fix_hint(self.default)})")


def _unwrap(value: Any, origin: Origin) -> tuple[Any, Origin]:
    if isinstance(value, _Stated):
        return value.value, value.origin
    return value, origin


def _convert(tp: Any, value: Any, where: _Where) -> Any:
    """Check `value` (from YAML, maybe with _Stated mappings) against `tp`; return the typed value."""
    inner = _optional_arg(tp)
    if inner is not None:
        return None if value is None else _convert(inner, value, where)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise where.error(describe_type(tp), value)
        return build(tp, value, origin=where.origin, key=where.key)
    if origin is tuple:
        return _convert_tuple(tp, value, where)
    if origin is dict:
        return _convert_dict(tp, value, where)
    if origin is Literal:
        options = typing.get_args(tp)
        if not any(value == o and type(value) is type(o) for o in options):
            raise where.error(describe_type(tp), value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise where.error(describe_type(tp), value)
        return value
    if tp is int or tp is float:
        return _convert_number(tp, value, where)
    if tp is str:
        if not isinstance(value, str):
            raise where.error(describe_type(tp), value)
        if where.meta.get("path") and value:
            return os.path.normpath(where.origin.base_dir / os.path.expanduser(value))
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where.key}")


def _convert_number(tp: type, value: Any, where: _Where) -> int | float:
    bounds = bounds_text(where.meta)
    expected = describe_type(tp) + (f" {bounds}" if bounds else "")
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float) if tp is float else int):
        raise where.error(expected, value)
    number = float(value) if tp is float else value
    if math.isnan(number):
        raise where.error(expected, value)
    if ("min" in where.meta and number < where.meta["min"]) or ("max" in where.meta and number > where.meta["max"]):
        raise where.error(expected, value)
    return number


def _convert_tuple(tp: Any, value: Any, where: _Where) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise where.error(describe_type(tp), value)
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            raise where.error(describe_type(tp), value)
        item_types = list(args)
    return tuple(_convert(t, v, where.at(f"{where.key}[{i}]")) for i, (t, v) in enumerate(zip(item_types, value)))


def _convert_dict(tp: Any, value: Any, where: _Where) -> dict:
    key_type, value_type = typing.get_args(tp)
    if key_type is not str:
        raise TypeError(f"config mappings need string keys, {where.key} has {key_type}")
    if not isinstance(value, dict):
        raise where.error(describe_type(tp), value)
    out = {}
    for k, v in value.items():
        v, v_origin = _unwrap(v, where.origin)
        if not isinstance(k, str):
            raise where.at(where.key, v_origin).error("string keys", k)
        out[k] = _convert(value_type, v, where.at(f"{where.key}.{k}", v_origin))
    return out


def _unknown_key(cls: type, key: str, dotted: str, origin: Origin) -> UserError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    section = dotted.rsplit(".", 1)[0] if "." in dotted else "the top level"
    return UserError(f"{origin.label}: {dotted}: unknown key ({hint}known keys of {section}: {', '.join(names)})")


def build(cls: type, mapping: dict, *, origin: Origin, key: str = "") -> Any:
    """Build dataclass `cls` from a YAML mapping, validating every stated field.

    `mapping` may hold `_Stated` entries (from `read_layered`) or plain values; keys
    not stated take the field defaults. `key` is the dotted key of `mapping` (for
    messages); `origin` is where the mapping was stated.
    """
    specs = {f.name: (f, tp) for f, tp in fields_of(cls)}
    kwargs = {}
    for name, raw in mapping.items():
        value, value_origin = _unwrap(raw, origin)
        dotted = f"{key}.{name}" if key else str(name)
        if name not in specs:
            raise _unknown_key(cls, str(name), dotted, value_origin)
        f, tp = specs[name]
        where = _Where(origin=value_origin, key=dotted, meta=f.metadata, default=field_default(f))
        kwargs[name] = _convert(tp, value, where)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise UserError(f"{origin.label}: {key or 'top level'}: {err}") from None

