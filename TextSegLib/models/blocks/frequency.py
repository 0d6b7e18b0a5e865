"""Frequency-domain blocks: StarReLU, TexLiverNet's adaptive frequency filter G and SFPM-f (Eq. 4-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.models.blocks.convs import LayerNorm2d

__all__ = [
    "AdaptiveFrequencyFilter",
    "PositionalFrequencyBranch",
    "PositionalFrequencyFilter",
    "SpatialFrequencyPerceptionF",
    "StarReLU",
]


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


def hermitian_irfft2(spectrum: torch.Tensor, size: tuple[int, int], norm: str = "ortho", *,
                     overwrite: bool = False) -> torch.Tensor:
    """``irfft2`` of a half spectrum that a filter may have made non-Hermitian, with one meaning on every device.

    In an ``rfft2`` half spectrum ``(..., H, W // 2 + 1)`` the columns of frequency 0 and, for even ``W``, ``W / 2``
    hold both a frequency and its mirror, so they must satisfy ``X[h] = conj(X[-h])`` along ``H``. A filtered
    spectrum breaks that, and what ``irfft2`` then returns is left to the FFT library: PyTorch's CPU FFT keeps the
    real part of the column's inverse transform, which is the same as using the column's Hermitian part
    ``(X[h] + conj(X[-h])) / 2``, while cuFFT differs. Projecting those columns onto their Hermitian part first
    gives the CPU's result everywhere (so trained checkpoints keep their function) and valid input for cuFFT.

    With ``overwrite=True`` the edge columns of ``spectrum`` itself are projected, which spares a copy of the whole
    spectrum when it is a temporary.

    Shapes: complex ``(..., H, W // 2 + 1)`` -> real ``(..., H, W)`` with ``size = (H, W)``.
    """
    if not overwrite:
        spectrum = spectrum.clone()
    width = size[-1]
    for index in [0, width // 2] if width % 2 == 0 else [0]:
        column = spectrum[..., index : index + 1]
        mirrored = torch.roll(torch.flip(column, dims=[-2]), shifts=1, dims=-2).conj()  # X[(H - h) mod H]
        spectrum[..., index : index + 1] = (column + mirrored) / 2
    return torch.fft.irfft2(spectrum, s=size, norm=norm)


class AdaptiveFrequencyFilter(nn.Module):
    """TexLiverNet's adaptive frequency filter ``G = Linear(StarReLU(Linear(.)))`` (Eq. 4).

    The two linear layers act on the channel axis at every frequency; real and imaginary parts are stacked as
    ``2C`` real inputs and the output is read back as ``C`` complex filter values, so the filter adapts to the
    spectrum it is applied to. A LayerNorm over those ``2C`` inputs comes first: the quadratic StarReLU would
    otherwise blow up on the low-frequency coefficients, whose size grows with the image side under the
    orthonormal FFT (an implementation choice; the paper gives no normalisation). The last layer starts near
    ``1 + 0j`` (small weights, unit real bias), so SFPM-f starts close to the identity and learns which
    frequencies to enhance.

    The ``2C`` inputs are laid out channels-last (one copy out of the complex spectrum), where the LayerNorm and
    the two 1x1 convolutions need no further copies, and the filter is handed back as a contiguous complex tensor
    (one more copy), ready to multiply the spectrum.

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
        batch, channels, height, width = spectrum.shape
        # (B, C, H, W_f, 2) -> (B, H, W_f, 2, C) in memory, seen as (B, 2C, H, W_f): real parts first, then imaginary
        pairs = torch.view_as_real(spectrum).permute(0, 2, 3, 4, 1).reshape(batch, height, width, 2 * channels)
        filtered = self.fc2(self.act(self.fc1(self.norm(pairs.permute(0, 3, 1, 2)))))
        pairs = filtered.permute(0, 2, 3, 1).reshape(batch, height, width, 2, channels)
        return torch.view_as_complex(pairs.permute(0, 4, 1, 2, 3).contiguous())


class SpatialFrequencyPerceptionF(nn.Module):
    """SFPM-f: adaptive frequency-domain enhancement of a skip connection (TexLiverNet Eq. 5).

    ``I_s = Conv1x1(MaxPool3x3(x))`` (stride 1, so the grid is kept) is the smoothed skip feature; the coarse
    high frequency is ``H_s = x - I_s``; the output is ``H = iFFT(G(FFT(H_s)) * FFT(H_s)) + I_s``. With ``G = 1``
    the module returns ``x`` unchanged. The FFTs and the filter run in float32 also under autocast, on a contiguous
    ``(B, C, H, W)`` copy of ``H_s`` whatever the memory format of ``x`` (the FFT wants each plane contiguous); the
    inverse is :func:`hermitian_irfft2`, so CPU and GPU agree. The output keeps the memory format of
    ``I_s``.

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
            high = high.contiguous().float()  # the layout change in the narrower dtype: half the bytes moved
            spectrum = torch.fft.rfft2(high, norm="ortho")
            enhanced = hermitian_irfft2(self.filter(spectrum) * spectrum, high.shape[-2:], overwrite=True)
        return smooth + enhanced.to(x.dtype)


class PositionalFrequencyFilter(nn.Module):
    """The filter G of TexLiverNet's public code: ``K`` learnable complex filters with one value per frequency
    position, mixed for each channel by weights computed from the global mean of the features.

    ``r = softmax_K(Linear(StarReLU(Linear(mean_hw(x)))))`` gives ``(B, K, M)`` mixing weights (the two linear
    layers without bias, hidden width ``route_ratio * C``); the filter is ``G[b, m] = sum_k r[b, k, m] W_k``. Unlike
    :class:`AdaptiveFrequencyFilter`, G can treat each frequency differently wherever the spectrum's values fall
    (its response is tied to the frequency position) and it adapts to the image only through ``r``. ``W_k`` lives on
    the ``(size, size // 2 + 1)`` half spectrum of a ``size x size`` map (initialised ``N(0, 0.02^2)`` in both real
    and imaginary parts); other grids get it resized bilinearly (real and imaginary parts).

    Shapes: features ``(B, C, H, W)`` and a complex half spectrum ``(B, M, H, W // 2 + 1)`` -> complex filter
    ``(B, M, H, W // 2 + 1)``.
    """

    def __init__(self, channels: int, spectrum_channels: int, size: int, filters: int = 4,
                 route_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(channels * route_ratio))
        self.filters, self.spectrum_channels = filters, spectrum_channels
        self.route = nn.Sequential(nn.Linear(channels, hidden, bias=False), StarReLU(1.0, 0.0),
                                   nn.Linear(hidden, filters * spectrum_channels, bias=False))
        self.weights = nn.Parameter(0.02 * torch.randn(filters, size, size // 2 + 1, 2))

    def forward(self, x: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
        routing = self.route(x.mean(dim=(2, 3)).float()).view(-1, self.filters, self.spectrum_channels).softmax(1)
        weights = self.weights.float()
        if weights.shape[1:3] != spectrum.shape[-2:]:
            weights = F.interpolate(weights.permute(0, 3, 1, 2), size=spectrum.shape[-2:], mode="bilinear",
                                    align_corners=False).permute(0, 2, 3, 1)
        real, imag = weights.unbind(-1)  # (K, H, W_f) each
        return torch.complex(torch.einsum("bkm,khw->bmhw", routing, real.contiguous()),
                             torch.einsum("bkm,khw->bmhw", routing, imag.contiguous()))


class PositionalFrequencyBranch(nn.Module):
    """SFPM-f as TexLiverNet's public code builds it (there it is added to a skip as ``x + 0.01 f(x)``, see
    :class:`~TextSegLib.models.blocks.convs.ScaledResidual`):
    ``f(x) = W_2 iFFT(G(x) * FFT(StarReLU(W_1 x)))`` with 1x1 convolutions ``W_1`` (``C -> expansion * C``) and
    ``W_2`` (back to ``C``), both without bias, and G the :class:`PositionalFrequencyFilter`. It has no max-pooled
    smooth part ``I_s`` (Eq. 5): the whole feature is filtered. The FFTs and the filter run in float32 also under
    autocast; the inverse is :func:`hermitian_irfft2`, so CPU and GPU agree.

    Shapes: ``(B, C, size, size) -> (B, C, size, size)`` (other sides work, with G resized).
    """

    def __init__(self, channels: int, size: int, expansion: int = 2, filters: int = 4) -> None:
        super().__init__()
        inner = expansion * channels
        self.expand = nn.Conv2d(channels, inner, 1, bias=False)
        self.act = StarReLU(1.0, 0.0)
        self.filter = PositionalFrequencyFilter(channels, inner, size, filters)
        self.project = nn.Conv2d(inner, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.expand(x))
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = y.float()
            spectrum = torch.fft.rfft2(y, norm="ortho")
            y = hermitian_irfft2(self.filter(x, spectrum) * spectrum, y.shape[-2:], overwrite=True)
        return self.project(y.to(x.dtype))
