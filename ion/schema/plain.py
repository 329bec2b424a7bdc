"""Config trees as plain data: dicts and lists, canonical JSON (what cache keys
hash), YAML (what MLflow gets), and flat dotted keys (what MLflow params are)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml


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
