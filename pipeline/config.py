"""The root `Config`: name, seed and one section per module that owns it.

    cfg = load_config(Path("configs/default.yaml"), overrides=["train.phases[1].lr_start=0.001"])

Sections (docs/CONTRACTS.md): data, model, proposals, train, detect, tune,
evaluate, runtime. The loading and validation rules are generic and live in
pipeline/schema.py; this module fixes the root type and the defaults.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ion.config import ModelConfig
from ion.data.config import DataConfig
from pipeline.config_docs import config_reference as _reference_of
from pipeline.runtime import RuntimeConfig
from pipeline.schema import Origin, apply_override, build, display_path, read_layered, section_json, to_yaml
from proposals.config import ProposalsConfig
from stages.config import DetectConfig, EvaluateConfig, TrainConfig, TuneConfig

__all__ = ["Config", "DEFAULT_CONFIG", "PROJECT_ROOT", "RuntimeConfig", "config_reference", "load_config",
           "section_json", "to_yaml"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"


@dataclass(frozen=True)
class Config:
    name: str = field(default="default", metadata={"help": "run name: the MLflow experiment runs are filed under"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice (data, sampling, init)", "min": 0})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets and splits (ion/data/config.py)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the ION detector (ion/config.py)"})
    proposals: ProposalsConfig = field(
        default_factory=ProposalsConfig, metadata={"help": "proposal sources and mixing (proposals/config.py)"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training phases (stages/config.py)"})
    detect: DetectConfig = field(
        default_factory=DetectConfig, metadata={"help": "raw detections before NMS (stages/config.py)"})
    tune: TuneConfig = field(
        default_factory=TuneConfig, metadata={"help": "threshold search on minival (stages/config.py)"})
    evaluate: EvaluateConfig = field(
        default_factory=EvaluateConfig, metadata={"help": "COCO evaluation on the test split (stages/config.py)"})
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig,
        metadata={"help": "where and how to run; part of no cache key (pipeline/runtime.py)"})

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name: must not be empty (it names the MLflow experiment)")


def load_config(path: Path, overrides: Sequence[str] = (), *, workdir: Path | None = None) -> Config:
    """Read, merge (`extends`), validate and override a config file.

    `workdir` (the --workdir flag) replaces `runtime.workdir`; the returned
    `runtime.workdir` is always absolute.
    """
    path = Path(path)
    cfg = build(Config, read_layered(path), origin=Origin(label=display_path(path), base_dir=path.parent))
    for text in overrides:
        cfg = apply_override(cfg, text)
    chosen = workdir if workdir is not None else cfg.runtime.workdir
    runtime = dataclasses.replace(cfg.runtime, workdir=os.path.abspath(os.path.expanduser(chosen)))
    return dataclasses.replace(cfg, runtime=runtime)


def config_reference() -> str:
    """The Markdown config reference of the root Config."""
    return _reference_of(Config)
