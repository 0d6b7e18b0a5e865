"""Stages of an LViT-style convolutional U-shape: down stages, pixel-level attention on skip connections, up
stages, and the reconstruction of token grids into feature maps of a given level."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.models.blocks.convs import ConvNormAct
from TextSegLib.models.blocks.tokens import tokens_to_map


class DownStage(nn.Sequential):
    """2x2 max pooling, then ``depth`` 3x3 ConvNormAct layers.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H / 2, W / 2)``.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2) -> None:
        layers = [ConvNormAct(in_channels if i == 0 else out_channels, out_channels) for i in range(depth)]
        super().__init__(nn.MaxPool2d(2), *layers)


class PixelLevelAttention(nn.Module):
    """Pixel-level attention (the PLAM of LViT) re-weighting a skip connection pixel by pixel.

    Two 1x1 convolutions with ReLU give two views of the input; their mean and maximum over channels, and the sum
    of both, form three descriptors per pixel; a per-pixel MLP ``3 -> 3 * ratio -> 1`` turns them into a weight
    that multiplies every channel of the input at that pixel.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.view_mean = nn.Conv2d(channels, channels, 1, bias=False)
        self.view_max = nn.Conv2d(channels, channels, 1, bias=False)
        self.mlp = nn.Sequential(nn.Conv2d(3, 3 * ratio, 1), nn.ReLU(inplace=True), nn.Conv2d(3 * ratio, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.relu(self.view_mean(x)).mean(dim=1, keepdim=True)
        peak = F.relu(self.view_max(x)).amax(dim=1, keepdim=True)
        return x * self.mlp(torch.cat([mean, peak, mean + peak], dim=1))


class UpStage(nn.Module):
    """Decoder stage: nearest-neighbour 2x upsampling, (optional) pixel-level attention on the skip, concatenation,
    then ``depth`` 3x3 ConvNormAct layers (LViT's up block, whose ``nn.Upsample`` is nearest).

    Shapes: ``x`` ``(B, C_in, H, W)``, ``skip`` ``(B, C_skip, 2H, 2W)`` -> ``(B, C_out, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, depth: int = 2,
                 pixel_attention: bool = True) -> None:
        super().__init__()
        self.attention = PixelLevelAttention(skip_channels) if pixel_attention else nn.Identity()
        self.convs = nn.Sequential(*(
            ConvNormAct(in_channels + skip_channels if i == 0 else out_channels, out_channels) for i in range(depth)
        ))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.convs(torch.cat([self.attention(skip), x], dim=1))


class TokenReconstruct(nn.Module):
    """A token grid as a feature map of a finer level: 1x1 convolution, nearest-neighbour upsampling by ``scale``,
    batch normalisation, ReLU (LViT's ``Reconstruct``, which upsamples, nearest, before the 1x1 convolution: a
    pointwise convolution commutes with copying pixels, so convolving first gives the same result at a fraction of
    the cost).

    Shapes: ``(B, g * g, C_in) -> (B, C_out, g * scale, g * scale)``.
    """

    def __init__(self, in_dim: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(in_dim, out_channels, 1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(tokens_to_map(tokens))
        if self.scale != 1:
            x = F.interpolate(x, scale_factor=float(self.scale), mode="nearest")
        return self.act(self.norm(x))
