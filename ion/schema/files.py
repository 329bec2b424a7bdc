"""Config YAML files: strict parsing (a key stated twice is an error) and
`extends:` layering, each value remembering the file that stated it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import yaml

from ion.errors import UserError
from ion.schema.decode import Origin, _show, _Stated, display_path

EXTENDS_KEY = "extends"


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
