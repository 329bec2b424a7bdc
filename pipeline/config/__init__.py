"""The root `Config`: name, seed and one section per module that owns it.

    cfg = load_config(Path("configs/default.yaml"), overrides=["train.phases[1].lr_start=0.001"])

Sections (docs/CONTRACTS.md): data, model, proposals, train, detect, tune,
evaluate, runtime. The loading and validation rules are generic and live in
ion/schema/; this module fixes the root type and the defaults.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ion.data.config import DataConfig
from ion.errors import UserError
from ion.modeling.config import ModelConfig
from ion.schema import Origin, apply_override, build, display_path, read_layered, section_json, to_yaml
from pipeline import PROJECT_ROOT
from pipeline.config.docs import config_reference as _reference_of
from proposals.config import ProposalsConfig
from stages.config import DetectConfig, EvaluateConfig, TuneConfig
from stages.contract import RuntimeConfig
from stages.train_config import TrainConfig

__all__ = ["AblationConfig", "CONFIGS_DIR", "Config", "DEFAULT_CONFIG", "PROJECT_ROOT", "config_path", "RuntimeConfig",
           "config_reference", "load_config", "section_json", "to_yaml"]

CONFIGS_DIR = PROJECT_ROOT / "configs"  # the configs package, in a checkout and when installed
DEFAULT_CONFIG = CONFIGS_DIR / "default.yaml"
# A source checkout has its pyproject.toml beside the packages; an installed package has not.
IS_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()


def config_path(text: str | Path) -> Path:
    """--config: a file path, or the name of a shipped config (`smoke`, `coco_ion`,
    `ablations/global`), looked up in the configs package when no such file exists."""
    path = Path(text)
    if path.exists():
        return path
    for candidate in (CONFIGS_DIR / f"{text}.yaml", CONFIGS_DIR / str(text)):
        if candidate.is_file():
            return candidate
    return path


def shipped_configs() -> list[str]:
    """Names of the shipped configs, as --config accepts them."""
    return sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml"))


def _path_base(folder: Path) -> Path:
    """What relative paths in a config file in `folder` are relative to: the
    file's folder; for a config shipped inside an installed package, the same
    place under the current directory, so its `../workdir` and `../data` mean
    ./workdir and ./data wherever the user runs it."""
    if IS_CHECKOUT:
        return folder
    try:
        inside = Path(folder).resolve().relative_to(CONFIGS_DIR.resolve())
    except ValueError:
        return folder
    return Path.cwd() / "configs" / inside


@dataclass(frozen=True)
class AblationConfig:
    """Which row of the paper's ablation tables a config reproduces (Sec. 5,
    Tables 4-10), for `python -m pipeline ablations`; read by no stage."""

    table: Optional[int] = field(default=None, metadata={
        "help": "the paper's table the config reproduces a row of (4 .. 10); null: no paper row", "min": 1})
    row: str = field(default="", metadata={"help": "the row, as the table labels it"})
    paper_map: Optional[float] = field(default=None, metadata={
        "help": "the paper's number for the row (VOC07 test mAP, %); null where the paper has none",
        "min": 0.0, "max": 100.0})

    def __post_init__(self) -> None:
        if self.table is None and self.paper_map is not None:
            raise ValueError("paper_map needs a table (the table the number comes from)")


@dataclass(frozen=True)
class Config:
    name: str = field(default="default", metadata={"help": "run name: the MLflow experiment runs are filed under"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice (data, sampling, init)", "min": 0})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets and splits"})
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "the ION detector"})
    proposals: ProposalsConfig = field(
        default_factory=ProposalsConfig, metadata={"help": "proposal sources and mixing"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training phases"})
    detect: DetectConfig = field(
        default_factory=DetectConfig, metadata={"help": "raw detections before NMS"})
    tune: TuneConfig = field(
        default_factory=TuneConfig, metadata={"help": "threshold search on minival"})
    evaluate: EvaluateConfig = field(
        default_factory=EvaluateConfig, metadata={"help": "COCO evaluation on the test split"})
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig,
        metadata={"help": "where and how to run; part of no cache key"})
    ablation: AblationConfig = field(
        default_factory=AblationConfig,
        metadata={"help": "the paper's table row this config reproduces (ablation configs); part of no "
                          "cache key"})

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name: must not be empty (it names the MLflow experiment)")


def load_config(path: Path, overrides: Sequence[str] = (), *, workdir: Path | None = None) -> Config:
    """Read, merge (`extends`), validate and override a config file.

    `workdir` (the --workdir flag) replaces `runtime.workdir`; the returned
    `runtime.workdir` is always absolute.
    """
    path = config_path(path)
    if not path.exists():
        raise UserError(f"{display_path(path)}: no such config file (give a path, or one of the shipped configs: "
                        f"{', '.join(shipped_configs())})")
    cfg = build(Config, read_layered(path, path_base=_path_base),
                origin=Origin(label=display_path(path), base_dir=_path_base(path.parent)))
    for text in overrides:
        cfg = apply_override(cfg, text)
    chosen = workdir if workdir is not None else cfg.runtime.workdir
    runtime = dataclasses.replace(cfg.runtime, workdir=os.path.abspath(os.path.expanduser(chosen)))
    return dataclasses.replace(cfg, runtime=runtime)


def config_reference() -> str:
    """The Markdown config reference of the root Config."""
    return _reference_of(Config)
