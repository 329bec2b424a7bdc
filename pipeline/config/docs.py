"""The config reference, generated from the dataclass fields (help, type, default, bounds).

`python -m pipeline config-docs` prints it; README.md links to it. One Markdown
table per top-level section; nested dataclasses become dotted keys and lists of
dataclasses `key[].field` rows. Every section names its dataclass and the file
that defines it (read from the class, so it cannot point at a re-export).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from ion.schema import bounds_text, describe_type, field_default, fields_of, to_plain
from pipeline import PROJECT_ROOT


def _help(cls: type, f: dataclasses.Field) -> str:
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"config field {cls.__name__}.{f.name} has no metadata['help'] (every field needs one)")
    return " ".join(str(text).split())


def defined_in(cls: type) -> str:
    """The file that defines `cls`, relative to the project root (ion/data/config.py)."""
    return Path(sys.modules[cls.__module__].__file__).resolve().relative_to(PROJECT_ROOT).as_posix()


def _home(cls: type) -> str:
    return f"`{cls.__name__}`, {defined_in(cls)}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _element_dataclass(tp: Any) -> type | None:
    """D for tuple[D, ...] where D is a dataclass, else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _rows(cls: type, prefix: str) -> list[str]:
    rows = []
    for f, tp in fields_of(cls):
        key = f"{prefix}{f.name}"
        default = field_default(f)
        if dataclasses.is_dataclass(tp):
            rows.append(f"| `{key}` | section | | | {_cell(_help(cls, f))} ({_home(tp)}) |")
            rows.extend(_rows(tp, f"{key}."))
            continue
        element = _element_dataclass(tp)
        if element is not None:
            rows.append(f"| `{key}` | list of `{key}[]` | {len(default)} items | | "
                        f"{_cell(_help(cls, f))} ({_home(element)}) |")
            rows.extend(_rows(element, f"{key}[]."))
            continue
        extra = " (relative to the config file)" if f.metadata.get("path") else ""
        rows.append(f"| `{key}` | {_cell(describe_type(tp))} | `{_cell(json.dumps(to_plain(default)))}` "
                    f"| {bounds_text(f.metadata)} | {_cell(_help(cls, f))}{extra} |")
    return rows


_HEADER = ["| key | type | default | bounds | help |", "|---|---|---|---|---|"]


def config_reference(root: type) -> str:
    """Markdown: a table of the top-level scalar keys, then one table per section of `root`."""
    scalars = [(f, tp) for f, tp in fields_of(root) if not dataclasses.is_dataclass(tp)]
    sections = [(f, tp) for f, tp in fields_of(root) if dataclasses.is_dataclass(tp)]
    lines = ["# Config reference", "",
             "Generated from the config dataclasses (`python -m pipeline config-docs`). A YAML file "
             "states only what differs from these defaults; `extends: other.yaml` starts from another "
             "file; `-o section.key=value` overrides one value on the command line.", ""]
    if scalars:
        lines += ["## top level", "", *_HEADER]
        for f, tp in scalars:
            lines.append(f"| `{f.name}` | {_cell(describe_type(tp))} | `{json.dumps(to_plain(field_default(f)))}` "
                         f"| {bounds_text(f.metadata)} | {_cell(_help(root, f))} |")
        lines.append("")
    for f, tp in sections:
        lines += [f"## {f.name}", "", f"{_help(root, f)}. Defined by {_home(tp)}.", "", *_HEADER,
                  *_rows(tp, ""), ""]
    return "\n".join(lines)
