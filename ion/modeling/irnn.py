"""Four-direction IRNN layer (Sec. 3.2, Fig. 3, Eq. 1 and 2).

One layer is: a 1x1 convolution shared by every direction (the input-to-hidden
transition with its bias merged in), then one ReLU recurrence per direction
moving right, left, down or up across the map, then the hidden states of the
directions concatenated along the channel axis.  Sec. 3.2: "Sharing this
transition allows us to remove 6 conv layers in total with a negligible effect
on accuracy (-0.1 mAP)", so the unshared layer, one 1x1 conv per direction,
scored 0.1 mAP higher; ``input_to_hidden="per_direction"`` is that variant.

The recurrence moving along a sequence x_0 .. x_{L-1} is

    h_j = max(Whh h_{j-1} + x_j, 0),   h_{-1} = 0            (Eq. 1)

With Whh = I (Sec. 3.2 item 1, Table 9 "Include Whh? No") it has an exact
closed form.  With S_j = x_0 + ... + x_j and S_{-1} = 0,

    h_j = S_j - min(0, S_0, ..., S_j)

(the Lindley recursion of queueing theory: the ReLU resets the accumulator each
time the prefix sum reaches a new minimum).  ``relu_scan_closed_form`` computes
it with one cumsum and one cummin over the whole tensor; ``relu_scan_loop`` is
the step-by-step reference it must match in values and gradients.  With a
learned Whh, ``relu_scan_learned`` steps every row (or column), image and
direction that share an axis together, one batched matmul per step (Sec. 3.2:
"stepping all IRNNs together with a single matrix multiply").  The reference
loop runs in that same step-major layout, one add and ReLU per step.
"""
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

DIRECTIONS: tuple[str, ...] = ("right", "left", "down", "up")

# Directions along the width axis; the others move along the height axis.
_HORIZONTAL = ("right", "left")
# Directions that move towards decreasing indices.
_REVERSED = ("left", "up")


def relu_scan_closed_form(x: Tensor, dim: int = -1) -> Tensor:
    """h_j = max(h_{j-1} + x_j, 0), h_{-1} = 0, along ``dim`` (increasing index).

    Closed form h_j = S_j - min(0, min_{k<=j} S_k) with S the prefix sum.
    Gradients come from autograd through cumsum and cummin; at continuous
    inputs they equal the loop's (a reset at j makes h_j = S_j - S_j, whose
    gradient cancels exactly as the ReLU's does).  Half-precision inputs are
    accumulated in float32: the prefix sums can be far larger than h, and
    S_j - min S_k would lose h to cancellation in float16.
    """
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    prefix = torch.cumsum(x, dim=dim, dtype=acc_dtype)
    floor = torch.cummin(prefix, dim=dim).values.clamp(max=0.0)
    return (prefix - floor).to(x.dtype)


def relu_scan_loop(x: Tensor, dim: int = -1) -> Tensor:
    """Reference for ``relu_scan_closed_form``: the recurrence of Eq. 2 one step at a time."""
    h = torch.zeros_like(x.select(dim, 0))
    steps = []
    for j in range(x.shape[dim]):
        h = torch.relu(h + x.select(dim, j))
        steps.append(h)
    return torch.stack(steps, dim=dim)


def relu_scan_learned(x: Tensor, weight: Tensor) -> Tensor:
    """Eq. 1 with a learned recurrent matrix per direction, all sequences stepped together.

    x: Tensor[L, D, B, C], the inputs of D directions, B sequences each, step-major.
    weight: Tensor[D, C, C], Whh per direction (h_j = relu(Whh h_{j-1} + x_j)).
    Returns Tensor[L, D, B, C] in x's dtype.  One batched matmul (baddbmm) per step.

    Half-precision inputs (and autocast) are stepped in float32, as the closed
    form accumulates: a bfloat16 state would be rounded at each of up to 63
    steps (a 1000 px image's conv5 map), its error growing with the distance
    scanned; the steps are a small matmul each, so float32 costs little.
    """
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        xs = x.to(acc_dtype)
        weight_t = weight.to(acc_dtype).transpose(1, 2)  # (D, C, C): row vectors times Whh^T
        h = torch.relu(xs[0])  # h_{-1} = 0
        steps = [h]
        for j in range(1, xs.shape[0]):
            h = torch.relu(torch.baddbmm(xs[j], h, weight_t))  # (D, B, C)
            steps.append(h)
        return torch.stack(steps).to(x.dtype)


def _add_first_step(x: Tensor, bias: Tensor) -> Tensor:
    """Add ``bias`` Tensor[C] to step 0 along the last dim of x Tensor[N, C, A, L]."""
    first = x[..., :1] + bias.view(1, -1, 1, 1)
    return torch.cat([first, x[..., 1:]], dim=-1)


def _scan_closed_form_directions(x: Tensor, directions: Sequence[str], bias: Optional[Tensor]) -> dict[str, Tensor]:
    """Eq. 2 in closed form for every direction.

    x: Tensor[N, C, H, W]; bias: Tensor[D, C] or None.  Returns {direction: Tensor[N, C, H, W]}.
    Every scan runs along the last, contiguous dim (cumsum and cummin are
    several times slower along a strided one on the CPU).
    """
    lines = {True: x}
    if any(d not in _HORIZONTAL for d in directions):
        lines[False] = x.transpose(2, 3).contiguous()  # (N, C, W, H): columns as rows
    outputs = {}
    for k, d in enumerate(directions):
        horizontal = d in _HORIZONTAL
        seq = lines[horizontal].flip(-1) if d in _REVERSED else lines[horizontal]
        if bias is not None:
            seq = _add_first_step(seq, bias[k])
        h = relu_scan_closed_form(seq, dim=-1)
        h = h.flip(-1) if d in _REVERSED else h
        outputs[d] = h if horizontal else h.transpose(2, 3)
    return outputs


def _to_steps(x: Tensor, horizontal: bool) -> Tensor:
    """Tensor[N, C, H, W] -> step-major sequences Tensor[L, B, C] (L = W, B = N*H or L = H, B = N*W)."""
    N, C, H, W = x.shape
    if horizontal:
        return x.permute(3, 0, 2, 1).reshape(W, N * H, C)  # (W, N*H, C)
    return x.permute(2, 0, 3, 1).reshape(H, N * W, C)  # (H, N*W, C)


def _from_steps(h: Tensor, horizontal: bool, N: int, H: int, W: int) -> Tensor:
    """Inverse of ``_to_steps``: Tensor[L, B, C] -> Tensor[N, C, H, W]."""
    C = h.shape[-1]
    if horizontal:
        return h.view(W, N, H, C).permute(1, 3, 2, 0)  # (N, C, H, W)
    return h.view(H, N, W, C).permute(1, 3, 0, 2)  # (N, C, H, W)


def _scan_stepwise_directions(
    x: Tensor, directions: Sequence[str], weight: Optional[Tensor], bias: Optional[Tensor]
) -> dict[str, Tensor]:
    """Eq. 1 (``weight`` Tensor[D, C, C]) or Eq. 2 (``weight`` None) one step at a time,
    the directions that share an axis stepped together.

    x: Tensor[N, C, H, W]; bias: Tensor[D, C] or None.  Returns {direction: Tensor[N, C, H, W]}.
    """
    N, C, H, W = x.shape
    outputs = {}
    for horizontal in (True, False):
        group = [d for d in directions if (d in _HORIZONTAL) == horizontal]
        if not group:
            continue
        index = torch.tensor([directions.index(d) for d in group], device=x.device)
        steps = _to_steps(x, horizontal)  # (L, B, C)
        # The shared input-to-hidden output is copied to each direction (Sec. 3.2).
        seqs = torch.stack([steps.flip(0) if d in _REVERSED else steps for d in group], dim=1)  # (L, D_g, B, C)
        if bias is not None:
            first = seqs[:1] + bias.index_select(0, index)[None, :, None, :]  # (1, D_g, B, C)
            seqs = torch.cat([first, seqs[1:]], dim=0)
        if weight is None:
            hs = relu_scan_loop(seqs, dim=0)  # (L, D_g, B, C)
        else:
            hs = relu_scan_learned(seqs, weight.index_select(0, index))  # (L, D_g, B, C)
        for k, d in enumerate(group):
            h = hs[:, k].flip(0) if d in _REVERSED else hs[:, k]  # (L, B, C)
            outputs[d] = _from_steps(h, horizontal, N, H, W)
    return outputs


def four_direction_scan(
    x: Tensor,
    *,
    directions: Sequence[str] = DIRECTIONS,
    recurrent_weight: Optional[Tensor] = None,
    first_step_bias: Optional[Tensor] = None,
    identity_scan: Literal["closed_form", "loop"] = "closed_form",
) -> Tensor:
    """The recurrent part of an IRNN layer: every direction scans the same input.

    x: Tensor[N, C, H, W], the shared input-to-hidden output.
    recurrent_weight: Tensor[D, C, C] (Whh per direction, in ``directions``
        order), or None for Whh = I.
    first_step_bias: Tensor[D, C] added at each direction's first step
        (Sec. 3.2 item 3), or None.
    identity_scan: with Whh = I, the closed form or the reference loop (the
        learned path's layout and stepping without the matmul).
    Returns Tensor[N, D*C, H, W]: the hidden states concatenated in
    ``directions`` order.  "right" at column j summarises columns 0..j of its
    row, "left" columns j..W-1, "down" rows 0..i, "up" rows i..H-1 (Fig. 4).
    """
    if identity_scan not in ("closed_form", "loop"):
        raise ValueError(f"identity_scan must be 'closed_form' or 'loop', got {identity_scan!r}")
    if recurrent_weight is None and identity_scan == "closed_form":
        outputs = _scan_closed_form_directions(x, directions, first_step_bias)
    else:
        outputs = _scan_stepwise_directions(x, directions, recurrent_weight, first_step_bias)
    return torch.cat([outputs[d] for d in directions], dim=1)


def steps_taken(direction: str, height: int, width: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> Tensor:
    """Tensor[1, 1, H, W]: how many cells the ``direction`` scan has read at each
    cell, itself included ("right" at column j: j + 1; "left": W - j; "down" at
    row i: i + 1; "up": H - i)."""
    horizontal = direction in _HORIZONTAL
    length = width if horizontal else height
    count = torch.arange(1, length + 1, dtype=dtype, device=device)
    if direction in _REVERSED:
        count = count.flip(0)
    return count.view(1, 1, 1, length) if horizontal else count.view(1, 1, length, 1)


def divide_by_steps(h: Tensor, directions: Sequence[str]) -> Tensor:
    """Each direction's block of h Tensor[N, D*C, H, W] divided by `steps_taken`:
    with Whh = I and no reset, the running sum becomes the running mean."""
    N, DC, H, W = h.shape
    blocks = h.split(DC // len(directions), dim=1)
    return torch.cat([b / steps_taken(d, H, W, dtype=h.dtype, device=h.device)
                      for b, d in zip(blocks, directions)], dim=1)


class FourDirectionIRNN(nn.Module):
    """One IRNN layer of Fig. 3: shared 1x1 conv, ReLU recurrences, concat.

    forward(x Tensor[N, in_channels, H, W]) -> Tensor[N, len(directions) * hidden, H, W]
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden: int,
        directions: Sequence[str] = DIRECTIONS,
        recurrent: Literal["learned", "identity"] = "learned",
        first_step_bias: bool = False,
        identity_scan: Literal["closed_form", "loop"] = "closed_form",
        state_norm: Literal["none", "steps"] = "none",
        input_to_hidden: Literal["shared", "per_direction"] = "shared",
    ):
        super().__init__()
        directions = tuple(directions)
        if input_to_hidden not in ("shared", "per_direction"):
            raise ValueError(f"input_to_hidden must be 'shared' or 'per_direction', got {input_to_hidden!r}")
        if state_norm not in ("none", "steps"):
            raise ValueError(f"state_norm must be 'none' or 'steps', got {state_norm!r}")
        if not directions or len(set(directions)) != len(directions) or not set(directions) <= set(DIRECTIONS):
            raise ValueError(f"directions must be distinct names from {DIRECTIONS}, got {directions}")
        if recurrent not in ("learned", "identity"):
            raise ValueError(f"recurrent must be 'learned' or 'identity', got {recurrent!r}")
        if identity_scan not in ("closed_form", "loop"):
            raise ValueError(f"identity_scan must be 'closed_form' or 'loop', got {identity_scan!r}")
        self.directions = directions
        self.hidden = hidden
        self.identity_scan = identity_scan
        self.state_norm = state_norm
        self.out_channels = len(directions) * hidden
        # Sec. 3.2: one input-to-hidden transition shared by all directions, bias merged in;
        # per_direction: one 1x1 conv per direction (unshared: sharing cost 0.1 mAP in the paper).
        if input_to_hidden == "shared":
            self.input_to_hidden = nn.Conv2d(in_channels, hidden, kernel_size=1)
            self.input_to_hidden_per_direction = None
        else:
            self.input_to_hidden = None
            self.input_to_hidden_per_direction = nn.ModuleList(
                nn.Conv2d(in_channels, hidden, kernel_size=1) for _ in directions)
        if recurrent == "learned":
            # IRNN: the recurrent matrix starts as the identity (Le et al., Sec. 3.2).
            eye = torch.eye(hidden).expand(len(directions), hidden, hidden).clone()
            self.recurrent_weight = nn.Parameter(eye)  # (D, hidden, hidden)
        else:
            self.register_parameter("recurrent_weight", None)
        if first_step_bias:
            # Sec. 3.2 item 3: a separate bias b0 for the first step of each direction.
            self.first_step_bias = nn.Parameter(torch.zeros(len(directions), hidden))  # (D, hidden)
        else:
            self.register_parameter("first_step_bias", None)

    def input_convs(self) -> list[nn.Conv2d]:
        """The input-to-hidden 1x1 convs: one shared, or one per direction."""
        if self.input_to_hidden is not None:
            return [self.input_to_hidden]
        return list(self.input_to_hidden_per_direction)

    def forward(self, x: Tensor) -> Tensor:
        scan = dict(identity_scan=self.identity_scan)
        if self.input_to_hidden is not None:
            h = four_direction_scan(self.input_to_hidden(x), directions=self.directions,
                                    recurrent_weight=self.recurrent_weight, first_step_bias=self.first_step_bias,
                                    **scan)  # (N, D*hidden, H, W)
        else:
            # Unshared: each direction scans its own input, one direction per call.
            parts = []
            for k, (d, conv) in enumerate(zip(self.directions, self.input_to_hidden_per_direction)):
                weight = None if self.recurrent_weight is None else self.recurrent_weight[k:k + 1]
                bias = None if self.first_step_bias is None else self.first_step_bias[k:k + 1]
                parts.append(four_direction_scan(conv(x), directions=(d,), recurrent_weight=weight,
                                                 first_step_bias=bias, **scan))  # (N, hidden, H, W)
            h = torch.cat(parts, dim=1)  # (N, D*hidden, H, W)
        # "steps": read the states out as running means. A running sum grows with
        # the distance scanned, so after the per-location L2 norm of skip pooling
        # a cell's summary is weighted by where the cell is, not by what it saw.
        return divide_by_steps(h, self.directions) if self.state_norm == "steps" else h
