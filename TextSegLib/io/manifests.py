"""Dataset manifests: which volumes, which labels, which text, which split.

A manifest is a CSV or JSON Lines file, one row per text-described target::

    case,image,label,text,split,modality,label_value,slice
    lung2,lung2_image.nrrd,lung2_label.nrrd,a large soft-tissue mass in the posterior left lower lung,,CT,,

* ``image`` (or ``volume``) and ``label`` (or ``mask``): files or DICOM folders, relative to the manifest's folder.
* ``text`` (or ``prompt``): the description of the target.
* ``case`` (or ``patient``): the patient; rows of one patient are one case (default: the image file's name).
  Train/validation splits are always made per case, never per slice.
* ``split`` (optional): ``train``, ``val`` or ``test``; cases without it are split at random (seeded, 8:2 by
  default; :func:`split_patients` also holds out a test share and can stratify by modality).
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

from TextSegLib.core.errors import TextSegError, TextSegValueError
from TextSegLib.core.options import check_modality

__all__ = [
    "ManifestCase",
    "ManifestError",
    "Target",
    "read_manifest",
    "split_cases",
    "split_patients",
]

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
    try:
        yield from _json_rows(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path)
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not UTF-8 text; save the manifest as UTF-8.") from None
    except csv.Error as error:
        raise ManifestError(f"{path} is not a readable CSV file ({error}); save it as plain CSV.") from None


def _json_rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ManifestError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}, line {number}: not a JSON object ({{\"image\": ..., \"text\": ...}})")
                yield number, {k: "" if v is None else str(v) for k, v in row.items()}


def _csv_rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield number, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}


def _optional_int(value: str, what: str, where: str) -> int | None:
    if value == "":
        return None
    try:
        return int(float(value))
    except (ValueError, OverflowError):  # not a number; infinity
        raise ManifestError(f"{where}: {what} must be a whole number, got {value!r}") from None


def _modality(value: str, where: str) -> str | None:
    """The row's modality, upper-cased (empty: None, guessed from the intensities)."""
    try:
        return check_modality(value.upper() or None)
    except TextSegError as error:
        raise ManifestError(f"{where}: {error}") from None


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
        if split not in (None, "train", "val", "test"):
            raise ManifestError(f"{where}: split must be 'train', 'val' or 'test', got {split!r}")
        modality = _modality(row.get("modality", ""), where)
        case = cases.get(case_id)
        if case is None:
            case = cases[case_id] = ManifestCase(case_id, image, label, split=split, modality=modality)
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
    """Patient-level train/validation split (:func:`split_patients` without a test share; cases marked ``test``
    are in neither)."""
    train, val, _ = split_patients(cases, val_fraction, 0.0, seed)
    return train, val


def _share(total: int, fraction: float, enough: int) -> int:
    """``round(fraction * total)``, but at least one when the fraction is above 0 and ``total >= enough``."""
    count = round(fraction * total)
    return 1 if fraction > 0 and count == 0 and total >= enough else count


def _largest_remainder(sizes: list[int], total: int, capacity: list[int]) -> list[int]:
    """``total`` split over groups in proportion to ``sizes`` (largest remainders first), at most ``capacity``."""
    whole = sum(sizes)
    quotas = [size * total / whole for size in sizes] if whole else [0.0] * len(sizes)
    counts = [min(int(q), c) for q, c in zip(quotas, capacity, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (counts[i] - quotas[i], i))
    while sum(counts) < total and any(n < c for n, c in zip(counts, capacity, strict=True)):
        for i in order:
            if sum(counts) < total and counts[i] < capacity[i]:
                counts[i] += 1
    return counts


def split_patients(
    cases: Sequence[ManifestCase], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0,
    stratify: str | None = None,
) -> tuple[list[ManifestCase], list[ManifestCase], list[ManifestCase]]:
    """Patient-level train/validation/test split (FreqMedCLIP's "70/20/10 stratified partition" is
    ``val_fraction = 0.2, test_fraction = 0.1, stratify = "modality"``).

    Cases with an explicit ``split`` keep it; the others are shuffled with ``seed``; ``round(val_fraction * n)`` of
    them go to validation and ``round(test_fraction * n)`` to test (at least one each when the fraction is above 0
    and enough cases are left). With ``stratify = "modality"`` every modality gives its share of each split (largest
    remainders), so a split never lacks a modality that has enough cases. Without a test share and without
    stratification the split is the one :func:`split_cases` always made.
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):  # NaN fails too
        raise TextSegValueError(f"The validation ({val_fraction}) and test ({test_fraction}) fractions must be at "
                                "least 0 and leave cases to train on.")
    if stratify not in (None, "modality"):
        raise TextSegValueError(f"stratify must be 'modality' or nothing, not {stratify!r}.")
    fixed = {name: [c for c in cases if c.split == name] for name in ("train", "val", "test")}
    free = sorted((c for c in cases if c.split is None), key=lambda c: c.case)
    random.Random(seed).shuffle(free)
    strata: dict[str, list[ManifestCase]] = {}
    for case in free:
        strata.setdefault((case.modality or "unknown") if stratify else "", []).append(case)
    groups = [strata[key] for key in sorted(strata)]
    sizes = [len(group) for group in groups]
    val_counts = _largest_remainder(sizes, _share(len(free), val_fraction, 2), sizes)
    left = [size - n for size, n in zip(sizes, val_counts, strict=True)]
    test_counts = _largest_remainder(sizes, _share(len(free), test_fraction, 3), left)
    train, val, test = list(fixed["train"]), list(fixed["val"]), list(fixed["test"])
    for group, n_val, n_test in zip(groups, val_counts, test_counts, strict=True):
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    return train, val, test
