"""Dataset manifests: which volumes, which labels, which text, which split.

A manifest is a CSV or JSON Lines file, one row per text-described target::

    case,image,label,text,split,modality,label_value,slice
    lung2,lung2_image.nrrd,lung2_label.nrrd,a large soft-tissue mass in the posterior left lower lung,,CT,,

* ``image`` (or ``volume``) and ``label`` (or ``mask``): files or DICOM folders, relative to the manifest's folder.
* ``text`` (or ``prompt``): the description of the target.
* ``case`` (or ``patient``): the patient; rows of one patient are one case (default: the image file's name).
  Train/validation splits are always made per case, never per slice.
* ``split`` (optional): ``train`` or ``val``; cases without it are split at random (seeded, 8:2 by default).
* ``modality`` (optional): ``CT`` or ``MR``; guessed from the intensities otherwise.
* ``label_value`` (optional): per-lesion text: the target is ``label == label_value`` rather than every nonzero
  voxel; several rows of one case can describe several lesions.
* ``slice`` (optional): per-slice text: the row's text replaces the case's text on that slice (index along the
  volume file's k axis).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import TextSegError

__all__ = ["ManifestCase", "ManifestError", "Target", "read_manifest", "split_cases"]

_ALIASES = {"volume": "image", "mask": "label", "prompt": "text", "patient": "case"}


class ManifestError(TextSegError, ValueError):
    """A manifest that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Target:
    """One text-described target of a case."""

    text: str
    label_value: int | None = None
    slice_index: int | None = None


@dataclass
class ManifestCase:
    """All rows of one patient."""

    case: str
    image: Path
    label: Path | None
    targets: list[Target] = field(default_factory=list)
    split: str | None = None
    modality: str | None = None

    @property
    def case_targets(self) -> list[Target]:
        """Targets that apply to every slice (the case's own text, one per lesion value)."""
        return [t for t in self.targets if t.slice_index is None]

    def slice_texts(self) -> dict[tuple[int | None, int], str]:
        """Per-slice texts keyed by (label value, slice index)."""
        return {(t.label_value, t.slice_index): t.text for t in self.targets if t.slice_index is not None}


def _rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield number, {k: "" if v is None else str(v) for k, v in json.loads(line).items()}
                    except json.JSONDecodeError as error:
                        raise ManifestError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
        return
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield number, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}


def _optional_int(value: str, what: str, where: str) -> int | None:
    if value == "":
        return None
    try:
        return int(float(value))
    except ValueError:
        raise ManifestError(f"{where}: {what} must be a whole number, got {value!r}") from None


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestCase]:
    """Read a CSV or JSONL manifest into cases (rows grouped by ``case``), in first-appearance order."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Manifest not found: {str(path)!r}")
    cases: dict[str, ManifestCase] = {}
    for number, raw in _rows(path):
        row = {_ALIASES.get(k, k): v for k, v in raw.items()}
        where = f"{path.name}, row {number}"
        if not row.get("image"):
            raise ManifestError(f"{where}: no image (columns: image, label, text, ...)")
        image = (path.parent / row["image"]).resolve()
        label = (path.parent / row["label"]).resolve() if row.get("label") else None
        case_id = row.get("case") or image.name.split(".")[0]
        text = " ".join(row.get("text", "").split())
        split = row.get("split", "").lower() or None
        if split not in (None, "train", "val"):
            raise ManifestError(f"{where}: split must be 'train' or 'val', got {split!r}")
        case = cases.get(case_id)
        if case is None:
            case = cases[case_id] = ManifestCase(case_id, image, label, split=split,
                                                 modality=row.get("modality", "").upper() or None)
        elif case.image != image or case.label != label:
            raise ManifestError(f"{where}: case {case_id!r} appears with another image or label")
        elif split and case.split and split != case.split:
            raise ManifestError(f"{where}: case {case_id!r} is in both splits")
        case.split = case.split or split
        if text:
            case.targets.append(Target(text, _optional_int(row.get("label_value", ""), "label_value", where),
                                       _optional_int(row.get("slice", ""), "slice", where)))
    for case in cases.values():
        if not case.case_targets and case.label is not None:
            raise ManifestError(f"{path.name}: case {case.case!r} has no text for its label")
    return list(cases.values())


def split_cases(
    cases: Sequence[ManifestCase], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[ManifestCase], list[ManifestCase]]:
    """Patient-level train/validation split.

    Cases with an explicit ``split`` keep it; the others are shuffled with ``seed`` and ``round(val_fraction * n)``
    of them (at least one when there are two or more and ``val_fraction > 0``) go to validation.
    """
    fixed_train = [c for c in cases if c.split == "train"]
    fixed_val = [c for c in cases if c.split == "val"]
    free = sorted((c for c in cases if c.split is None), key=lambda c: c.case)
    random.Random(seed).shuffle(free)
    count = round(val_fraction * len(free))
    if val_fraction > 0 and count == 0 and len(free) >= 2:
        count = 1
    return fixed_train + free[count:], fixed_val + free[:count]
