"""One-level 2D Haar wavelet transform and its inverse, batched on the tensor's device and differentiable.

For every 2 x 2 block ``[[a, b], [c, d]]`` of a channel (rows top to bottom, columns left to right)::

    LL = (a + b + c + d) / 2      approximation          pywt's cA
    LH = (a + b - c - d) / 2      horizontal detail      pywt's cH (top row minus bottom row)
    HL = (a - b + c - d) / 2      vertical detail        pywt's cV (left column minus right column)
    HH = (a - b - c + d) / 2      diagonal detail        pywt's cD

which is ``pywt.dwt2(x, "haar")`` (orthonormal filters ``[1, 1] / sqrt(2)`` and ``[1, -1] / sqrt(2)``). An odd
side is extended by repeating its last row or column first, as pywt's default ``"symmetric"`` mode does for the
two-tap Haar filters, so odd sizes match pywt too. The transform is orthonormal: :func:`haar_idwt2` inverts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "haar_dwt2",
    "haar_idwt2",
]


def haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    """One-level Haar DWT with the four sub-bands concatenated channel-wise.

    Shapes: ``(B, C, H, W) -> (B, 4C, ceil(H / 2), ceil(W / 2))``, channels ordered ``[LL, LH, HL, HH]`` (each a
    block of ``C`` channels in the input's channel order).
    """
    if x.dim() != 4:
        raise ValueError(f"haar_dwt2 takes (B, C, H, W) tensors, got shape {tuple(x.shape)}")
    pad_bottom, pad_right = x.shape[-2] % 2, x.shape[-1] % 2
    if pad_bottom or pad_right:
        x = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    top, bottom = a + b, c + d
    left_minus_right_top, left_minus_right_bottom = a - b, c - d
    low_low = (top + bottom) * 0.5
    low_high = (top - bottom) * 0.5
    high_low = (left_minus_right_top + left_minus_right_bottom) * 0.5
    high_high = (left_minus_right_top - left_minus_right_bottom) * 0.5
    return torch.cat([low_low, low_high, high_low, high_high], dim=1)


def haar_idwt2(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2` for even-sized images.

    Shapes: ``(B, 4C, h, w)`` with channels ``[LL, LH, HL, HH]`` -> ``(B, C, 2h, 2w)``. For an odd-sized original
    crop the result to the original size.
    """
    if coefficients.dim() != 4 or coefficients.shape[1] % 4:
        raise ValueError(f"haar_idwt2 takes (B, 4C, h, w) coefficients, got shape {tuple(coefficients.shape)}")
    low_low, low_high, high_low, high_high = coefficients.chunk(4, dim=1)
    a = (low_low + low_high + high_low + high_high) * 0.5
    b = (low_low + low_high - high_low - high_high) * 0.5
    c = (low_low - low_high + high_low - high_high) * 0.5
    d = (low_low - low_high - high_low + high_high) * 0.5
    batch, channels, height, width = a.shape
    rows = torch.stack((torch.stack((a, b), dim=-1), torch.stack((c, d), dim=-1)), dim=-3)  # (B, C, h, 2, w, 2)
    return rows.reshape(batch, channels, 2 * height, 2 * width)
