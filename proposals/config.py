"""ProposalsConfig: the `proposals` section. Which proposal sources are computed
(the RPNs, MCG import, selective search), how they are mixed per split, and
which recall figures are reported.

Field conventions (docs/CONTRACTS.md): frozen dataclasses, every field has a
default and a one-line `help`; `min`/`max` are inclusive bounds checked by the
loader in pipeline/config/__init__.py; `__post_init__` raises ValueError for
cross-field rules.

The defaults are the embedded default (synthetic data, CPU, no MCG files):
selective search plays MCG's role in the mixes (`bottom_up`), because MCG boxes
exist only as precomputed files for COCO. The paper's COCO recipe
(Appendix item 2) sets `bottom_up: mcg` and `mcg.dir`.
"""
from dataclasses import dataclass, field
from typing import Literal, Optional

from proposals.rpn.config import RpnConfig

# The sources a mix may name. "bottom_up" is a role, not a source: it stands for
# whichever of mcg / selective_search `ProposalsConfig.bottom_up` picks, so one
# mix spec serves both COCO (MCG files) and datasets without MCG.
SOURCES = ("rpn1", "rpn2", "mcg", "selective_search")
BOTTOM_UP_ROLE = "bottom_up"


@dataclass(frozen=True)
class McgConfig:
    dir: Optional[str] = field(
        default=None,
        metadata={"help": "directory of per-image MCG .mat files (MCG-COCO-<split>-boxes); none: no MCG",
                  "path": True, "files": "mcg"})
    allow_missing: bool = field(
        default=False,
        metadata={"help": "images without a .mat file get no MCG boxes instead of stopping the run"})
    top_n: int = field(
        default=2000, metadata={"help": "MCG boxes kept per image, highest score first", "min": 1})
    min_size: float = field(
        default=2.0, metadata={"help": "boxes narrower or shorter than this (pixels) are dropped", "min": 0.0})


@dataclass(frozen=True)
class SelectiveSearchConfig:
    enabled: bool = field(
        default=True, metadata={"help": "compute selective search boxes (OpenCV ximgproc) for every split"})
    mode: Literal["fast", "quality", "single"] = field(
        default="fast",
        metadata={"help": "Uijlings et al.'s settings: fast (HSV+Lab, 3 k, 2 strategies), quality "
                          "(5 colour spaces, 5 k, 4 strategies), single (HSV, 1 k, 1 strategy)"})
    k: float = field(
        default=150.0,
        metadata={"help": "graph segmentation scale k of the first segmentation (OpenCV's base_k)",
                  "min": 1.0})
    k_step: float = field(
        default=150.0,
        metadata={"help": "k increment between segmentations in fast/quality mode (OpenCV's inc_k)",
                  "min": 1.0})
    sigma: float = field(
        default=0.8, metadata={"help": "Gaussian smoothing before graph segmentation", "min": 0.0})
    min_size: int = field(
        default=10,
        metadata={"help": "smallest initial segment (pixels); OpenCV's 100 merges 8-16 px objects "
                          "into the background (72% of them found on the synthetic data), 10 keeps them",
                  "min": 1})
    max_boxes: int = field(
        default=2000, metadata={"help": "boxes kept per image, best-ranked first", "min": 1})
    resize_max: Optional[int] = field(
        default=500,
        metadata={"help": "downscale images whose longer side exceeds this before segmenting, boxes "
                          "mapped back (cost grows faster than the pixel count); none: never",
                  "min": 16})


@dataclass(frozen=True)
class MixConfig:
    train: dict[str, int] = field(
        default_factory=lambda: {"rpn1": 1000, BOTTOM_UP_ROLE: 1000},
        metadata={"help": "training mix: source -> top-k boxes per image (Appendix item 2: "
                          "1000 RPN1 + 1000 MCG); bottom_up = the source named by proposals.bottom_up",
                  "min": 1})
    test: dict[str, int] = field(
        default_factory=lambda: {"rpn2": 1000, BOTTOM_UP_ROLE: 2000},
        metadata={"help": "minival/test mix: source -> top-k boxes per image (Appendix item 2: "
                          "1000 RPN2 + 2000 MCG)",
                  "min": 1})
    dedup_iou: float = field(
        default=1.0,
        metadata={"help": "a mixed box overlapping an earlier one with IoU above this is dropped; "
                          "1.0 drops exact duplicates only, keeping the paper's box counts",
                  "min": 0.5, "max": 1.0})

    def __post_init__(self) -> None:
        for which in ("train", "test"):
            spec = getattr(self, which)
            if not spec:
                raise ValueError(f"{which} is empty: name at least one source, e.g. {{rpn1: 1000}}")
            unknown = sorted(set(spec) - set(SOURCES) - {BOTTOM_UP_ROLE})
            if unknown:
                raise ValueError(f"{which}: unknown sources {unknown} "
                                 f"(use {', '.join(SOURCES + (BOTTOM_UP_ROLE,))})")


@dataclass(frozen=True)
class RecallConfig:
    counts: tuple[int, ...] = field(
        default=(100, 300, 1000, 2000),
        metadata={"help": "numbers of proposals (first N in store order) at which recall is reported",
                  "min": 1})

    def __post_init__(self) -> None:
        if not self.counts or list(self.counts) != sorted(set(self.counts)):
            raise ValueError(f"counts {list(self.counts)} must be non-empty, increasing, without repeats")


@dataclass(frozen=True)
class ProposalsConfig:
    rpn: RpnConfig = field(
        default_factory=RpnConfig, metadata={"help": "the 22-anchor RPN (RPN1 / RPN2, Appendix item 2)"})
    bottom_up: Literal["mcg", "selective_search"] = field(
        default="selective_search",
        metadata={"help": "bottom-up source in MCG's role in the mixes; the embedded default has no MCG "
                          "files and uses selective search"})
    mcg: McgConfig = field(default_factory=McgConfig, metadata={"help": "MCG import"})
    selective_search: SelectiveSearchConfig = field(
        default_factory=SelectiveSearchConfig, metadata={"help": "selective search (OpenCV ximgproc)"})
    mix: MixConfig = field(default_factory=MixConfig, metadata={"help": "mixed proposal sets per split"})
    recall: RecallConfig = field(default_factory=RecallConfig, metadata={"help": "recall report"})

    def __post_init__(self) -> None:
        named = set(self.mix.train) | set(self.mix.test)
        uses_mcg = "mcg" in named or (BOTTOM_UP_ROLE in named and self.bottom_up == "mcg")
        if uses_mcg and self.mcg.dir is None:
            raise ValueError("the mixes use MCG boxes but mcg.dir is not set: set mcg.dir to the directory "
                             "of MCG .mat files, or set bottom_up: selective_search")
        uses_ss = "selective_search" in named or (
            BOTTOM_UP_ROLE in named and self.bottom_up == "selective_search")
        if uses_ss and not self.selective_search.enabled:
            raise ValueError("the mixes use selective search boxes but selective_search.enabled is false: "
                             "enable it or set bottom_up: mcg")

    def resolve_mix(self, which: Literal["train", "test"]) -> dict[str, int]:
        """The mix for `which` with the bottom_up role replaced by its source:
        {"rpn1": 1000, "bottom_up": 1000} -> {"rpn1": 1000, "selective_search": 1000}.
        A source named twice (directly and through the role) keeps the larger k."""
        resolved: dict[str, int] = {}
        for source, k in getattr(self.mix, which).items():
            name = self.bottom_up if source == BOTTOM_UP_ROLE else source
            resolved[name] = max(k, resolved.get(name, 0))
        return resolved

    def bottom_up_sources(self) -> tuple[str, ...]:
        """The bottom-up sources to compute: MCG when a directory is given,
        selective search when enabled (both may be, to compare their recall)."""
        sources = []
        if self.mcg.dir is not None:
            sources.append("mcg")
        if self.selective_search.enabled:
            sources.append("selective_search")
        return tuple(sources)
