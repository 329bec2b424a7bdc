"""Does the context reach the crates? A linear probe on a trained detector's maps.

    .venv/bin/python -m bench.context_probe --data <workdir>/artifacts/data/<key> \
        --train <workdir>/artifacts/train/<key> [--images 300] [--init]

The synthetic context classes (crate_day / crate_dusk / crate_night) look
alike; only the sky far above tells them apart. For every crate of the first
`--images` training images this reads three feature vectors at the crate's
centre: conv5 (receptive field 78 px: cannot see the sky), the context
module's top map, and the fused skip-pooling map (what the ROI head pools;
model.fuse only), each L2-normalised per location. A logistic regression per
map is fitted on 70% of the crates and scored on the other 30%: held-out
accuracy near 1.0 says the map carries the scene type, 0.33 says it does not.
`--init` probes the same architecture at its initial weights (seed 0) for
comparison. Printed side by side; a measurement, not a test.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ion.data.split import DetectionSplit
from ion.data.synthetic import CONTEXT_CATEGORY_IDS
from ion.data.transforms import prepare
from ion.modeling.build import build_detector
from stages.train import load_trained_detector

HELD_OUT = 0.3
L2_PENALTY = 1e-3


def crate_features(model, cfg, split: DetectionSplit, images: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{map name: Tensor[N, C]} at the N crates' centres, and their scene index Tensor[N] (0..2)."""
    scene_of = {cat: i for i, cat in enumerate(CONTEXT_CATEGORY_IDS)}
    feats: dict[str, list[torch.Tensor]] = {"conv5": [], "context": [], "fused": []}
    labels: list[int] = []
    with torch.no_grad():
        for record in split.images[:images]:
            p = prepare(record.load(), record.boxes, min_size=cfg.input.min_size, max_size=cfg.input.max_size,
                        mean=tuple(cfg.input.pixel_mean), std=tuple(cfg.input.pixel_std), flip=False)
            backbone = model.backbone(p.image)
            computed = model.maps_from_backbone(backbone)  # one backbone and context pass for all three
            maps = {"conv5": (backbone["conv5"][0], 16)}  # (C5, h, w), stride 16
            if computed.context:
                maps["context"] = (computed.context[-1][0], 16)
            if model.skip_pool.fuse:
                maps["fused"] = (computed.pooled[0][0], min(model.skip_pool.strides))
            for box, category in zip(p.boxes.numpy(), record.category_ids):
                if category not in scene_of:
                    continue
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                for name, (fmap, stride) in maps.items():
                    i = min(int(cy // stride), fmap.shape[1] - 1)
                    j = min(int(cx // stride), fmap.shape[2] - 1)
                    feats[name].append(F.normalize(fmap[:, i, j], dim=0))
                labels.append(scene_of[category])
    return {k: torch.stack(v) for k, v in feats.items() if v}, torch.tensor(labels)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS) on standardised x."""
    n = len(y)
    train = torch.from_numpy(np.random.default_rng(0).permutation(n) >= int(n * HELD_OUT))
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[train] @ w + b, y[train]) + L2_PENALTY * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[~train] @ w + b).argmax(1) == y[~train]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a data stage output (synthetic)")
    parser.add_argument("--train", type=Path, required=True, help="a train stage output")
    parser.add_argument("--images", type=int, default=300, help="training images to collect crates from")
    parser.add_argument("--init", action="store_true", help="also probe the initial weights (seed 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained, cfg = load_trained_detector(args.train, device=torch.device("cpu"))
    split = DetectionSplit.load(args.data, "train")
    models = {"trained": trained}
    if args.init:
        torch.manual_seed(0)
        models["init"] = build_detector(cfg, num_classes=trained.num_classes).eval()
    print(f"held-out accuracy of a linear probe for the scene type at the crates (chance 0.33; "
          f"{int(HELD_OUT * 100)}% of the crates held out)")
    for name, model in models.items():
        feats, labels = crate_features(model, cfg, split, args.images)
        scores = ", ".join(f"{m} {probe_accuracy(x, labels):.2f}" for m, x in feats.items())
        print(f"{name:8s} ({len(labels)} crates): {scores}")


if __name__ == "__main__":
    main()
