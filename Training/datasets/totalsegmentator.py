"""Patient A of TotalSegmentator's test references at full length: CT, label map, label table and manifest.

    python -m Training.datasets totalsegmentator --source TotalSegmentator --output data/totalsegmentator-full

TotalSegmentator (``git clone https://github.com/wasserth/TotalSegmentator``, Apache-2.0; Wasserthal et al.,
"TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT Images", Radiology: AI 5(5), 2023) keeps
regression references in ``tests/reference_files/``. ``../shared/data/totalsegmentator/ct_a_*`` is its
``example_ct_sm.nii.gz``: 30 axial slices of patient A. The clone holds the whole scan, ``example_ct.nii.gz``
(122 x 101 x 112 at 3 mm, pelvis to lung bases), with one label map of that length,
``example_seg_fast_force_split.nii.gz``: the prediction of TotalSegmentator's ``total`` task (fast 3 mm model, the
volume split in three), a silver standard like the shared labels, not manual contours. ``example_ct_sm`` is slices
82 to 111 of it, with the affine of the whole scan left unchanged: the two do not agree in physical space, so
this converter never mixes them.

What is written, with the geometry of ``example_ct.nii.gz`` (both files are checked to share it):

* ``ct_a_full_image.nii.gz``: the CT in HU (int16);
* ``ct_a_full_labels.nii.gz``: the label map (uint8, TotalSegmentator's ``total`` values);
* ``ct_a_full_labels.csv``: ``value,structure,voxels`` for the values present, the names read from the clone's
  own class map (``totalsegmentator/map_to_binary.py``, ``class_map["total"]``, read as data, never imported);
* ``totalsegmentator_full.csv``: a manifest naming each structure of :data:`Training.structures.STRUCTURES`
  present by each of its trained phrasings (never by its held-out paraphrases), as ``Training/structures.py``
  writes the shared cases';
* ``shipped_full.csv``: the abdominal model's mix (``Training/manifests/shipped.csv``) with the whole scan in place
  of its 30 slices: patient A at full length, the shared MR and the five pyradiomics lesions, each lesion row
  written four times. What ``Training/configs/shipped-full.toml`` trains on. Patient B is in neither.
"""

from __future__ import annotations

import ast
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextSegLib.io.volumes import Volume, VolumeError, read_volume, write_image
from Training.structures import MANIFESTS, TsCase, write_manifest

__all__ = ["CLASS_MAP", "IMAGE", "LABELS", "FullLength", "class_names", "convert"]

IMAGE = "example_ct.nii.gz"
LABELS = "example_seg_fast_force_split.nii.gz"
#: The class map file of a TotalSegmentator clone, relative to its root.
CLASS_MAP = Path("totalsegmentator") / "map_to_binary.py"
CASE = "ct_a_full"
#: Largest gap between the two files' geometries, in mm (origin) and as a direction cosine.
TOLERANCE = 1e-3


@dataclass(frozen=True)
class FullLength:
    """What :func:`convert` wrote: the case (image, label map, table), its manifest and the abdominal mix."""

    case: TsCase
    manifest: Path
    mix: Path
    structures: dict[str, int]
    slices: int


def _root(source: Path) -> Path:
    """The clone's root, given the root or its ``tests/reference_files`` folder."""
    source = Path(source)
    for root in (source, source.parent.parent):
        if (root / "tests" / "reference_files" / IMAGE).is_file():
            return root
    raise VolumeError(f"{source} holds no tests/reference_files/{IMAGE}; give the root of a clone of "
                      "https://github.com/wasserth/TotalSegmentator.")


def class_names(path: Path, task: str = "total") -> dict[int, str]:
    """``label value -> structure name`` of ``task`` from a TotalSegmentator ``map_to_binary.py``, parsed as data."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError) as error:
        raise VolumeError(f"cannot read TotalSegmentator's class map {path}: {error}") from error
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == task:
                    try:
                        names = ast.literal_eval(value)
                    except ValueError as error:
                        raise VolumeError(f"the {task!r} class map in {path} is not a plain table: {error}") from error
                    if not isinstance(names, dict) or not all(isinstance(k, int) and isinstance(v, str)
                                                              for k, v in names.items()):
                        raise VolumeError(f"the {task!r} class map in {path} does not map label values to names")
                    return names
    raise VolumeError(f"{path} defines no class_map[{task!r}]; give a clone of "
                      "https://github.com/wasserth/TotalSegmentator.")


def _same_grid(image: Volume, labels: Volume) -> None:
    if (image.array.shape != labels.array.shape
            or not np.allclose(image.spacing, labels.spacing, atol=TOLERANCE)
            or not np.allclose(image.origin, labels.origin, atol=TOLERANCE)
            or not np.allclose(image.direction, labels.direction, atol=TOLERANCE)):
        raise VolumeError(f"{labels.source} (size {labels.size_ijk}, origin {np.round(labels.origin, 2)}) is not on "
                          f"the grid of {image.source} (size {image.size_ijk}, origin {np.round(image.origin, 2)})")


def convert(source: Path, output: Path) -> FullLength:
    """Convert patient A at full length from a TotalSegmentator clone ``source`` into ``output``."""
    root = _root(source)
    references = root / "tests" / "reference_files"
    names = class_names(root / CLASS_MAP)
    image = read_volume(references / IMAGE, modality="CT")
    labels = read_volume(references / LABELS)
    _same_grid(image, labels)
    values, counts = np.unique(labels.array, return_counts=True)
    present = {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise VolumeError(f"{labels.source} holds label values {unknown} that class_map['total'] does not name")
    if image.array.min() < -32768 or image.array.max() > 32767:
        raise VolumeError(f"{image.source} holds values outside int16; it is not a CT in HU")
    output.mkdir(parents=True, exist_ok=True)
    case = TsCase(CASE, output / f"{CASE}_image.nii.gz", output / f"{CASE}_labels.nii.gz",
                  output / f"{CASE}_labels.csv", "CT")
    write_image(case.image, image.array.astype(np.int16), image)
    write_image(case.label, labels.array.astype(np.uint8), image)
    with open(case.table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["value", "structure", "voxels"])
        writer.writerows([value, names[value], count] for value, count in sorted(present.items()))
    manifest = write_manifest(output / "totalsegmentator_full.csv", [case])
    mix = write_manifest(output / "shipped_full.csv", [case, "mr_a"], lesions=MANIFESTS / "pyradiomics.csv",
                         lesion_weight=4)
    return FullLength(case, manifest, mix, {names[v]: v for v in present}, image.array.shape[0])
