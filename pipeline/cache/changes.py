"""Why a stage is stale: the difference between the material of its most recent
output's key (recorded in that output's manifest) and the current one.

    describe_changes(old_manifest, new_material)
    -> ["config tune.trials", "module ion/evaluation/metrics.py", "upstream detect"]
"""
from __future__ import annotations

import json
from typing import Any

from ion.schema import flatten

_SHOWN = 6  # entries per kind before "... and N more"


def _config_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Dotted config keys whose value differs (`tune.trials`, `seed`)."""
    changed = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        before, after = (json.loads(x) if x is not None else None for x in (old.get(name), new.get(name)))
        if not isinstance(before, dict) or not isinstance(after, dict):
            changed.append(name)
            continue
        flat_before, flat_after = flatten(before, name), flatten(after, name)
        changed.extend(k for k in sorted(set(flat_before) | set(flat_after))
                       if flat_before.get(k, object()) != flat_after.get(k, object()))
    return changed


def _dict_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _shorten(kind: str, names: list[str]) -> list[str]:
    shown = [f"{kind} {n}" for n in names[:_SHOWN]]
    if len(names) > _SHOWN:
        shown.append(f"... and {len(names) - _SHOWN} more {kind}s")
    return shown


def describe_changes(old_manifest: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between the key material recorded in `old_manifest` and `new` (module docstring)."""
    if old_manifest is None:
        return []
    old = old_manifest.get("material")
    if not old:
        return ["the older output records no key material (written by an older version of the pipeline)"]
    reasons = []
    if old.get("version") != new["version"]:
        reasons.append(f"VERSION {old.get('version')} -> {new['version']}")
    reasons += _shorten("config", _config_changes(old.get("reads", {}), new["reads"]))
    old_inputs = {k: v.get("fingerprint") for k, v in old.get("inputs", {}).items()}
    new_inputs = {k: v["fingerprint"] for k, v in new["inputs"].items()}
    reasons += [f"file {new['inputs'].get(k, old.get('inputs', {}).get(k, {})).get('path', '?')} ({k})"
                for k in _dict_changes(old_inputs, new_inputs)]
    reasons += _shorten("module", _dict_changes(old.get("code", {}).get("modules", {}), new["code"]["modules"]))
    reasons += [f"upstream {name}" for name in _dict_changes(old.get("upstream", {}), new["upstream"])]
    return reasons
