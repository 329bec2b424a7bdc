"""Context features on top of conv5 (Sec. 3.2, Fig. 3 and 6, Tables 7-10).

The paper's choice is two stacked four-direction IRNNs (Fig. 3):

    conv5 -> 1x1 conv -> IRNN (4 dirs) -> concat -> 1x1 conv -> IRNN (4 dirs) -> concat -> 1x1 conv

the last 1x1 conv bringing the map back to conv5's channel count ("the context
features have the same dimensions as conv5", Sec. 3).  The alternatives of
Table 7 (none, two 3x3 convs, two 5x5 convs, global average pooling tiled back)
and the variants of Table 10 ("left-right then up-down", "pool out of both
IRNNs") are switches of ``ContextConfig``.

Three further switches change how the IRNN is read out, for a small model
trained from scratch (the paper's sat on pretrained VGG16; docs/RESULTS.md, "What made
the IRNN learn the sky"): ``state_norm: steps`` divides each direction's
hidden state by the cells it has scanned (running means, not sums);
``input_init: identity`` starts the first layer's input-to-hidden conv as the
identity; ``pool_directions: separate`` pools the first layer's directions as
one map each, so skip pooling L2-normalises each on its own.

Every module here maps conv5 Tensor[N, C, H, W] to a list of maps to ROI-pool
from, each Tensor[N, C_i, H, W], and lists their channel counts in
``out_channels``.  The last map is the top output, the one the segmentation
regulariser (ion/modeling/seg_head.py) reads.
"""
from typing import Literal

import torch
from torch import Tensor, nn

from ion.modeling.config import ContextConfig
from ion.modeling.irnn import DIRECTIONS, FourDirectionIRNN

# Table 7's widths for the convolutional alternatives.
CONV3_CHANNELS = 512
CONV5_CHANNELS = 256


class NoContext(nn.Module):
    """Table 7 without context: nothing to pool."""

    def __init__(self):
        super().__init__()
        self.out_channels = []

    def forward(self, conv5: Tensor) -> list[Tensor]:
        return []


class StackedConvContext(nn.Module):
    """Two stacked convolutions with ReLU on conv5 (Table 7 a, b; Fig. 6 a, b).

    Each output cell sees a (2k-1)x(2k-1) window of conv5 (5x5 for k=3, 9x9 for k=5).
    """

    def __init__(self, *, in_channels: int, channels: int, kernel_size: int, dropout: float,
                 pool_from_both: bool):
        super().__init__()
        self.first = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.second = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.dropout = nn.Dropout(dropout)
        self.pool_from_both = pool_from_both
        self.out_channels = [channels, channels] if pool_from_both else [channels]

    def forward(self, conv5: Tensor) -> list[Tensor]:
        a = self.dropout(torch.relu(self.first(conv5)))  # (N, channels, H, W)
        b = self.dropout(torch.relu(self.second(a)))  # (N, channels, H, W)
        return [a, b] if self.pool_from_both else [b]


class GlobalAverageContext(nn.Module):
    """Global average pooling unpooled (tiled) back to conv5's size (Table 7 c, Fig. 6 c, ParseNet)."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.out_channels = [in_channels]

    def forward(self, conv5: Tensor) -> list[Tensor]:
        N, C, H, W = conv5.shape
        mean = conv5.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        # contiguous: ROI pooling reads a real map, not a stride-0 view.
        return [mean.expand(N, C, H, W).contiguous()]


# Attribute names of the stacked IRNN layers, bottom first: the two-layer model
# keeps the names (and so the checkpoint keys) it always had.
LAYER_NAMES = ("first", "second", "third")


class IRNNContext(nn.Module):
    """`layers` stacked IRNN layers (two by default, Table 8) and a 1x1 conv back
    to conv5's channels (Fig. 3).

    forward(conv5 Tensor[N, C, H, W]) -> [Tensor[N, C, H, W]], or with
    pool_from_both [first layer's concat Tensor[N, D1*hidden, H, W], Tensor[N, C, H, W]].
    After the second layer every output cell depends on every input cell (Fig. 6 d);
    after one, only the cells of its row and column do.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden: int,
        recurrent: Literal["learned", "identity"] = "learned",
        first_step_bias: bool = False,
        variant: Literal["standard", "lr_then_ud"] = "standard",
        pool_from_both: bool = False,
        dropout: float = 0.0,
        identity_scan: Literal["closed_form", "loop"] = "closed_form",
        state_norm: Literal["none", "steps"] = "none",
        input_init: Literal["random", "identity"] = "random",
        pool_directions: Literal["concat", "separate"] = "concat",
        layers: int = 2,
        input_to_hidden: Literal["shared", "per_direction"] = "shared",
    ):
        super().__init__()
        if not 1 <= layers <= len(LAYER_NAMES):
            raise ValueError(f"context.layers must be 1..{len(LAYER_NAMES)}, got {layers}")
        if input_init == "identity" and hidden != in_channels:
            raise ValueError(f"context.input_init identity needs context.hidden = conv5's channels "
                             f"({in_channels}), got hidden {hidden}; set hidden to {in_channels} or "
                             "input_init to random")
        if pool_directions == "separate" and not pool_from_both:
            raise ValueError("pool_directions separate needs pool_from_both")
        if variant == "standard":
            layer_dirs = [DIRECTIONS] * layers
        else:
            if layers != 2:
                raise ValueError(f"variant lr_then_ud needs 2 layers, got {layers}")
            # Table 10 (a), as in ReNet: the first layer sweeps rows, the second columns.
            layer_dirs = [("right", "left"), ("down", "up")]
        shared = dict(hidden=hidden, recurrent=recurrent, first_step_bias=first_step_bias,
                      identity_scan=identity_scan, state_norm=state_norm, input_to_hidden=input_to_hidden)
        channels = in_channels
        self.layer_names = LAYER_NAMES[:layers]
        for name, dirs in zip(self.layer_names, layer_dirs):
            layer = FourDirectionIRNN(in_channels=channels, directions=dirs, **shared)
            setattr(self, name, layer)
            channels = layer.out_channels
        self.output = nn.Conv2d(channels, in_channels, kernel_size=1)
        if input_init == "identity":
            # conv5 is post-ReLU (>= 0), so an identity input never resets the
            # accumulators: "down" at a cell starts as the (mean) column of conv5 above it.
            with torch.no_grad():
                for conv in self.first.input_convs():
                    conv.weight.copy_(torch.eye(hidden).view(hidden, hidden, 1, 1))
                    conv.bias.zero_()
        # Sec. 3.2 item 2: dropout after each concat layer.
        self.dropout = nn.Dropout(dropout)
        self.pool_from_both = pool_from_both
        self.split_first = pool_directions == "separate"
        if not pool_from_both:
            self.out_channels = [in_channels]
        elif self.split_first:
            self.out_channels = [hidden] * len(layer_dirs[0]) + [in_channels]
        else:
            self.out_channels = [self.first.out_channels, in_channels]

    def forward(self, conv5: Tensor) -> list[Tensor]:
        a = self.dropout(self.first(conv5))  # (N, D1*hidden, H, W)
        b = a
        for name in self.layer_names[1:]:
            b = self.dropout(getattr(self, name)(b))  # (N, D*hidden, H, W)
        top = self.output(b)  # (N, C, H, W)
        if not self.pool_from_both:
            return [top]
        # Pooled one map per direction, each is L2-normalised on its own: the one
        # direction that reaches a far cue is not outweighed by the three that do not.
        first = list(a.split(self.first.hidden, dim=1)) if self.split_first else [a]  # D1 x (N, hidden, H, W)
        return first + [top]


def build_context(cfg: ContextConfig, in_channels: int) -> nn.Module:
    """The context module ``cfg`` describes, on a conv5 with ``in_channels`` channels.

    The module's forward(conv5 Tensor[N, C, H, W]) returns the list of maps to
    pool from (empty for kind "none"); ``.out_channels`` lists their channels.
    """
    if cfg.kind == "none":
        return NoContext()
    if cfg.kind in ("conv3", "conv5"):
        kernel_size = 3 if cfg.kind == "conv3" else 5
        default = CONV3_CHANNELS if cfg.kind == "conv3" else CONV5_CHANNELS
        return StackedConvContext(
            in_channels=in_channels,
            channels=default if cfg.channels is None else cfg.channels,
            kernel_size=kernel_size,
            dropout=cfg.dropout,
            pool_from_both=cfg.pool_from_both,
        )
    if cfg.kind == "global":
        return GlobalAverageContext(in_channels=in_channels)
    assert cfg.kind == "irnn", cfg.kind
    return IRNNContext(
        in_channels=in_channels,
        hidden=cfg.hidden,
        recurrent=cfg.recurrent,
        first_step_bias=cfg.first_step_bias,
        variant=cfg.variant,
        pool_from_both=cfg.pool_from_both,
        dropout=cfg.dropout,
        state_norm=cfg.state_norm,
        input_init=cfg.input_init,
        pool_directions=cfg.pool_directions,
        layers=cfg.layers,
        input_to_hidden=cfg.input_to_hidden,
    )
