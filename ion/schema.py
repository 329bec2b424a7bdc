"""Typed config: YAML and JSON into trees of frozen dataclasses, validating every field.

The one config decoder of the project, generic over any dataclass tree that
follows the field conventions of docs/CONTRACTS.md (allowed types,
`help`/`min`/`max`/`path` metadata, every field with a default):
pipeline/config/__init__.py loads run configs with it, the train stage its saved model config.

Every error a user can cause is a `UserError` naming where the value was
stated (the YAML file or the `-o` override) and the dotted key, e.g.
`configs/x.yaml: train.phases[1].lr_start: expected a number >= 0, got -1 (...)`.
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
from typing import Any, Callable, Literal, Union

import yaml

from ion.errors import UserError

EXTENDS_KEY = "extends"

# YAML 1.1 (PyYAML) reads `1e-3` as a string: it wants `1.0e-3`. Float fields
# accept that spelling rather than make users learn the quirk.
_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*$")
_KEY_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


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


# ---------------------------------------------------------------- YAML files


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key stated twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, label: str) -> Any:
    """Parse YAML text; syntax errors become a UserError naming `label` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{label}: not valid YAML{where}: {problem}") from None


def read_layered(path: Path, *, path_base: Callable[[Path], Path] = lambda folder: folder,
                 _chain: tuple[Path, ...] = ()) -> dict[str, _Stated]:
    """Read a YAML config file, following `extends: other.yaml` (relative to the file).

    Returns the merged top-level mapping; every entry remembers which file stated it,
    so errors name that file and `path` fields resolve against
    `path_base(its directory)` (by default the directory itself).
    """
    path = Path(os.path.abspath(path))
    label = display_path(path)
    if path in _chain:
        cycle = " -> ".join(display_path(p) for p in (*_chain, path))
        raise UserError(f"{label}: `extends` forms a cycle: {cycle} (remove one of the `extends` keys)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{label}: no such config file (check the path given to --config"
                        f"{' or to extends in ' + display_path(_chain[-1]) if _chain else ''})") from None
    except OSError as err:
        raise UserError(f"{label}: cannot read the config file: {err.strerror}") from None
    raw = parse_yaml(text, label)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{label}: expected a mapping of config sections at the top level, "
                        f"got {type(raw).__name__} (start the file with e.g. `name: myrun`)")
    origin = Origin(label=label, base_dir=path_base(path.parent))
    layered = _stated_mapping(raw, origin)
    parent = layered.pop(EXTENDS_KEY, None)
    if parent is None:
        return layered
    if not isinstance(parent.value, str) or not parent.value:
        raise UserError(f"{label}: {EXTENDS_KEY}: expected the path of another config file, "
                        f"got {_show(parent.value)}")
    base = read_layered(path.parent / os.path.expanduser(parent.value), path_base=path_base,
                        _chain=(*_chain, path))
    return _merge(base, layered)


def _stated_mapping(raw: dict, origin: Origin) -> dict[str, _Stated]:
    """Wrap every mapping entry (recursively through mappings, not lists) with its origin."""
    out = {}
    for key, value in raw.items():
        inner = _stated_mapping(value, origin) if isinstance(value, dict) else value
        out[key] = _Stated(inner, origin)
    return out


def _merge(base: dict[str, _Stated], child: dict[str, _Stated]) -> dict[str, _Stated]:
    """`child` over `base`: mappings merge key by key, everything else (lists too) replaces."""
    merged = dict(base)
    for key, entry in child.items():
        below = merged.get(key)
        if below is not None and isinstance(below.value, dict) and isinstance(entry.value, dict):
            merged[key] = _Stated(_merge(below.value, entry.value), entry.origin)
        else:
            merged[key] = entry
    return merged


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


# -------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`train.phases[1].lr=0.01` -> (["train", "phases", 1, "lr"], 0.01); the value is YAML."""
    label = f"-o {text}"
    if "=" not in text:
        raise UserError(f"{label}: expected KEY=VALUE, e.g. -o train.phases[0].lr_start=0.01")
    dotted, rhs = text.split("=", 1)
    dotted = dotted.strip()
    if not _OVERRIDE_KEY.match(dotted):
        raise UserError(f"{label}: {dotted!r} is not a dotted key (write section.key or section.list[0].key)")
    tokens: list[str | int] = [name if name else int(index) for name, index in _KEY_TOKEN.findall(dotted)]
    return tokens, parse_yaml(rhs, label)


def apply_override(root: Any, text: str, *, base_dir: Path | None = None) -> Any:
    """Return `root` with one `-o key=value` override applied and validated.

    Relative `path` values resolve against `base_dir` (default: the current directory).
    """
    tokens, value = parse_override(text)
    origin = Origin(label=f"-o {text}", base_dir=base_dir or Path.cwd(), is_override=True)
    return _set_in_dataclass(root, tokens, value, origin=origin, key="")


def _set_in_dataclass(obj: Any, tokens: list[str | int], value: Any, *, origin: Origin, key: str) -> Any:
    name = tokens[0]
    dotted = f"{key}.{name}" if key else str(name)
    specs = {f.name: (f, tp) for f, tp in fields_of(type(obj))}
    if not isinstance(name, str) or name not in specs:
        raise _unknown_key(type(obj), str(name), dotted, origin)
    f, tp = specs[name]
    where = _Where(origin=origin, key=dotted, meta=f.metadata, default=field_default(f))
    new = _set_in(tp, getattr(obj, name), tokens[1:], value, where)
    try:
        return dataclasses.replace(obj, **{name: new})
    except ValueError as err:
        raise UserError(f"{origin.label}: {key or 'top level'}: {err}") from None


def _set_in(tp: Any, current: Any, tokens: list[str | int], value: Any, where: _Where) -> Any:
    """`current` (of type `tp`) with the value at `tokens` below it replaced by `value`."""
    if not tokens:
        return _convert(tp, value, where)
    inner = _optional_arg(tp)
    if inner is not None:
        if current is None:
            raise UserError(f"{where.origin.label}: {where.key} is null: set it whole "
                            f"(e.g. -o {where.key}={{...}}) instead of one key below it")
        tp = inner
    token, origin = tokens[0], typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _set_in_dataclass(current, tokens, value, origin=where.origin, key=where.key)
    if origin is tuple and isinstance(token, int):
        if token >= len(current):
            raise UserError(f"{where.origin.label}: {where.key}[{token}]: index out of range "
                            f"({where.key} has {len(current)} items)")
        args = typing.get_args(tp)
        item_tp = args[0] if len(args) == 2 and args[1] is Ellipsis else args[token]
        items = list(current)
        items[token] = _set_in(item_tp, current[token], tokens[1:], value, where.at(f"{where.key}[{token}]"))
        return tuple(items)
    if origin is dict and isinstance(token, str):
        value_tp = typing.get_args(tp)[1]
        out = dict(current)
        out[token] = _set_in(value_tp, current.get(token), tokens[1:], value, where.at(f"{where.key}.{token}"))
        return out
    step = f"[{token}]" if isinstance(token, int) else f".{token}"
    raise UserError(f"{where.origin.label}: {where.key}{step}: {where.key} is {describe_type(tp)}, "
                    f"it has no {'items' if isinstance(token, int) else 'keys'} to set")


# ------------------------------------------------------------ plain views


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts (field order), tuples -> lists: what YAML/JSON can hold."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces: the same value always gives the same text (cache keys)."""
    return json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def to_yaml(obj: Any) -> str:
    """A config tree as YAML, every field stated (what MLflow gets as config.yaml)."""
    return yaml.safe_dump(to_plain(obj), sort_keys=False, default_flow_style=None)


def section_json(cfg: Any, name: str) -> str:
    """Canonical JSON of one top-level field of a config (a section, `seed`, ...): what cache keys hash."""
    return canonical_json(getattr(cfg, name))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"train.phases[0].lr_start": 0.005, ...}: one entry per scalar leaf (lists of scalars stay whole)."""
    plain = to_plain(obj)
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            if not value and key:
                out[key] = {}
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            out[key] = value

    walk(plain, prefix)
    return out
