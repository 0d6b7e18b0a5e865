"""ConvNeXt's stages (Liu et al., 2022, the v1 design), built by TextSeg itself.

FreqMedCLIP's frequency encoder is a ConvNeXt whose stages TextSeg used to take from timm. Importing timm (with
torchvision and torch's compiler stack) took over 2 s of a fresh ``textseg segment`` that only loads a checkpoint
(issue 25), so the stages are built here and timm is imported only to fetch ImageNet weights. The module and
parameter names follow timm's (``stages.{i}.downsample``, ``stages.{i}.blocks.{j}.conv_dw``, ``.norm``,
``.mlp.fc1``, ``.mlp.fc2``, ``.gamma``), so its weights load without renaming, and the arithmetic is the same
operations in the same order, so the outputs are identical (``Testing/models/test_freqmedclip.py`` compares them).
"""

from __future__ import annotations

import torch
from torch import nn

from .convs import LayerNorm2d

__all__ = ["CONVNEXT_V1", "NORM_EPS", "ConvNeXtBlock", "ConvNeXtStage", "init_convnext_weights"]

# The timm names whose weights fit these stages: ConvNeXt v1 with linear MLPs (the smaller "atto" to "nano"
# variants use 1x1-convolution MLPs and v2 adds global response normalisation, which these stages do not have).
CONVNEXT_V1 = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge")
LAYER_SCALE_INIT = 1e-6  # the paper's initial layer-scale value
NORM_EPS = 1e-6


class _InvertedMLP(nn.Module):
    """``fc1`` (C to 4C), GELU, ``fc2`` (4C to C) on channels-last tokens. Shapes: ``(..., C) -> (..., C)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: 7 x 7 depthwise convolution, layer norm, inverted MLP, layer scale ``gamma``, residual.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=NORM_EPS)
        self.mlp = _InvertedMLP(channels)
        self.gamma = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return y.mul(self.gamma.reshape(1, -1, 1, 1)) + x


class ConvNeXtStage(nn.Module):
    """One resolution of ConvNeXt: an optional downsampling (layer norm, 2 x 2 stride-2 convolution from
    ``in_channels``) and ``depth`` blocks.

    Shapes: ``(B, in_channels, H, W) -> (B, channels, H / 2, W / 2)`` with ``downsample``, else
    ``(B, channels, H, W) -> (B, channels, H, W)``.
    """

    def __init__(self, in_channels: int, channels: int, depth: int, downsample: bool) -> None:
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_channels, NORM_EPS),
                                            nn.Conv2d(in_channels, channels, 2, stride=2))
        elif in_channels != channels:
            raise ValueError(f"a stage without downsampling keeps its width ({in_channels} != {channels})")
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def init_convnext_weights(module: nn.Module) -> None:
    """ConvNeXt's initialisation: convolutions and linear layers from a normal of std 0.02 truncated at +-2, biases
    zero (norms start at one and zero, layer scales at 1e-6, as built)."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
