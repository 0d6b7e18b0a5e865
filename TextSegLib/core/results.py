"""What a segmentation run produces, and how it is stopped: light types shared by the engine and its clients.

This module needs only NumPy, so the processes that never run a network (3D Slicer's own process talking to the
worker, ``textseg segment --server``) can hold results without importing torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = [
    "MIN_FOUND_ML",
    "CancelToken",
    "ModelIdentity",
    "ModelRecord",
    "SegmentationResult",
]

#: The smallest mask, in mL, that counts as a finding. Below it (a few stray voxels above the threshold) a result
#: says "not found". 0.05 mL is under the smallest lesion in ``../shared/data/pyradiomics`` (breast1, 0.13 mL).
MIN_FOUND_ML = 0.05


class CancelToken:
    """Set from any thread to stop a run between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class ModelIdentity(Protocol):
    """What a result records of each model: its catalogue id and the SHA-256 of its checkpoint file."""

    @property
    def id(self) -> str: ...

    sha256: str | None


@dataclass(frozen=True)
class ModelRecord:
    """A model as a result received from a worker names it (the worker's checkpoint, not a local file)."""

    id: str
    sha256: str | None
    name: str = ""
    architecture: str = ""


@dataclass
class SegmentationResult:
    """What one prompt produced on one volume.

    Attributes:
        mask: ``(K, J, I)`` uint8, 1 inside, on the input volume's grid.
        probability: ``(K, J, I)`` float32 in ``[0, 1]`` (mean over the ensemble) or None if not asked for.
        prompt: the prompt as encoded (white space normalised).
        models: the checkpoints used (``CheckpointInfo`` in process, :class:`ModelRecord` from a worker).
        threshold: probability above which a voxel is inside.
        seconds: wall time of the run.
        modality: "CT" or "MR", as the run treated the volume.
        notes: warnings for the user (for example a fall-back from the GPU to the CPU).
        device: where the networks ran ("cpu", "cuda", ...), "" when unknown.
        max_probability: the highest voxel probability in the volume (NaN when unknown): the evidence for
            :attr:`found`.
        voxel_ml: the volume of one voxel in mL (NaN when unknown).
    """

    mask: np.ndarray
    probability: np.ndarray | None
    prompt: str
    models: list[ModelIdentity]
    threshold: float
    seconds: float
    modality: str = ""
    notes: list[str] = field(default_factory=list)
    device: str = ""
    max_probability: float = float("nan")
    voxel_ml: float = float("nan")

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def empty(self) -> bool:
        return self.voxel_count == 0

    @property
    def volume_ml(self) -> float:
        return self.voxel_count * self.voxel_ml

    @property
    def found(self) -> bool:
        """Whether the prompt's target was found: the mask holds at least :data:`MIN_FOUND_ML` (any voxel when the
        voxel size is unknown)."""
        if self.voxel_ml != self.voxel_ml:  # NaN: unknown voxel size
            return not self.empty
        return self.volume_ml >= MIN_FOUND_ML

    @property
    def evidence(self) -> str:
        """What :attr:`found` rests on, e.g. ``"maximum probability 0.31, threshold 0.50"``."""
        evidence = f"maximum probability {self.max_probability:.2f}, threshold {self.threshold:.2f}"
        if not self.found and not self.empty:
            evidence += f"; {self.volume_ml:.3f} mL above the threshold, under the {MIN_FOUND_ML} mL of a finding"
        return evidence

    @property
    def presence(self) -> str:
        """One line saying whether the target was found and on what evidence, e.g. ``"not found (maximum
        probability 0.31, threshold 0.50)"``."""
        return f"{'found' if self.found else 'not found'} ({self.evidence})"
