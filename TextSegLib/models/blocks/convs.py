"""Convolution blocks and a channel LayerNorm for ``(B, C, H, W)`` feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvNormAct",
    "DoubleConv",
    "LayerNorm2d",
    "ScaledResidual",
]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a feature map (an ``nn.LayerNorm`` over ``C``, so code that treats layer
    norms alike, such as the trainer's fp32 normalisation under CPU autocast, finds it).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; each pixel's ``C`` values are normalised independently.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    """``k x k`` convolution (optionally dilated), BatchNorm, ReLU.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)`` (same padding, stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvNormAct layers: the plain U-Net stage, ``C_in -> C_mid -> C_out`` (``C_mid = C_out`` unless
    given; RollingUnet's decoder stages use ``C_mid = C_in``).

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        mid = out_channels if mid_channels is None else mid_channels
        super().__init__(ConvNormAct(in_channels, mid), ConvNormAct(mid, out_channels))


class ScaledResidual(nn.Module):
    """``x + s * f(x)`` with a learnable scalar ``s`` starting at ``scale``: a branch that starts almost switched
    off and grows as training finds it useful (how TexLiverNet's public code attaches SFPM-s and SFPM-f).

    Shapes: those of ``f``, which must keep its input's shape: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, branch: nn.Module, scale: float = 0.01) -> None:
        super().__init__()
        self.branch = branch
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.branch(x)
