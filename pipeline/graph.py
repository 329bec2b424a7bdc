"""The stage graph: the registered stages in pipeline order, selection, cache keys.

The one place that lists the stages. A stage is a module stages/<name>.py with
NAME, VERSION, READS, UPSTREAM and run (docs/CONTRACTS.md, "Stage API"); only
modules that exist are registered, so the graph grows as stages are written.

A stage's key covers everything its output depends on: its name and VERSION,
the canonical JSON of the config fields it READS, the fingerprint of the
project source it runs (pipeline/cache/fingerprint.py), the fingerprints of the
external files those fields name, and its upstream keys. The material behind
a key is kept in the output's manifest, so `status` can say what changed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

from ion.errors import UserError
from pipeline.cache.fingerprint import code_fingerprint, code_modules, input_fingerprints, section_json_without_paths
from pipeline.cache.input_state import InputState

# The data flow: every stage consumes only stages listed before it.
STAGE_NAMES = ("data", "proposals", "train", "detect", "tune", "evaluate")
NOT_IN_KEYS = ("runtime",)  # where and how a stage runs never changes what it produces
SHORT_KEY = 12  # characters of a key shown in tables


@dataclass(frozen=True)
class Stage:
    """One stage module, checked: what it reads, what it consumes, how to run it."""

    name: str
    version: str
    reads: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[..., Any]
    module: str = ""  # the stage module's import name: whose source its key fingerprints

    @classmethod
    def from_module(cls, module: ModuleType | Any) -> "Stage":
        """Check a stage module's attributes (a bad one is a bug, not a user error)."""
        label = getattr(module, "__name__", repr(module))
        missing = [a for a in ("NAME", "VERSION", "READS", "UPSTREAM", "run") if not hasattr(module, a)]
        if missing:
            raise TypeError(f"stage module {label} lacks {', '.join(missing)} (see docs/CONTRACTS.md, Stage API)")
        stage = cls(name=module.NAME, version=module.VERSION, reads=tuple(module.READS),
                    upstream=tuple(module.UPSTREAM), run=module.run, module=getattr(module, "__name__", ""))
        if not isinstance(stage.version, str) or not stage.version:
            raise TypeError(f"stage module {label}: VERSION must be a non-empty string")
        if not callable(stage.run):
            raise TypeError(f"stage module {label}: run must be callable")
        bad_reads = [r for r in stage.reads if r in NOT_IN_KEYS]
        if bad_reads:
            raise TypeError(f"stage module {label}: READS may not name {bad_reads} (not part of any cache key)")
        return stage


def registered_names() -> tuple[str, ...]:
    """The stages implemented so far, in pipeline order: each name whose stages/<name>.py exists.

    Found without importing the modules (they import torch), so a bad --stages fails fast.
    """
    return tuple(name for name in STAGE_NAMES if importlib.util.find_spec(f"stages.{name}") is not None)


def registered_stages() -> tuple[Stage, ...]:
    """The registered stage modules, imported and checked."""
    return build_graph([importlib.import_module(f"stages.{name}") for name in registered_names()])


def build_graph(modules: Sequence[ModuleType | Any]) -> tuple[Stage, ...]:
    """Stages from modules given in pipeline order; each upstream must come earlier."""
    stages: list[Stage] = []
    for module in modules:
        stage = Stage.from_module(module)
        known = {s.name for s in stages}
        if stage.name in known:
            raise TypeError(f"stage {stage.name!r} registered twice")
        later = [u for u in stage.upstream if u not in known]
        if later:
            raise TypeError(f"stage {stage.name!r} consumes {later}, which are not registered before it")
        stages.append(stage)
    return tuple(stages)


def select_names(names: Sequence[str], spec: str) -> tuple[str, ...]:
    """`all` or a comma list (`detect,tune`) -> the named stages, in the order of `names`."""
    known = ", ".join(names) if names else "(none registered)"
    if spec.strip() == "all":
        return tuple(names)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    if not wanted:
        raise UserError(f"--stages {spec!r}: name at least one stage, or all (known stages: {known})")
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise UserError(f"--stages {spec}: unknown stage {', '.join(repr(u) for u in unknown)} "
                        f"(known stages: {known}; or all)")
    return tuple(n for n in names if n in wanted)


def select_stages(stages: Sequence[Stage], spec: str) -> tuple[Stage, ...]:
    """`all` or a comma list -> the named stages in pipeline order."""
    chosen = select_names([s.name for s in stages], spec)
    return tuple(s for s in stages if s.name in chosen)


def key_material(stage: Stage, cfg: Any, upstream_keys: dict[str, str],
                 state: InputState | None = None) -> dict[str, Any]:
    """What a stage's key is made of, in full (the manifest keeps it): the READS fields' canonical
    JSON (input paths masked: their content counts, pipeline/cache/fingerprint.py), the upstream keys, the
    code fingerprint with each module's sha256, the input files'. `state`: remembered input hashes."""
    for name in stage.reads:
        if not hasattr(cfg, name):
            raise TypeError(f"stage {stage.name!r} READS {name!r}, which is not a config field")
    modules = code_modules(stage.module) if stage.module else {}
    return {
        "stage": stage.name,
        "version": stage.version,
        "reads": {name: section_json_without_paths(cfg, name) for name in stage.reads},
        "upstream": {name: upstream_keys[name] for name in stage.upstream},
        "code": {"fingerprint": code_fingerprint(modules), "modules": modules},
        "inputs": input_fingerprints(cfg, stage.reads, state),
    }


def key_of(material: dict[str, Any]) -> str:
    """sha256 of the material, with the code and input files by their fingerprints."""
    hashed = {**material, "code": material["code"]["fingerprint"],
              "inputs": {k: v["fingerprint"] for k, v in material["inputs"].items()}}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode("utf-8")).hexdigest()


def stage_key(stage: Stage, cfg: Any, upstream_keys: dict[str, str]) -> str:
    """The stage's cache key (module docstring)."""
    return key_of(key_material(stage, cfg, upstream_keys))


def input_state(cfg: Any) -> InputState:
    """The input-hash state of the config's workdir (memory only for a config without one)."""
    workdir = getattr(getattr(cfg, "runtime", None), "workdir", None)
    return InputState.open(workdir)


def cache_materials(stages: Sequence[Stage], cfg: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """(key, material) of every stage, in pipeline order (a key covers its upstream keys)."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    state = input_state(cfg)
    try:
        for stage in stages:
            material = key_material(stage, cfg, {name: key for name, (key, _) in found.items()}, state)
            found[stage.name] = (key_of(material), material)
    finally:
        state.close()
    return found


def cache_keys(stages: Sequence[Stage], cfg: Any) -> dict[str, str]:
    """The key of every stage, in pipeline order (a key covers its upstream keys)."""
    return {name: key for name, (key, _) in cache_materials(stages, cfg).items()}
