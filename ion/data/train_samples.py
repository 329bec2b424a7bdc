"""Training samples: one image of the train split with its proposals, ready for
IONDetector's train-mode forward (ion/modeling/detector.py).

    samples = TrainingSamples(records=split.images, categories=split.categories,
                              proposal_sets=[store_phase0, store_phase1], min_size=600, max_size=1000,
                              pixel_mean=..., pixel_std=..., flip=True, with_masks=False)
    sample = samples(index, phase_index, rng)      # the ion.train_loop get_sample callback

The image is resized (shorter side min_size, longer side at most max_size,
Sec. 4.1), flipped left-right when `flip` and the image's own Generator say so
(half the time; that Generator is seeded from the data position, so a resumed
run and any number of workers flip the same images), and normalised.
Proposals and ground truth are scaled (and mirrored) with it; category ids
become labels 1..K through the CategoryMap; crowd boxes stay, flagged, for the
ROI sampler to ignore; instance masks only when the segmentation loss needs them.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from ion.data.categories import CategoryMap
from ion.data.split import ImageRecord, instance_masks
from ion.data.transforms import prepare
from ion.engine.loop import TrainSample


class ProposalSource(Protocol):
    """What a proposal set offers (proposals/store.py ProposalStore has it)."""

    def get(self, image_id: int) -> tuple[np.ndarray, np.ndarray]: ...


def training_sample(record: ImageRecord, proposals: np.ndarray, *, categories: CategoryMap, min_size: int,
                    max_size: int, pixel_mean: Sequence[float], pixel_std: Sequence[float], flip: bool,
                    with_masks: bool) -> TrainSample:
    """One image as the model trains on it.

    proposals: float32 (P, 4) xyxy in original-image coordinates.
    Returns image Tensor[1, 3, H', W'], proposals Tensor[P, 4] and targets
    {"boxes": Tensor[G, 4], "labels": int64 Tensor[G] in 1..K, "iscrowd": bool
    Tensor[G], "masks": bool Tensor[G, H', W'] (with_masks)}, boxes in the
    resized (and flipped) image.
    """
    image = record.load()
    num_proposals = len(proposals)
    boxes = np.concatenate([np.asarray(proposals, dtype=np.float32).reshape(-1, 4), record.boxes], axis=0)
    masks = instance_masks(record) if with_masks else None
    prepared = prepare(image, boxes, min_size=min_size, max_size=max_size, mean=tuple(pixel_mean),
                       std=tuple(pixel_std), flip=flip, masks=masks)
    targets = {
        "boxes": prepared.boxes[num_proposals:],  # (G, 4)
        "labels": torch.from_numpy(categories.labels(record.category_ids)),
        "iscrowd": torch.from_numpy(record.iscrowd.astype(bool)),
    }
    if with_masks:
        targets["masks"] = torch.from_numpy(prepared.masks)
    return TrainSample(image=prepared.image, proposals=prepared.boxes[:num_proposals], targets=targets)


class TrainingSamples:
    """get_sample for ion.train_loop: (image index, phase index, Generator) -> TrainSample.

    records: the train split's images (the index is a position in this list);
    proposal_sets: one proposal source per phase (phase i trains on proposal_sets[i]).
    """

    def __init__(self, *, records: Sequence[ImageRecord], categories: CategoryMap,
                 proposal_sets: Sequence[ProposalSource], min_size: int, max_size: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], flip: bool, with_masks: bool) -> None:
        self.records = list(records)
        self.categories = categories
        self.proposal_sets = list(proposal_sets)
        self.settings = dict(min_size=min_size, max_size=max_size, pixel_mean=tuple(pixel_mean),
                             pixel_std=tuple(pixel_std), with_masks=with_masks)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.records)

    def __call__(self, index: int, phase_index: int, rng: np.random.Generator) -> TrainSample:
        record = self.records[index]
        proposals, _ = self.proposal_sets[phase_index].get(record.image_id)
        flip = bool(rng.random() < 0.5) and self.flip  # drawn either way: one Generator use per image
        return training_sample(record, proposals, categories=self.categories, flip=flip, **self.settings)
