"""VGG16 backbone with torchvision's layer layout (Sec. 3, Appendix item 3).

`features` is an `nn.Sequential` indexed exactly like torchvision's
`vgg16().features` without pool5, so a torchvision state_dict's
`features.N.weight` keys load unchanged. Taps are the ReLU outputs of the last
conv of each block ("conv3" = conv3_3). Optional conv6/conv7 are two 3x3 convs
with ReLU on conv5_3 (Appendix item 3, Table 10 row c).

A width multiplier scales every channel count and `block_convs` sets the
convs per block, so the same code builds the small CPU model (width 0.25,
one conv per block: 16-32-64-128-128 channels, a fifth of VGG16's depth).
"""
from pathlib import Path

import torch
from torch import Tensor, nn

from ion.errors import UserError

# VGG16 configuration "D": output channels per conv, "M" = 2x2 max pool.
# The trailing pool5 is dropped (Sec. 3: ROIs are pooled from conv5_3 itself).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
BLOCK_CONVS = (2, 2, 3, 3, 3)  # convs per block conv1..conv5
BLOCK_CHANNELS = (64, 128, 256, 512, 512)


def vgg_layout(block_convs: tuple[int, ...]) -> tuple:
    """VGG16_LAYOUT with `block_convs[b]` convs in block b (VGG16: BLOCK_CONVS)."""
    assert len(block_convs) == len(BLOCK_CHANNELS) and min(block_convs) >= 1, block_convs
    layout: list = []
    for b, (n, ch) in enumerate(zip(block_convs, BLOCK_CHANNELS)):
        layout += ["M"] * (b > 0) + [ch] * n
    return tuple(layout)
GROUPS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7")


class VGG16Backbone(nn.Module):
    """VGG16 conv1_1..conv5_3 (+ conv6, conv7).

    forward(x Tensor[N, 3, H, W]) -> dict name -> Tensor[N, C, H/s, W/s] for
    "conv1".."conv5" (and "conv7" when conv67), s = `strides[name]`.

    batchnorm: a BatchNorm2d after every conv (torchvision's vgg16_bn layout).
    Not part of VGG16 and not in the paper: it is for small models trained from
    scratch on the CPU, where a plain 13-layer ReLU stack trains slowly and
    unstably with one image per step. ImageNet weights need batchnorm=False.
    BatchNorm layers of frozen groups stay in eval mode (running statistics fixed).
    """

    def __init__(self, *, width: float = 1.0, conv67: bool = False, batchnorm: bool = False,
                 block_convs: tuple[int, ...] = BLOCK_CONVS):
        super().__init__()
        assert width > 0
        self.width = width
        self.block_convs = tuple(block_convs)
        self.batchnorm = batchnorm
        self.conv67 = conv67
        layers: list[nn.Module] = []
        self._group_of_layer: list[str] = []  # group name of each entry of `features`
        self._taps: dict[int, str] = {}  # index in `features` of each tap's ReLU
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        in_ch, block, conv_in_block, stride = 3, 1, 0, 1
        for item in vgg_layout(self.block_convs):
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                self._group_of_layer.append(f"conv{block}")
                block, conv_in_block, stride = block + 1, 0, stride * 2
                continue
            out_ch = scaled_channels(item, width)
            layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
            group = [f"conv{block}"]
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_ch))
                group.append(f"conv{block}")
            layers.append(nn.ReLU(inplace=True))
            group.append(f"conv{block}")
            self._group_of_layer.extend(group)
            conv_in_block += 1
            if conv_in_block == self.block_convs[block - 1]:
                name = f"conv{block}"
                self._taps[len(layers) - 1] = name
                self.channels[name] = out_ch
                self.strides[name] = stride
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        if conv67:
            c5 = self.channels["conv5"]
            # Appendix item 3: two 512x3x3 convs on conv5_3, pooled from as "conv7".
            self.conv6 = nn.Conv2d(c5, c5, kernel_size=3, padding=1)
            self.conv7 = nn.Conv2d(c5, c5, kernel_size=3, padding=1)
            self.channels["conv7"] = c5
            self.strides["conv7"] = self.strides["conv5"]
        self._init_weights()
        self.frozen: tuple[str, ...] = ()

    def _init_weights(self) -> None:
        # torchvision's VGG init: He (fan_out) for convs; overwritten by ImageNet weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def groups(self) -> tuple[str, ...]:
        """The freezable groups of this backbone, conv1..conv5 (+ conv6, conv7)."""
        return GROUPS if self.conv67 else GROUPS[:5]

    def group_modules(self, name: str) -> list[nn.Module]:
        """The modules that make up one freezing group."""
        if name in ("conv6", "conv7"):
            return [getattr(self, name)]
        return [m for m, g in zip(self.features, self._group_of_layer) if g == name]

    def set_frozen(self, groups: tuple[str, ...]) -> None:
        """requires_grad False for the named groups, True for all others.

        Parameters of frozen groups get no gradient (grad stays None), so SGD
        leaves them unchanged, momentum included.
        """
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise ValueError(f"unknown backbone groups {unknown}; choose from {list(self.groups)}")
        self.frozen = tuple(groups)
        for name in self.groups:
            for m in self.group_modules(name):
                for p in m.parameters():
                    p.requires_grad_(name not in groups)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VGG16Backbone":
        super().train(mode)
        for name in self.frozen:
            for m in self.group_modules(name):
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                feats[self._taps[i]] = x
        if self.conv67:
            x = torch.relu(self.conv6(x))
            feats["conv7"] = torch.relu(self.conv7(x))
        return feats


def scaled_channels(channels: int, width: float) -> int:
    """VGG16's channel count scaled by the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def read_vgg16_state_dict(path: Path, field: str = "model.imagenet_weights") -> dict[str, Tensor]:
    """Load a VGG16 state_dict saved with torch.save (torchvision key names)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {field}: no such file "
                        "(save torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict() there, "
                        "or drop the key to train from scratch)")
    try:
        # mmap: only the tensors that are copied are read from disk (the file is 528 MB).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # any unpickling failure is a bad file
        raise UserError(f"{path}: {field}: not a torch state_dict ({exc}); "
                        "save one with torch.save(model.state_dict(), path)") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path}: {field}: expected a state_dict (dict of tensors), "
                        f"got {type(state).__name__}")
    return state


def copy_checked(*, target: nn.Module, prefix: str, state: dict[str, Tensor], keys: dict[str, str],
                 path: Path, field: str = "model.imagenet_weights") -> None:
    """Copy `state[src]` into `target`'s parameter `dst` for each dst -> src in
    `keys`, raising UserError naming the file and key when one is missing or
    has the wrong shape."""
    own = dict(target.named_parameters())
    with torch.no_grad():
        for dst, src in keys.items():
            if src not in state:
                raise UserError(f"{path}: {field}: key {src!r} is missing; "
                                "the file must be a torchvision VGG16 state_dict")
            value = state[src]
            if tuple(value.shape) != tuple(own[dst].shape):
                raise UserError(f"{path}: {field}: key {src!r} has shape "
                                f"{tuple(value.shape)}, the model ({prefix}{dst}) needs "
                                f"{tuple(own[dst].shape)}; the file must be a torchvision VGG16 "
                                "state_dict and model.width must be 1.0")
            own[dst].copy_(value)


def load_vgg16_imagenet(backbone: VGG16Backbone, path: Path, field: str = "model.imagenet_weights") -> None:
    """Copy conv1_1..conv5_3 from a torchvision VGG16 state_dict file.

    conv6/conv7 are not in VGG16 and keep their initialisation.
    """
    if backbone.width != 1.0 or backbone.batchnorm or backbone.block_convs != BLOCK_CONVS:
        section = field.rsplit(".", 1)[0]
        raise UserError(f"{path}: {field}: VGG16 weights need a backbone of width 1.0, without batchnorm, "
                        f"with block_convs {list(BLOCK_CONVS)} (got width {backbone.width}, batchnorm "
                        f"{backbone.batchnorm}, block_convs {list(backbone.block_convs)}); fix those in "
                        f"{section} or drop {field}")
    state = read_vgg16_state_dict(path, field)
    keys = {name: name for name, _ in backbone.features.named_parameters(prefix="features")}
    copy_checked(target=backbone, prefix="backbone.", state=state, keys=keys, path=Path(path), field=field)
