"""`-o key=value` overrides: parsed, applied to a built config tree and validated
like a value from a file."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from ion.errors import UserError
from ion.schema.decode import (
    Origin,
    _convert,
    _optional_arg,
    _unknown_key,
    _Where,
    describe_type,
    field_default,
    fields_of,
)
from ion.schema.files import parse_yaml

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*$")
_KEY_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


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
