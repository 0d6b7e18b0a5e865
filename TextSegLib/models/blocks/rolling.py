"""RollingUnet's long-range MLP: OR-MLP, DOR-MLP and the block that pairs it with a local conv branch.

Rolling-UNet (Liu et al., AAAI 2024) captures long-distance dependencies with MLPs over *rolled* feature maps:
channel ``c`` is shifted cyclically by ``c`` pixels along one spatial axis, so a following channel-mixing linear
layer sees, at each pixel, values from ``C`` different positions along that axis. An OR-MLP rolls and mixes along
one axis and then the orthogonal one; the DOR-MLP runs two OR-MLPs in the two orders and fuses them.

Roll directions follow RollingUnet's ``Lo2`` block: the height-first OR-MLP shifts channel ``c`` by ``+c`` along the
height, then by ``+c`` along the width; the width-first OR-MLP shifts by ``-c`` along the width, then by ``+c``
along the height. The two branches therefore read the width in opposite directions, and a network built with
these blocks computes what RollingUnet's does with the same weights.

The roll is one indexed gather for all channels (no loop over channels).
"""

from __future__ import annotations

import torch
from torch import nn

from TextSegLib.models.blocks.convs import LayerNorm2d

__all__ = [
    "DORMLP",
    "ORMLP",
    "DORMLPBlock",
    "channel_roll",
]


def channel_roll(x: torch.Tensor, dim: int, sign: int = 1) -> torch.Tensor:
    """Shift channel ``c`` of ``x`` cyclically by ``sign * c`` positions along spatial ``dim``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; ``dim`` is 2 (height) or 3 (width).
    Equivalent to ``torch.roll(x[:, c], sign * c, dim - 1)`` for every ``c``, done as one advanced-indexing gather.
    """
    if dim not in (2, 3):
        raise ValueError(f"channel_roll rolls along dim 2 or 3, not {dim}")
    channels, size = x.shape[1], x.shape[dim]
    positions = torch.arange(size, device=x.device)
    shifts = sign * torch.arange(channels, device=x.device)
    source = (positions[None, :] - shifts[:, None]) % size  # (C, size): where output position p reads from
    channel_index = torch.arange(channels, device=x.device)[:, None]
    if dim == 2:
        return x[:, channel_index, source, :]
    return x.permute(0, 1, 3, 2)[:, channel_index, source, :].permute(0, 1, 3, 2)


class ORMLP(nn.Module):
    """Orthogonal Rolling MLP: roll + channel MLP along one axis, then along the other.

    ``first_dim`` picks the first axis (2 = height, 3 = width); the second is the other one. ``signs`` are the
    directions of the two rolls (channel ``c`` moves by ``signs[i] * c`` along the ``i``-th axis rolled).
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, first_dim: int, drop: float = 0.0, signs: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        if first_dim not in (2, 3):
            raise ValueError(f"an OR-MLP rolls along dim 2 or 3 first, not {first_dim}")
        if any(sign not in (-1, 1) for sign in signs):
            raise ValueError(f"roll directions are +1 or -1, got {signs}")
        self.first_dim = first_dim
        self.second_dim = 5 - first_dim
        self.signs = tuple(signs)
        self.mix1 = nn.Conv2d(channels, channels, 1)
        self.act = nn.GELU()
        self.mix2 = nn.Conv2d(channels, channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.mix1(channel_roll(x, self.first_dim, self.signs[0]))))
        return self.drop(self.mix2(channel_roll(x, self.second_dim, self.signs[1])))


class DORMLP(nn.Module):
    """Double Orthogonal Rolling MLP: two OR-MLPs (height-then-width with rolls ``+c, +c``; width-then-height
    with rolls ``-c, +c``, as RollingUnet's ``Lo2``), each with a residual, concatenated, LayerNorm, fused by a
    channel linear layer, plus a residual. ``width_first_roll = +1`` rolls the width-first branch by ``+c`` instead:
    the reading of TextSeg releases before it matched RollingUnet, kept for checkpoints trained with it.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, drop: float = 0.0, width_first_roll: int = -1) -> None:
        super().__init__()
        self.height_first = ORMLP(channels, first_dim=2, drop=drop)
        self.width_first = ORMLP(channels, first_dim=3, drop=drop, signs=(width_first_roll, 1))
        self.norm = LayerNorm2d(2 * channels)
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.height_first(x) + x, self.width_first(x) + x], dim=1)
        return self.drop(self.fuse(self.norm(both))) + x


class DORMLPBlock(nn.Module):
    """RollingUnet's feature block: DOR-MLP (long range) beside a depthwise-separable conv (local), fused.

    The local branch is a 3x3 depthwise conv, a 1x1 pointwise conv, ReLU and BatchNorm; both branches are
    concatenated and mixed back to ``C`` channels by a channel linear layer. ``width_first_roll``: see
    :class:`DORMLP`.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, drop: float = 0.0, width_first_roll: int = -1) -> None:
        super().__init__()
        self.long_range = DORMLP(channels, drop=drop, width_first_roll=width_first_roll)
        self.local = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(channels),
        )
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fuse(torch.cat([self.long_range(x), self.local(x)], dim=1)))
