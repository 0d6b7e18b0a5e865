"""Frequency-domain blocks: StarReLU, TexLiverNet's adaptive frequency filter G and SFPM-f (Eq. 4-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convs import LayerNorm2d


class StarReLU(nn.Module):
    """StarReLU (MetaFormer baselines): ``s * relu(x) ** 2 + b`` with learnable scalars ``s`` and ``b``.

    Shapes: any ``(...) -> (...)``. Initialised to the MetaFormer values ``s = 0.8944, b = -0.4472`` that give
    roughly zero mean and unit variance for unit-normal input.
    """

    def __init__(self, scale: float = 0.8944, bias: float = -0.4472) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x) ** 2 + self.bias


def max_filter3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max pooling with stride 1 and padding 1 as two separable passes of element-wise maxima.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Equal to ``F.max_pool2d(x, 3, 1, 1)`` and about twice as fast on
    CPU, where PyTorch's stride-1 pooling is slow at full resolution.
    """
    padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


class AdaptiveFrequencyFilter(nn.Module):
    """TexLiverNet's adaptive frequency filter ``G = Linear(StarReLU(Linear(.)))`` (Eq. 4).

    The two linear layers act on the channel axis at every frequency; real and imaginary parts are stacked as
    ``2C`` real inputs and the output is read back as ``C`` complex filter values, so the filter adapts to the
    spectrum it is applied to. A LayerNorm over those ``2C`` inputs comes first: the quadratic StarReLU would
    otherwise blow up on the low-frequency coefficients, whose size grows with the image side under the
    orthonormal FFT (an implementation choice; the paper gives no normalisation). The last layer starts near
    ``1 + 0j`` (small weights, unit real bias), so SFPM-f starts close to the identity and learns which
    frequencies to enhance.

    Shapes: complex ``(B, C, H, W_f) -> (B, C, H, W_f)`` complex filter.
    """

    def __init__(self, channels: int, hidden_ratio: float = 0.5) -> None:
        super().__init__()
        hidden = max(8, round(2 * channels * hidden_ratio))
        self.norm = LayerNorm2d(2 * channels)
        self.fc1 = nn.Conv2d(2 * channels, hidden, 1)
        self.act = StarReLU()
        self.fc2 = nn.Conv2d(hidden, 2 * channels, 1)
        nn.init.trunc_normal_(self.fc2.weight, std=0.02)
        with torch.no_grad():
            self.fc2.bias.zero_()
            self.fc2.bias[:channels] = 1.0

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        stacked = torch.cat([spectrum.real, spectrum.imag], dim=1)
        real, imag = self.fc2(self.act(self.fc1(self.norm(stacked)))).chunk(2, dim=1)
        return torch.complex(real, imag)


class SpatialFrequencyPerceptionF(nn.Module):
    """SFPM-f: adaptive frequency-domain enhancement of a skip connection (TexLiverNet Eq. 5).

    ``I_s = Conv1x1(MaxPool3x3(x))`` (stride 1, so the grid is kept) is the smoothed skip feature; the coarse
    high frequency is ``H_s = x - I_s``; the output is ``H = iFFT(G(FFT(H_s)) * FFT(H_s)) + I_s``. With ``G = 1``
    the module returns ``x`` unchanged. The FFTs run in float32 also under autocast.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, hidden_ratio: float = 0.5) -> None:
        super().__init__()
        self.project = nn.Conv2d(channels, channels, 1)
        self.filter = AdaptiveFrequencyFilter(channels, hidden_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        smooth = self.project(max_filter3x3(x))
        high = x - smooth
        with torch.autocast(device_type=x.device.type, enabled=False):
            high = high.float()
            spectrum = torch.fft.rfft2(high, norm="ortho")
            enhanced = torch.fft.irfft2(self.filter(spectrum) * spectrum, s=high.shape[-2:], norm="ortho")
        return enhanced.to(x.dtype) + smooth
