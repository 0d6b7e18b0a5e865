"""What a segmentation run produces, and how it is stopped: light types shared by the engine and its clients.

This module needs only NumPy, so the processes that never run a network (3D Slicer's own process talking to the
worker, ``textseg segment --server``) can hold results without importing torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["CancelToken", "ModelIdentity", "ModelRecord", "SegmentationResult"]


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

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def empty(self) -> bool:
        return self.voxel_count == 0
