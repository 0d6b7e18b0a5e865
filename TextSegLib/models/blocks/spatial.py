"""SFPM-s: TexLiverNet's spatial perception module for fine local detail beside DOR-MLP."""

from __future__ import annotations

import torch
from torch import nn

from .convs import ConvNormAct


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
