"""Intensity normalisation and resizing of slices, per model, as stored in its checkpoint.

The same functions prepare slices for inference (:mod:`TextSegLib.engine.inference`) and for training
(``Training/``), so a network always sees inputs made the way it was trained on.

Checkpoint metadata (``"preprocessing"``)::

    {"size": [256, 256],
     "intensity": {"CT": {"kind": "window", "low": -200, "high": 200},
                   "MR": {"kind": "percentile", "low": 0.5, "high": 99.5}}}

Intensity kinds, chosen per modality:

* ``window``: clip to ``[low, high]`` (Hounsfield units for CT) and scale to ``[0, 1]``.
* ``minmax``: the volume's minimum and maximum play the window (exact, over every voxel).
* ``percentile``: the volume's ``low`` and ``high`` percentiles play the window (for MR, whose scale is arbitrary).
* ``zscore``: subtract the volume's mean and divide by its standard deviation (no clipping).

Volume statistics are computed once per volume from a strided sample (exact for volumes up to about 4 million
voxels), never per slice, so every slice of a volume is normalised alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from TextSegLib.core.options import MODALITIES

__all__ = [
    "IntensityMapping",
    "IntensitySpec",
    "Preprocessing",
    "resample",
]

_KINDS = ("window", "minmax", "percentile", "zscore")
_SAMPLE = 4_000_000


@dataclass(frozen=True)
class IntensitySpec:
    """How one modality's intensities are normalised (see the module docstring)."""

    kind: str
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown intensity normalisation {self.kind!r}; use one of {', '.join(_KINDS)}")
        if self.kind in ("window", "percentile") and not self.low < self.high:
            raise ValueError(f"intensity {self.kind} needs low < high, got {self.low} and {self.high}")

    @property
    def output_range(self) -> tuple[float, float] | None:
        """The range normalised intensities lie in: ``(0, 1)`` for the clipped kinds, None for ``zscore``."""
        return None if self.kind == "zscore" else (0.0, 1.0)

    def mapping(self, array: np.ndarray) -> IntensityMapping:
        """The affine map (and clipping) that normalises this volume."""
        if self.kind == "window":
            low, high = self.low, self.high
        elif self.kind == "minmax":
            low, high = float(array.min()), float(array.max())
            if high <= low:
                high = low + 1.0
        else:
            flat = array.reshape(-1)
            sample = flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64)
            if self.kind == "zscore":
                std = float(sample.std())
                return IntensityMapping(scale=1.0 / max(std, 1e-6), offset=-float(sample.mean()), clip=None)
            low, high = (float(v) for v in np.percentile(sample, [self.low, self.high]))
            if high <= low:
                high = low + 1.0
        return IntensityMapping(scale=1.0 / (high - low), offset=-low, clip=(0.0, 1.0))


@dataclass(frozen=True)
class IntensityMapping:
    """``y = (x + offset) * scale``, then optionally clipped."""

    scale: float
    offset: float
    clip: tuple[float, float] | None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = (x + self.offset) * self.scale
        return y.clamp(*self.clip) if self.clip is not None else y


@dataclass(frozen=True)
class Preprocessing:
    """A model's input preparation: intensity per modality, input size, channel count."""

    size: tuple[int, int]
    intensity: Mapping[str, IntensitySpec]
    channels: int = 1

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any], channels: int = 1) -> Preprocessing:
        intensity = {modality: IntensitySpec(**spec) for modality, spec in data["intensity"].items()}
        if not intensity:
            raise ValueError("preprocessing metadata names no intensity normalisation")
        size = tuple(int(s) for s in data["size"])
        return cls(size=size, intensity=intensity, channels=channels)

    @property
    def takes_volumes(self) -> bool:
        """Whether the model was trained on CT or MR volumes: its normalisations name CT or MR. A model trained on
        2D pictures only (MoNuSeg's H&E tiles: ``{"RGB": ...}``) names neither and is refused volumes."""
        return any(key.upper() in MODALITIES for key in self.intensity)

    def intensity_for(self, modality: str | None) -> IntensitySpec:
        """The normalisation for ``modality`` (``"CT"``, ``"MR"``); the first one listed if it has none."""
        if modality is not None:
            for key, spec in self.intensity.items():
                if key.upper() == modality.upper():
                    return spec
        return next(iter(self.intensity.values()))

    def check_range(self, input_range: tuple[float, float], network: str) -> None:
        """Raise ValueError naming every modality whose normalisation can leave ``input_range`` (the range a
        pretrained tower of ``network`` was trained on)."""
        low, high = input_range
        outside = [modality for modality, spec in self.intensity.items()
                   if spec.output_range is None or not low <= spec.output_range[0] <= spec.output_range[1] <= high]
        if outside:
            raise ValueError(
                f"{network} takes intensities in [{low:g}, {high:g}] (its pretrained tower's input range), but the "
                f"normalisation of {', '.join(outside)} ({', '.join(self.intensity[m].kind for m in outside)}) "
                "leaves it: use a window, minmax or percentile normalisation for every modality."
            )

    def prepare(self, slices: torch.Tensor, mapping: IntensityMapping) -> torch.Tensor:
        """Normalise and resize a batch of slices or 2D images on their device.

        Shapes: ``(B, H0, W0)`` raw intensities, or ``(B, C0, H0, W0)`` channels first (``C0 = 3`` for an RGB
        picture) -> ``(B, channels, H, W)`` float32 network input (bilinear, antialiased when shrinking). A single
        channel is repeated when the model wants more; colour reaches a one-channel model as the mean of its
        channels; any other mismatch raises ``ValueError``.
        """
        x = slices.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = mapping.apply(x)
        given = x.shape[1]
        if given != self.channels and given != 1:
            if self.channels != 1:
                raise ValueError(f"this model takes {self.channels}-channel images, not {given} channels")
            x = x.mean(dim=1, keepdim=True)
        x = resample(x, self.size)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return x


def resample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H0, W0)`` float images to ``(B, C, H, W)``: bilinear, antialiased when shrinking (as every model's
    input is made); the same tensor when the size is already ``size``."""
    size = tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    shrinking = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
