"""`python -m pipeline status`: each stage's key and whether its output is cached, missing or stale.

- cached:  an output exists under the current key;
- stale:   none under the current key, but one under another key (the config
           or an upstream output changed since it was produced);
- missing: no output of this stage at all.

For a stale stage, `status` names what changed since its most recent output
(pipeline/cache/changes.py): config keys, input files, source modules, upstream outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.cache.changes import describe_changes
from pipeline.cache.store import ArtifactStore
from pipeline.graph import SHORT_KEY, Stage, cache_materials, input_state

CACHED, STALE, MISSING, MODIFIED = "cached", "stale", "missing", "modified"


@dataclass(frozen=True)
class StageStatus:
    name: str
    key: str
    state: str
    run_id: str | None  # the MLflow run that produced the cached output
    other_keys: list[str]  # keys of outputs for other configs
    changed_files: list[str]  # with verify: files whose checksum differs from the manifest
    reasons: list[str] = ()  # stale: what changed since the most recent output (pipeline/cache/changes.py)


def stage_statuses(stages: Sequence[Stage], cfg: Any, store: ArtifactStore, *,
                   verify: bool = False) -> list[StageStatus]:
    """The state of every stage for `cfg`; `verify` also re-checksums cached outputs."""
    materials = cache_materials(stages, cfg)
    inputs = input_state(cfg)  # the folder listings behind the input fingerprints, to name changed files
    statuses = []
    for stage in stages:
        key, material = materials[stage.name]
        manifest = store.manifest(stage.name, key)
        others = store.other_keys(stage.name, key)
        changed: list[str] = []
        reasons: list[str] = []
        if manifest is not None:
            changed = store.verify(stage.name, key) if verify else []
            state = MODIFIED if changed else CACHED
        else:
            state = STALE if others else MISSING
            if others:
                reasons = describe_changes(store.latest_other(stage.name, key), material, inputs)
        statuses.append(StageStatus(name=stage.name, key=key, state=state,
                                    run_id=manifest.get("mlflow_run_id") if manifest else None,
                                    other_keys=others, changed_files=changed, reasons=list(reasons)))
    return statuses


def format_status(statuses: Sequence[StageStatus], store: ArtifactStore) -> str:
    lines = [f"workdir: {store.workdir}", "",
             f"{'stage':<10} {'key':<{SHORT_KEY}}  {'state':<8}  mlflow run", "-" * 60]
    for s in statuses:
        note = ""
        if s.state == STALE:
            note = f"  (changed: {'; '.join(s.reasons)})" if s.reasons else (
                f"  (an older output: {', '.join(k[:SHORT_KEY] for k in s.other_keys)})")
        elif s.state == MODIFIED:
            note = f"  (changed since written: {', '.join(s.changed_files[:3])}; rerun with --force)"
        lines.append(f"{s.name:<10} {s.key[:SHORT_KEY]:<{SHORT_KEY}}  {s.state:<8}  {s.run_id or '-'}{note}")
    if not statuses:
        lines.append("(no stages registered)")
    return "\n".join(lines)
