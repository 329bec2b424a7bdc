"""COCO category ids <-> contiguous model labels: the one place they are mapped.

COCO's category ids have gaps (1..90 for 80 classes); the model wants labels
1..K with 0 = background. Everything outside the model keeps COCO's ids
(docs/CONTRACTS.md, Conventions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BACKGROUND_LABEL = 0
# Extra top-level key of a COCO json (pycocotools ignores it): the categories that only
# global context tells apart (ion/data/synthetic.py); evaluation reports their AP apart.
CONTEXT_IDS_KEY = "ion_context_category_ids"


@dataclass(frozen=True)
class CategoryMap:
    """The categories of a data set, ordered by COCO id; label = 1 + position.

    Built from a COCO `categories` list: `CategoryMap.from_coco(coco["categories"])`.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    _label_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.names), "one name per category id"
        assert list(self.ids) == sorted(set(self.ids)), "category ids must be unique and sorted"
        object.__setattr__(self, "_label_of", {cat_id: i + 1 for i, cat_id in enumerate(self.ids)})

    @classmethod
    def from_coco(cls, categories: list[dict]) -> CategoryMap:
        """From COCO's `[{"id": 1, "name": "person", ...}, ...]` (any order)."""
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(ids=tuple(int(c["id"]) for c in ordered), names=tuple(str(c["name"]) for c in ordered))

    @property
    def num_classes(self) -> int:
        """K: the number of object classes, background not counted."""
        return len(self.ids)

    def label(self, category_id: int) -> int:
        """COCO category id -> label in 1..K."""
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not one of {list(self.ids)}") from None

    def labels(self, category_ids: np.ndarray) -> np.ndarray:
        """int64 (G,) COCO ids -> int64 (G,) labels in 1..K."""
        return np.array([self.label(c) for c in np.asarray(category_ids).tolist()], dtype=np.int64)

    def category_id(self, label: int) -> int:
        """Label in 1..K -> COCO category id."""
        if not 1 <= int(label) <= self.num_classes:
            raise KeyError(f"label {label} is outside 1..{self.num_classes} (0 is background)")
        return self.ids[int(label) - 1]

    def category_ids(self, labels: np.ndarray) -> np.ndarray:
        """int64 (N,) labels in 1..K -> int64 (N,) COCO ids."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 1 or labels.max() > self.num_classes):
            raise KeyError(f"labels must lie in 1..{self.num_classes} (0 is background), got {labels.tolist()}")
        return np.asarray(self.ids, dtype=np.int64)[labels - 1] if labels.size else labels.copy()

    def name(self, category_id: int) -> str:
        """COCO category id -> its name."""
        return self.names[self.label(category_id) - 1]
