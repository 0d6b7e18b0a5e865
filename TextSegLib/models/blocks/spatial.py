"""SFPM-s: TexLiverNet's spatial perception module for fine local detail beside DOR-MLP."""

from __future__ import annotations

import torch
from torch import nn

from TextSegLib.models.blocks.convs import ConvNormAct

__all__ = [
    "DenseSpatialPerception",
    "SpatialFrequencyPerceptionS",
]


class SpatialFrequencyPerceptionS(nn.Module):
    """SFPM-s: two standard 3x3 convolutions around three dilated 3x3 convolutions (rates 2, 4, 2), with
    residual connections around every dilated layer and around the whole module.

    ``conv_in`` reduces to ``hidden = ratio * C`` channels, the dilated layers work at that width, ``conv_out``
    restores ``C``. Used in parallel with DOR-MLP at encoder stage 4 and at the bottleneck; the two outputs are
    added.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, hidden_ratio: float = 0.5, dilations: tuple[int, ...] = (2, 4, 2)) -> None:
        super().__init__()
        hidden = max(8, round(channels * hidden_ratio))
        self.conv_in = ConvNormAct(channels, hidden)
        self.dilated = nn.ModuleList(ConvNormAct(hidden, hidden, dilation=rate) for rate in dilations)
        self.conv_out = ConvNormAct(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_in(x)
        for layer in self.dilated:
            y = layer(y) + y
        return self.conv_out(y) + x


class DenseSpatialPerception(nn.Module):
    """SFPM-s as TexLiverNet's public code builds it: the same two standard and three dilated (2, 4, 2) 3x3
    convolutions as :class:`SpatialFrequencyPerceptionS`, joined by concatenation instead of residual sums.

    ``a = Conv(x)`` (``C`` channels), ``d1 = DConv_2(a)`` (``C / 2``), ``d2 = DConv_4(d1)`` (``C / 2``),
    ``d3 = DConv_2([d1, d2])`` (``C``), output ``Conv([a, d3])`` (``C``). Every convolution is ConvNormAct.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; ``C`` even.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"the dense SFPM-s halves its width, so it needs an even channel count, got {channels}")
        half = channels // 2
        self.conv_in = ConvNormAct(channels, channels)
        self.dilated1 = ConvNormAct(channels, half, dilation=2)
        self.dilated2 = ConvNormAct(half, half, dilation=4)
        self.dilated3 = ConvNormAct(channels, channels, dilation=2)
        self.conv_out = ConvNormAct(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_in(x)
        d1 = self.dilated1(a)
        d3 = self.dilated3(torch.cat([d1, self.dilated2(d1)], dim=1))
        return self.conv_out(torch.cat([a, d3], dim=1))
