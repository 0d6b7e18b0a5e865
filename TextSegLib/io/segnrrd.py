"""Masks as segments in ``.seg.nrrd`` files: names, colours, terminology and TextSeg's segment tags.

Every segment TextSeg makes records where it came from in segment tags (the same keys in a ``.seg.nrrd`` file and
in a Slicer segmentation node, see :mod:`TextSegLib.app.mrml`)::

    TextSeg.Prompt            the prompt, as encoded
    TextSeg.Model             the model id (ids joined by "+" for an ensemble)
    TextSeg.CheckpointSHA256  SHA-256 of each checkpoint file (joined by ",")
    TextSeg.Version           TextSeg's version
    TextSeg.Found             whether the target was found, with the evidence ("not found (maximum probability ...)")

Slicer stores tags as ``key:value|``; a ``|`` inside a value is written as ``%7C`` (and ``%`` as ``%25``) so a
prompt survives the round trip. Slicer writes tag values as they are, so segments in nodes hold the encoded values
too. Each segment also gets the standard terminology of what its prompt names (:mod:`TextSegLib.io.terminology`).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from TextSegLib import __version__
from TextSegLib.core.errors import TextSegTypeError, TextSegValueError
from TextSegLib.core.files import atomic_write
from TextSegLib.core.messages import first_line
from TextSegLib.io.terminology import terminology_for_prompt
from TextSegLib.io.volumes import Volume, VolumeError, check_volume

if TYPE_CHECKING:

    from TextSegLib.core.results import SegmentationResult

__all__ = [
    "TAG_CHECKPOINT",
    "TAG_FOUND",
    "TAG_MODEL",
    "TAG_PROMPT",
    "TAG_VERSION",
    "SegmentSpec",
    "decode_tag",
    "encode_tag",
    "read_seg_nrrd",
    "segment_for_result",
    "write_seg_nrrd",
]

TAG_PROMPT = "TextSeg.Prompt"
TAG_MODEL = "TextSeg.Model"
TAG_CHECKPOINT = "TextSeg.CheckpointSHA256"
TAG_VERSION = "TextSeg.Version"
TAG_FOUND = "TextSeg.Found"


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
    """One segment to write: a ``(K, J, I)`` mask on the reference volume's grid and its metadata.

    ``terminology`` is a Slicer ``TerminologyEntry`` string (see :mod:`TextSegLib.io.terminology`); empty for none.
    """

    mask: np.ndarray
    name: str
    color: tuple[float, float, float]
    tags: dict[str, str] = field(default_factory=dict)
    terminology: str = ""


def segment_for_result(result: SegmentationResult, name: str | None = None, index: int = 0) -> SegmentSpec:
    """Segment metadata for an engine result: name (default: the prompt), provenance tags, the terminology of what
    the prompt names, and its colour (the terminology's for an organ, else palette colour ``index``)."""
    tags = {
        TAG_PROMPT: result.prompt,
        TAG_MODEL: "+".join(info.id for info in result.models),
        TAG_CHECKPOINT: ",".join(info.sha256 or "" for info in result.models),
        TAG_VERSION: __version__,
        TAG_FOUND: result.presence,
    }
    entry = terminology_for_prompt(result.prompt)
    color = entry.color or PALETTE[index % len(PALETTE)]
    return SegmentSpec(result.mask, name or result.prompt, color, tags, entry.to_slicer())


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TextSegTypeError(f"The {what} must be a str, not {type(value).__name__}.")
    if not value.strip():
        raise TextSegValueError(f"The {what} is empty; give it a name.")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise TextSegValueError(f"The {what} {value!r} holds a line break or another control character; remove it.")
    return value


def write_seg_nrrd(path: str | os.PathLike[str], segments: Sequence[SegmentSpec], reference: Volume) -> None:
    """Write segments as a Slicer ``.seg.nrrd`` on the reference volume's grid (atomically).

    Overlapping segments go to separate layers, as Slicer stores them. Names and colours are marked as chosen (not
    auto-generated), and each segment's terminology goes into its ``TerminologyEntry`` tag. Names and tag values
    in any language are written as UTF-8 into the NRRD header, as Slicer does (its
    ``Libs/MRML/Core/vtkMRMLSegmentationStorageNode.cxx`` passes the segment's UTF-8 name and tags to the NRRD
    writer unchanged, and reads them back the same way); read such a file back with :func:`read_seg_nrrd`.
    """
    import slicerio

    check_volume(reference)
    segmentation = slicerio.create_segmentation(reference.size_ijk, reference.ijk_to_lps())
    # pynrrd, which slicerio writes with, only writes ASCII headers: other values go in as placeholders, replaced
    # by their UTF-8 bytes in the written header.
    token = uuid.uuid4().hex
    utf8: dict[str, str] = {}

    def ascii_field(value: str) -> str:
        if value.isascii():
            return value
        placeholder = f"TextSeg-UTF8-{token}-{len(utf8)}"
        utf8[placeholder] = value
        return placeholder

    for number, spec in enumerate(segments, start=1):
        name = _check_text(spec.name, "segment name")
        if spec.mask.shape != reference.array.shape:
            raise TextSegValueError(
                f"The segment {name!r} has shape {spec.mask.shape}, the volume {reference.array.shape}; make the "
                "mask on the volume's grid.")
        fields = {
            "id": f"Segment_{number}",
            "name": ascii_field(name),
            "color": [float(c) for c in spec.color],
            "nameAutoGenerated": False,
            "colorAutoGenerated": False,
            "tags": {key: ascii_field(encode_tag(_check_text(value, f"tag {key}")))
                     for key, value in spec.tags.items()},
        }
        if spec.terminology:
            fields["terminology"] = slicerio.segmentation.terminology_entry_from_string(spec.terminology)
        slicerio.add_segment(segmentation, np.transpose(spec.mask.astype(bool), (2, 1, 0)), fields)

    def write(temporary: str) -> None:
        slicerio.write_segmentation(temporary, segmentation)
        if utf8:
            _replace_in_header(temporary, utf8)

    atomic_write(path, write)


def _replace_in_header(path: str, replacements: dict[str, str]) -> None:
    """Replace ASCII placeholders in a NRRD file's header (up to the blank line before the data) by UTF-8 text."""
    data = Path(path).read_bytes()
    end = data.index(b"\n\n") + 2
    header = data[:end]
    for placeholder, value in replacements.items():
        header = header.replace(placeholder.encode("ascii"), value.encode("utf-8"))
    Path(path).write_bytes(header + data[end:])


def _header_fields(path: Path) -> dict[str, str]:
    """``key:=value`` fields of a NRRD header, decoded as UTF-8 (as Slicer writes them)."""
    fields = {}
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line.strip():
                break
            if ":=" in line and not line.startswith("#"):
                key, value = line.split(":=", 1)
                fields[key] = value.rstrip()
    return fields


def read_seg_nrrd(path: str | os.PathLike[str]) -> dict:
    """Read a ``.seg.nrrd`` with slicerio, with segment names and tags exactly as written in any language.

    slicerio reads NRRD headers through pynrrd, which decodes them as ASCII and drops every other character (a
    segment named "Läsion" comes back as "Lsion"). Slicer writes names and tags as UTF-8; this function takes
    them from the header as UTF-8 and otherwise returns slicerio's dictionary unchanged (``"segments"``: a list
    of dicts with ``"name"``, ``"tags"``, ``"terminology"``, ...). Raises :class:`VolumeError` for a file that
    is not a readable segmentation.
    """
    import slicerio

    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"File not found: {str(path)!r}.")
    try:
        segmentation = slicerio.read_segmentation(str(path))
        fields = _header_fields(path)
    except Exception as error:  # pynrrd and slicerio raise many kinds of errors for damaged files
        raise VolumeError(f"Cannot read the segmentation {str(path)!r}: {first_line(error)}") from error
    indices = sorted({int(m.group(1)) for key in fields if (m := re.match(r"^Segment([0-9]+)_", key))})
    for index, segment in zip(indices, segmentation.get("segments", []), strict=False):
        if f"Segment{index}_Name" in fields:
            segment["name"] = fields[f"Segment{index}_Name"]
        if f"Segment{index}_Tags" not in fields:
            continue
        tags = {}
        for item in fields[f"Segment{index}_Tags"].split("|"):
            key, _, value = item.strip().partition(":")
            if key == "TerminologyEntry":
                segment["terminology"] = slicerio.segmentation.terminology_entry_from_string(value)
            elif key == "Segmentation.Status":
                segment["status"] = value
            elif key:
                tags[key] = value
        if tags:
            segment["tags"] = tags
    return segmentation
