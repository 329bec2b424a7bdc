"""Why a stage is stale: the difference between the material of its most recent
output's key (recorded in that output's manifest) and the current one.

    describe_changes(old_manifest, new_material)
    -> ["config tune.trials", "module ion/evaluation/metrics.py", "upstream detect"]
"""
from __future__ import annotations

import json
from typing import Any

from ion.schema import flatten
from pipeline.cache.input_state import InputState

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


def _input_changes(old: dict[str, Any], new: dict[str, Any], state: InputState | None) -> list[str]:
    """Input fields whose content differs; for a folder whose two listings `state` remembers, the
    very files added, removed or changed (`file .../train2014/x.jpg (data.coco.train_images)`)."""
    reasons = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, {}).get("fingerprint"), new.get(key, {}).get("fingerprint")
        if before == after:
            continue
        path = new.get(key, old.get(key, {})).get("path", "?")
        listings = [state.listing(f) if state is not None and f else None for f in (before, after)]
        if None in listings:
            reasons.append(f"file {path} ({key})")
            continue
        names = _dict_changes(*listings)
        reasons += [f"file {path.rstrip('/')}/{name} ({key})" for name in names[:_SHOWN]]
        if len(names) > _SHOWN:
            reasons.append(f"... and {len(names) - _SHOWN} more files of {path} ({key})")
    return reasons


def describe_changes(old_manifest: dict[str, Any] | None, new: dict[str, Any],
                     state: InputState | None = None) -> list[str]:
    """What differs between the key material recorded in `old_manifest` and `new` (module docstring).
    `state`: the workdir's input state, to name the files that changed inside an input folder."""
    if old_manifest is None:
        return []
    old = old_manifest.get("material")
    if not old:
        return ["the older output records no key material (written by an older version of the pipeline)"]
    reasons = []
    if old.get("version") != new["version"]:
        reasons.append(f"VERSION {old.get('version')} -> {new['version']}")
    reasons += _shorten("config", _config_changes(old.get("reads", {}), new["reads"]))
    reasons += _input_changes(old.get("inputs", {}), new["inputs"], state)
    reasons += _shorten("module", _dict_changes(old.get("code", {}).get("modules", {}), new["code"]["modules"]))
    reasons += [f"upstream {name}" for name in _dict_changes(old.get("upstream", {}), new["upstream"])]
    return reasons
