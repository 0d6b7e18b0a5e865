"""Masks as segments: names, colours and tags, written as ``.seg.nrrd`` files.

Every segment TextSeg makes records where it came from in segment tags (the same keys in a ``.seg.nrrd`` file and
in a Slicer segmentation node)::

    TextSeg.Prompt            the prompt, as encoded
    TextSeg.Model             the model id (ids joined by "+" for an ensemble)
    TextSeg.CheckpointSHA256  SHA-256 of each checkpoint file (joined by ",")
    TextSeg.Version           TextSeg's version

Slicer stores tags as ``key:value|``; a ``|`` inside a value is written as ``%7C`` (and ``%`` as ``%25``) so a
prompt survives the round trip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .volumes import Volume, atomic_write

__all__ = [
    "TAG_CHECKPOINT",
    "TAG_MODEL",
    "TAG_PROMPT",
    "TAG_VERSION",
    "SegmentSpec",
    "decode_tag",
    "encode_tag",
    "segment_for_result",
    "write_seg_nrrd",
]

TAG_PROMPT = "TextSeg.Prompt"
TAG_MODEL = "TextSeg.Model"
TAG_CHECKPOINT = "TextSeg.CheckpointSHA256"
TAG_VERSION = "TextSeg.Version"

# Distinct, saturated colours that read well over grey CT/MR (RGB in 0..1); used in prompt order.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.95, 0.35, 0.20),
    (0.25, 0.75, 0.35),
    (0.25, 0.55, 0.95),
    (0.95, 0.80, 0.20),
    (0.80, 0.35, 0.85),
    (0.20, 0.85, 0.85),
    (0.95, 0.55, 0.70),
    (0.60, 0.45, 0.25),
)


def encode_tag(value: str) -> str:
    """Make a tag value safe for Slicer's ``key:value|`` serialisation."""
    return value.replace("%", "%25").replace("|", "%7C")


def decode_tag(value: str) -> str:
    """Inverse of :func:`encode_tag`."""
    return value.replace("%7C", "|").replace("%25", "%")


@dataclass
class SegmentSpec:
    """One segment to write: a ``(K, J, I)`` mask on the reference volume's grid and its metadata."""

    mask: np.ndarray
    name: str
    color: tuple[float, float, float]
    tags: dict[str, str] = field(default_factory=dict)


def segment_for_result(result, name: str | None = None, index: int = 0) -> SegmentSpec:
    """Segment metadata for an engine result: name (default: the prompt), palette colour, provenance tags."""
    tags = {
        TAG_PROMPT: result.prompt,
        TAG_MODEL: "+".join(info.id for info in result.models),
        TAG_CHECKPOINT: ",".join(info.sha256 or "" for info in result.models),
        TAG_VERSION: __version__,
    }
    return SegmentSpec(result.mask, name or result.prompt, PALETTE[index % len(PALETTE)], tags)


def write_seg_nrrd(path: str | os.PathLike[str], segments: Sequence[SegmentSpec], reference: Volume) -> None:
    """Write segments as a Slicer ``.seg.nrrd`` on the reference volume's grid (atomically).

    Overlapping segments go to separate layers, as Slicer stores them.
    """
    import slicerio

    segmentation = slicerio.create_segmentation(reference.size_ijk, reference.ijk_to_lps())
    for number, spec in enumerate(segments, start=1):
        if spec.mask.shape != reference.array.shape:
            raise ValueError(f"segment {spec.name!r} has shape {spec.mask.shape}, the volume {reference.array.shape}")
        slicerio.add_segment(
            segmentation,
            np.transpose(spec.mask.astype(bool), (2, 1, 0)),
            {
                "id": f"Segment_{number}",
                "name": spec.name,
                "color": [float(c) for c in spec.color],
                "tags": {key: encode_tag(value) for key, value in spec.tags.items()},
            },
        )
    atomic_write(path, lambda temporary: slicerio.write_segmentation(temporary, segmentation))
