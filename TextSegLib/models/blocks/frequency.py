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


def hermitian_irfft2(spectrum: torch.Tensor, size: tuple[int, int], norm: str = "ortho") -> torch.Tensor:
    """``irfft2`` of a half spectrum that a filter may have made non-Hermitian, with one meaning on every device.

    In an ``rfft2`` half spectrum ``(..., H, W // 2 + 1)`` the columns of frequency 0 and, for even ``W``, ``W / 2``
    hold both a frequency and its mirror, so they must satisfy ``X[h] = conj(X[-h])`` along ``H``. A filtered
    spectrum breaks that, and what ``irfft2`` then returns is left to the FFT library: PocketFFT (CPU) keeps the
    real part of the column's inverse transform, which is the same as using the column's Hermitian part
    ``(X[h] + conj(X[-h])) / 2``, while cuFFT differs. Projecting those columns onto their Hermitian part first
    gives the CPU's result everywhere (so trained checkpoints keep their function) and valid input for cuFFT.

    Shapes: complex ``(..., H, W // 2 + 1)`` -> real ``(..., H, W)`` with ``size = (H, W)``.
    """
    width = size[-1]
    edges = [0, width // 2] if width % 2 == 0 else [0]
    columns = []
    for index in edges:
        column = spectrum[..., index : index + 1]
        mirrored = torch.roll(torch.flip(column, dims=[-2]), shifts=1, dims=-2).conj()  # X[(H - h) mod H]
        columns.append((column + mirrored) / 2)
    middle = spectrum[..., 1 : width // 2] if width % 2 == 0 else spectrum[..., 1:]
    hermitian = torch.cat([columns[0], middle, *columns[1:]], dim=-1)
    return torch.fft.irfft2(hermitian, s=size, norm=norm)


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
    the module returns ``x`` unchanged. The FFTs run in float32 also under autocast; the inverse is
:func:`hermitian_irfft2`, so CPU and GPU agree.

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
            enhanced = hermitian_irfft2(self.filter(spectrum) * spectrum, high.shape[-2:])
        return enhanced.to(x.dtype) + smooth
