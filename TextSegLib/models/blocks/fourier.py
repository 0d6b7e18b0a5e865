"""Fourier spectra as network inputs and MMRDL's frequency prompt encoder Enc_P (Eq. 12-15).

The 2D DFT of every image channel (Eq. 12) is computed with the orthonormal FFT, so spectra do not grow with the
image side. Its amplitude ``|F|`` and phase ``arg(F)`` recombine to the image: ``ifft2(|F| exp(i arg F)) = f``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from TextSegLib.models.blocks.convs import LayerNorm2d

SPECTRA = ("phase", "amplitude", "both")


def amplitude_and_phase(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude ``|F_uv|`` and phase ``arg(F_uv)`` of the orthonormal 2D DFT of each channel (Eq. 12).

    Shapes: ``(B, C, H, W) -> ((B, C, H, W), (B, C, H, W))`` float32; the phase lies in ``(-pi, pi]``. The DFT
    is not shifted (index ``(0, 0)`` is the zero frequency, as in Eq. 12) and runs in float32 under autocast.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        spectrum = torch.fft.fft2(image.float(), norm="ortho")
        return spectrum.abs(), spectrum.angle()


def spectrum_features(image: torch.Tensor, kind: str = "phase") -> torch.Tensor:
    """The spectrum Enc_P reads, as real feature maps.

    ``"phase"``: ``arg(F) / pi`` (the paper's default, scaled to ``(-1, 1]``); ``"amplitude"``: ``log(1 + |F|)``
    (the logarithm tames the dynamic range of the zero frequency; the paper names no normalisation);
    ``"both"``: amplitude channels then phase channels.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, or ``(B, 2C, H, W)`` for ``"both"``.
    """
    if kind not in SPECTRA:
        raise ValueError(f"unknown spectrum {kind!r}; use one of {', '.join(SPECTRA)}")
    amplitude, phase = amplitude_and_phase(image)
    phase = phase / math.pi
    amplitude = torch.log1p(amplitude)
    if kind == "phase":
        return phase
    if kind == "amplitude":
        return amplitude
    return torch.cat([amplitude, phase], dim=1)


class FrequencyPromptEncoder(nn.Module):
    """Enc_P: the frequency prompt ``F_pha`` of an image from its phase (or amplitude) spectrum (Eq. 13-15).

    Enc_P1 is ``n`` stages ``Z^i = GELU(LN(Conv^i(Z^(i-1))))`` with 3x3 stride-2 convolutions (``Z^0`` is the
    spectrum); Enc_P2 is ``n`` stages ``F^i = GELU(LN(ConvT^i(.)))`` with 2x2 stride-2 transposed convolutions
    that mirror the widths back and end at ``out_channels``, so ``F_pha = F^n`` is on the image grid again.
    ``n = len(widths)`` (2 in the paper); LN is a LayerNorm over channels.

    Shapes: image ``(B, C_in, H, W)`` with ``H`` and ``W`` divisible by ``2 ** n`` -> ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: tuple[int, ...] = (16, 32),
                 spectrum: str = "phase") -> None:
        super().__init__()
        if spectrum not in SPECTRA:
            raise ValueError(f"unknown spectrum {spectrum!r}; use one of {', '.join(SPECTRA)}")
        if not widths:
            raise ValueError("the frequency prompt encoder needs at least one stage")
        self.spectrum = spectrum
        self.factor = 2 ** len(widths)
        previous = in_channels * (2 if spectrum == "both" else 1)
        down = []
        for width in widths:
            down += [nn.Conv2d(previous, width, 3, stride=2, padding=1), LayerNorm2d(width), nn.GELU()]
            previous = width
        up = []
        for width in (*reversed(widths[:-1]), out_channels):
            up += [nn.ConvTranspose2d(previous, width, 2, stride=2), LayerNorm2d(width), nn.GELU()]
            previous = width
        self.encode = nn.Sequential(*down)
        self.decode = nn.Sequential(*up)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2] % self.factor or image.shape[-1] % self.factor:
            raise ValueError(f"the frequency prompt encoder needs sides divisible by {self.factor}, "
                             f"got {tuple(image.shape[-2:])}")
        z = spectrum_features(image, self.spectrum).to(image.dtype)
        return self.decode(self.encode(z))
