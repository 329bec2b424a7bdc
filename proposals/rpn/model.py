"""The RPN network (Appendix item 2): the heads, the two-head network on one
VGG16 backbone, its factory, its input images and anchors, and its weights file.

Boxes are float32 xyxy in continuous pixel coordinates.
"""
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ion.atomic import atomic_path
from ion.errors import UserError
from ion.modeling.backbone import VGG16Backbone, load_vgg16_imagenet, scaled_channels
from proposals.anchors import anchor_shapes, grid_anchors
from proposals.rpn.config import RpnConfig

Variant = Literal["rpn1", "rpn2"]
VARIANTS: tuple[Variant, ...] = ("rpn1", "rpn2")

# Faster R-CNN's RPN regresses deltas without target normalisation.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# torchvision's VGG16 ImageNet weights expect RGB in [0, 1] normalised thus.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The config fields trained weights are tied to (parameter shapes, and the
# anchors the deltas are relative to): a checkpoint loads only when these match.
ARCHITECTURE_FIELDS = ("anchor_base_size", "anchor_ratios", "anchor_scales", "anchor_scale",
                       "head_conv3_channels", "head_conv5_channels", "head_width", "backbone_width",
                       "batchnorm")


class RPNHead(nn.Module):
    """3x3 and 5x5 convolutions in parallel, concatenated, ReLU, then per-anchor
    objectness logits and box deltas (Appendix item 2).

    forward(x Tensor[N, C, H, W]) -> (objectness Tensor[N, A, H, W],
                                      deltas Tensor[N, 4 * A, H, W])
    """

    def __init__(self, *, in_channels: int, conv3_channels: int, conv5_channels: int, num_anchors: int):
        super().__init__()
        self.conv3 = nn.Conv2d(in_channels, conv3_channels, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(in_channels, conv5_channels, kernel_size=5, padding=2)
        hidden = conv3_channels + conv5_channels
        self.objectness = nn.Conv2d(hidden, num_anchors, kernel_size=1)
        self.deltas = nn.Conv2d(hidden, 4 * num_anchors, kernel_size=1)
        # Faster R-CNN initialises the RPN layers from N(0, 0.01), zero bias.
        for conv in (self.conv3, self.conv5, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(torch.cat([self.conv3(x), self.conv5(x)], dim=1))  # (N, C3 + C5, H, W)
        return self.objectness(h), self.deltas(h)


class L2NormScale(nn.Module):
    """L2 normalisation across channels at each location, then a learnable
    per-channel scale (Sec. 3.1's scale layer). Tensor[N, C, H, W] -> same."""

    def __init__(self, *, channels: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=1) * self.scale.view(1, -1, 1, 1)


class RegionProposalNetwork(nn.Module):
    """A VGG16 backbone with the RPN1 head (on conv5_3) and the RPN2 head (on
    L2-normalised, scaled conv4_3 + conv5_3).

    forward(images Tensor[N, 3, H, W]) -> {variant: (objectness Tensor[N, A, H5, W5],
                                                     deltas Tensor[N, 4A, H5, W5])}
    `anchors` Tensor[A, 4] centred at 0, placed on conv5's grid of stride `stride`.
    """

    def __init__(self, *, backbone: VGG16Backbone, anchors: Tensor, conv3_channels: int,
                 conv5_channels: int, l2_scale: float):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("anchors", anchors.clone(), persistent=False)
        self.stride = backbone.strides["conv5"]
        c4, c5 = backbone.channels["conv4"], backbone.channels["conv5"]
        self.norm4 = L2NormScale(channels=c4, init=l2_scale)
        self.norm5 = L2NormScale(channels=c5, init=l2_scale)
        A = anchors.shape[0]
        self.heads = nn.ModuleDict({
            "rpn1": RPNHead(in_channels=c5, conv3_channels=conv3_channels,
                            conv5_channels=conv5_channels, num_anchors=A),
            "rpn2": RPNHead(in_channels=c4 + c5, conv3_channels=conv3_channels,
                            conv5_channels=conv5_channels, num_anchors=A),
        })

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    def head_inputs(self, feats: dict[str, Tensor]) -> dict[Variant, Tensor]:
        """The input map of each head: conv5_3 for RPN1; for RPN2, pooled
        conv4_3 and conv5_3, each L2-normalised and scaled, concatenated."""
        c4, c5 = feats["conv4"], feats["conv5"]
        H5, W5 = c5.shape[-2:]
        pooled4 = F.max_pool2d(c4, kernel_size=2, stride=2)  # (N, C4, H5, W5), as VGG16's pool4
        assert pooled4.shape[-2:] == (H5, W5), (pooled4.shape, c5.shape)
        both = torch.cat([self.norm4(pooled4), self.norm5(c5)], dim=1)  # (N, C4 + C5, H5, W5)
        return {"rpn1": c5, "rpn2": both}

    def forward(self, images: Tensor, variants: tuple[Variant, ...] = VARIANTS
                ) -> dict[Variant, tuple[Tensor, Tensor]]:
        inputs = self.head_inputs(self.backbone(images))
        return {v: self.heads[v](inputs[v]) for v in variants}


def build_rpn(cfg: RpnConfig, *, load_imagenet: bool = True) -> RegionProposalNetwork:
    """The RPN described by `cfg` (the only reader of its architecture fields).
    ImageNet weights are copied into the backbone when `cfg.imagenet_weights`
    is set and `load_imagenet` (a checkpoint about to be loaded skips them)."""
    backbone = VGG16Backbone(width=cfg.backbone_width, conv67=False, batchnorm=cfg.batchnorm)
    if load_imagenet and cfg.imagenet_weights is not None:
        load_vgg16_imagenet(backbone, Path(cfg.imagenet_weights), "proposals.rpn.imagenet_weights")
    anchors = anchor_shapes(base_size=cfg.anchor_base_size, ratios=cfg.anchor_ratios,
                            scales=cfg.anchor_scales, scale=cfg.anchor_scale)
    return RegionProposalNetwork(
        backbone=backbone, anchors=anchors,
        conv3_channels=scaled_channels(cfg.head_conv3_channels, cfg.head_width),
        conv5_channels=scaled_channels(cfg.head_conv5_channels, cfg.head_width),
        l2_scale=cfg.l2_scale)


def flatten_head_outputs(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image rows in the order of `grid_anchors`: (y, x, anchor).
    objectness Tensor[N, A, H, W], deltas Tensor[N, 4A, H, W]
    -> Tensor[N, H*W*A], Tensor[N, H*W*A, 4]"""
    N, A, H, W = objectness.shape
    logits = objectness.permute(0, 2, 3, 1).reshape(N, H * W * A)  # (N, H*W*A)
    d = deltas.view(N, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(N, H * W * A, 4)  # (N, H*W*A, 4)
    return logits, d


def rpn_input_size(*, height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to min_size, with the
    longer side capped at max_size (Fast R-CNN's rescale)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_image(image: np.ndarray, *, min_size: int, max_size: int, flip: bool,
                  device: torch.device) -> Tensor:
    """uint8 (H, W, 3) RGB -> normalised Tensor[1, 3, H', W'] at the RPN's
    input size, mirrored left-right when `flip`."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    H, W = image.shape[:2]
    # np.array copies: images read from caches may be read-only, which torch warns about.
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
    if flip:
        x = x.flip(-1)
    size = rpn_input_size(height=H, width=W, min_size=min_size, max_size=max_size)
    if size != (H, W):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std  # (1, 3, H', W')


def image_anchors(model: RegionProposalNetwork, feature: Tensor) -> Tensor:
    """Anchors on the grid of `feature` Tensor[N, C, H5, W5]: Tensor[H5*W5*A, 4]."""
    H5, W5 = feature.shape[-2:]
    return grid_anchors(model.anchors, height=H5, width=W5, stride=model.stride)


def architecture(cfg: RpnConfig) -> dict:
    """The config fields the weights are tied to, as plain values."""
    return {name: (list(v) if isinstance(v := getattr(cfg, name), tuple) else v)
            for name in ARCHITECTURE_FIELDS}


def save_rpn(model: RegionProposalNetwork, path: Path, cfg: RpnConfig) -> None:
    """Write the weights and the architecture fields of `cfg` to `path`
    atomically (a temporary file renamed into place)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"architecture": architecture(cfg), "state_dict": state}, tmp)


def load_rpn(path: Path, cfg: RpnConfig) -> RegionProposalNetwork:
    """The RPN of `cfg` with the weights saved at `path` by `save_rpn`, on the
    CPU, in eval mode. UserError when the file is missing, unreadable, or was
    saved for a different architecture."""
    path = Path(path)
    fix = "rerun the proposals stage with --force to retrain the RPN"
    if not path.is_file():
        raise UserError(f"{path}: RPN weights not found ({fix})")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise UserError(f"{path}: not an RPN checkpoint ({exc}); {fix}") from exc
    if not isinstance(saved, dict) or "state_dict" not in saved or "architecture" not in saved:
        raise UserError(f"{path}: not an RPN checkpoint written by save_rpn; {fix}")
    wanted = architecture(cfg)
    differ = {k: (saved["architecture"].get(k), v) for k, v in wanted.items()
              if saved["architecture"].get(k) != v}
    if differ:
        detail = ", ".join(f"proposals.rpn.{k}: saved {a!r}, config {b!r}" for k, (a, b) in differ.items())
        raise UserError(f"{path}: RPN weights were trained with another architecture ({detail}); {fix}")
    model = build_rpn(cfg, load_imagenet=False)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model
