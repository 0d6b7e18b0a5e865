"""Evaluation tables: predictions against references, per case and aggregated, as text, CSV, JSON or Markdown.

Three sources of pairs: files or folders of predictions and references (``textseg evaluate PRED REF``), a dataset
manifest segmented by a model (``textseg evaluate --manifest M --model X``), or an LViT-layout folder of 2D images
segmented by a model (``textseg evaluate --lvit DIR --model X``), each case or image with its own text on its own
grid. Aggregates are the means over cases (images) of every metric, the mean LViT's and MMRDL's papers report, and
Dice Global summed over all cases; a manifest that asks for several things (several prompts) also gets one line per
prompt (:func:`by_prompt`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from TextSegLib.core.errors import TextSegError
from TextSegLib.evaluation.metrics import METRIC_NAMES, dice_from_counts, evaluate_case
from TextSegLib.io.volumes import case_name

__all__ = [
    "COLUMNS",
    "by_prompt",
    "evaluate_lvit",
    "evaluate_manifest",
    "evaluate_pairs",
    "match_folders",
    "read_mask",
    "summarise",
    "to_csv",
    "to_json",
    "to_markdown",
    "to_text",
]

COLUMNS = ("case", *METRIC_NAMES)
_LABELS = {"case": "case", "dice": "Dice", "iou": "IoU", "voe": "VOE", "ravd": "RAVD", "hd": "HD ({unit})",
           "hd95": "HD95 ({unit})", "assd": "ASSD ({unit})", "boundary_dice": "Boundary Dice"}
UNITS = {"mm": "millimetres", "px": "pixels"}
"""Units of the distances (HD, HD95, ASSD): millimetres for volumes, pixels for 2D pictures (no spacing)."""


class GridMismatchError(TextSegError, ValueError):
    """Prediction and reference are not on the same voxel grid."""


def read_mask(path: Path, segment: str | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Binary ``(K, J, I)`` mask and its spacing (array-axis order) from a ``.seg.nrrd`` or a label image."""
    from TextSegLib.io.volumes import VolumeError, read_volume

    if path.name.lower().endswith(".seg.nrrd"):
        import slicerio

        from TextSegLib.io.segnrrd import read_seg_nrrd

        segmentation = read_seg_nrrd(path)
        segments = segmentation.get("segments", [])
        if not segments:
            raise VolumeError(f"{str(path)!r} holds no segment.")
        if segment is None:
            chosen = segments[0]
        else:
            matches = [s for s in segments if s.get("name") == segment]
            if not matches:
                known = ", ".join(repr(s.get("name")) for s in segments)
                raise VolumeError(f"{str(path)!r} has no segment named {segment!r} (it has {known}).")
            chosen = matches[0]
        mask = slicerio.segment_mask(segmentation, chosen)
        matrix = np.asarray(segmentation["ijkToLPS"], dtype=float)
        spacing_ijk = np.linalg.norm(matrix[:3, :3], axis=0)
        return np.transpose(mask, (2, 1, 0)) != 0, tuple(float(s) for s in spacing_ijk[::-1])
    volume = read_volume(path)
    return volume.array != 0, tuple(float(s) for s in volume.spacing[::-1])


def match_folders(prediction: Path, reference: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for files of two folders with the same case name (suffixes such as
    ``_label``, ``_seg``, ``_pred``, ``_image`` ignored)."""

    def key(path: Path) -> str:
        return re.sub(r"_(label|labels|seg|mask|pred|prediction|image)$", "", case_name(path))

    predictions = {key(p): p for p in sorted(prediction.iterdir()) if p.is_file()}
    return [(key(r), predictions[key(r)], r) for r in sorted(reference.iterdir())
            if r.is_file() and key(r) in predictions]


def _compare(case: str, prediction: np.ndarray, spacing, reference: np.ndarray, reference_spacing) -> dict:
    if prediction.shape != reference.shape or not np.allclose(spacing, reference_spacing, rtol=1e-3):
        raise GridMismatchError(
            f"{case}: the prediction ({prediction.shape}, spacing {np.round(spacing, 3).tolist()}) and the "
            f"reference ({reference.shape}, spacing {np.round(reference_spacing, 3).tolist()}) are on different "
            "grids; resample one onto the other first."
        )
    return {"case": case, **evaluate_case(prediction, reference, spacing)}


def evaluate_pairs(pairs: Sequence[tuple[str, Path, Path]], segment: str | None = None,
                   reference_segment: str | None = None) -> list[dict[str, Any]]:
    """Metrics of each (case, prediction file, reference file)."""
    rows = []
    for case, prediction_path, reference_path in pairs:
        prediction, spacing = read_mask(prediction_path, segment)
        reference, reference_spacing = read_mask(reference_path, reference_segment)
        rows.append(_compare(case, prediction, spacing, reference, reference_spacing))
    return rows


def evaluate_manifest(engine, cases, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Segment every case of a manifest with its own text(s) and compare with its label, on the volume's grid.

    One row per distinct case target (per lesion value when the manifest gives per-lesion texts; a target the
    manifest repeats to weigh it in training is evaluated once); per-slice texts are not used here (a volume is
    segmented from one prompt). Cases without a label are skipped with a warning; a manifest without any labelled
    case raises :class:`~TextSegLib.io.manifests.ManifestError` (there is nothing to compare with).
    """
    import logging

    from TextSegLib.io.manifests import ManifestError
    from TextSegLib.io.volumes import read_volume

    if not cases:
        raise ManifestError("There is no case to evaluate: the manifest, or the split chosen from it, is empty.")
    unlabelled = [case.case for case in cases if case.label is None]
    if len(unlabelled) == len(cases):
        raise ManifestError(
            f"None of the {len(cases)} case(s) to evaluate has a label; add a label column (the reference "
            "segmentation of each case) to the manifest."
        )
    if unlabelled:
        logging.getLogger("textseg").warning(
            "%d case(s) without a label are not evaluated: %s", len(unlabelled), ", ".join(unlabelled[:5]))
    rows = []
    for case in cases:
        if case.label is None:
            continue
        volume = read_volume(case.image, modality=case.modality)
        label = read_volume(case.label).array
        spacing = tuple(float(s) for s in volume.spacing[::-1])
        for target in dict.fromkeys(case.case_targets):
            if progress is not None:
                progress(case.case)
            result = engine.segment(volume, target.text)
            reference = label != 0 if target.label_value is None else label == target.label_value
            name = case.case if target.label_value is None else f"{case.case}#{target.label_value}"
            row = _compare(name, result.mask != 0, spacing, reference, spacing)
            row["text"] = target.text
            rows.append(row)
    return rows


def evaluate_lvit(engine, items, progress: Callable[[str], None] | None = None,
                  size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Segment every image of an LViT-layout folder (:func:`TextSegLib.io.images.lvit_folder`) with its own
    sentence and compare with its mask (pixels of side 1). One row per image, named by the image's base name;
    ``engine`` needs ``segment_image`` (a :class:`~TextSegLib.engine.run.Segmenter`).

    By default at the image's own size. With ``size`` ``(H, W)``, as LViT's test script (which MMRDL's paper
    follows) scores: the image is shrunk to ``size`` before it is segmented (as every model's input is made:
    :func:`~TextSegLib.engine.preprocessing.resample`), its mask by LViT's rule
    (:func:`~TextSegLib.io.images.lvit_mask`), and the two compared at that size."""
    import torch

    from TextSegLib.engine.preprocessing import resample
    from TextSegLib.io.images import lvit_mask, read_image_2d, read_mask_2d

    rows = []
    for item in items:
        name = Path(item.name).stem
        if progress is not None:
            progress(name)
        image = read_image_2d(item.image)
        reference = read_mask_2d(item.mask)
        if size is not None:
            image = resample(torch.from_numpy(image)[None], size)[0].numpy()
            reference = lvit_mask(reference, size)
        result = engine.segment_image(image, item.text)
        pixel = (1.0, 1.0, 1.0)
        row = _compare(name, result.mask != 0, pixel, reference[None], pixel)
        row["text"] = item.text
        rows.append(row)
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases of every metric (inf propagates: one missed lesion makes the mean HD inf) and Dice Global
    from the summed voxel counts."""
    summary: dict[str, Any] = {"case": "mean"}
    for name in METRIC_NAMES:
        values = [row[name] for row in rows]
        summary[name] = float(np.mean(values)) if values else math.nan
    summary["dice_global"] = dice_from_counts(*(sum(row[key] for row in rows)
                                                for key in ("overlap_voxels", "prediction_voxels", "reference_voxels")))
    return summary


def by_prompt(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per distinct prompt of manifest rows (empty when fewer than two prompts were asked): the number of
    cases, Dice mean, standard deviation and median, the median HD95 (an empty prediction has an infinite HD95, so
    the mean would say nothing) and how many predictions were not empty ("found")."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "text" in row:
            groups.setdefault(row["text"], []).append(row)
    if len(groups) < 2:
        return []
    lines = []
    for text, members in groups.items():
        dice = np.array([row["dice"] for row in members], dtype=float)
        lines.append({"prompt": text, "cases": len(members), "dice_mean": float(dice.mean()),
                      "dice_sd": float(dice.std()), "dice_median": float(np.median(dice)),
                      "hd95_median": float(np.median([row["hd95"] for row in members])),
                      "found": sum(row["prediction_voxels"] > 0 for row in members)})
    return lines


_PROMPT_COLUMNS = ("prompt", "cases", "dice_mean", "dice_sd", "dice_median", "hd95_median", "found")
_PROMPT_LABELS = ("prompt", "cases", "Dice mean", "Dice SD", "Dice median", "HD95 median ({unit})", "found")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def to_text(rows: Sequence[dict[str, Any]], summary: dict[str, Any], unit: str = "mm") -> str:
    """The table for a terminal; distances in ``unit`` (a key of :data:`UNITS`), said in a line when not mm."""
    lines = ["  ".join(f"{c:>10}" for c in COLUMNS)]
    for row in [*rows, summary]:
        lines.append("  ".join(f"{_cell(row[c]):>10}" for c in COLUMNS))
    lines.append(f"Dice Global over {len(rows)} case(s): {_cell(summary['dice_global'])}")
    if unit != "mm":
        lines.append(f"HD, HD95 and ASSD are in {UNITS[unit]}.")
    prompts = by_prompt(rows)
    if prompts:
        width = max(len(line["prompt"]) for line in prompts)
        labels = [label.format(unit=unit) for label in _PROMPT_LABELS[1:]]
        lines += ["", "By prompt:", f"{'prompt':<{width}}  " + "  ".join(f"{c:>16}" for c in labels)]
        lines += [f"{line['prompt']:<{width}}  " + "  ".join(f"{_cell(line[c]):>16}" for c in _PROMPT_COLUMNS[1:])
                  for line in prompts]
    return "\n".join(lines)


def to_markdown(rows: Sequence[dict[str, Any]], summary: dict[str, Any], unit: str = "mm") -> str:
    """A Markdown table; distances in ``unit`` (a key of :data:`UNITS`), named in the headers."""
    lines = ["| " + " | ".join(_LABELS[c].format(unit=unit) for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    lines.append("| **mean** | " + " | ".join(_cell(summary[c]) for c in COLUMNS[1:]) + " |")
    lines.append("")
    lines.append(f"Dice Global over {len(rows)} case(s): {_cell(summary['dice_global'])}")
    prompts = by_prompt(rows)
    if prompts:
        lines += ["", "| " + " | ".join(label.format(unit=unit) for label in _PROMPT_LABELS) + " |",
                  "|" + "---|" * len(_PROMPT_LABELS)]
        lines += ["| " + " | ".join(_cell(line[c]) for c in _PROMPT_COLUMNS) + " |" for line in prompts]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], summary: dict[str, Any], unit: str = "mm") -> str:
    """CSV, one line per case and the mean; ``distance_unit`` says what HD, HD95 and ASSD are in."""
    buffer = io.StringIO()
    fields = [*COLUMNS, "dice_global", "overlap_voxels", "prediction_voxels", "reference_voxels", "text",
              "distance_unit"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in [*rows, summary]:
        writer.writerow({**row, "distance_unit": unit})
    return buffer.getvalue()


def to_json(rows: Sequence[dict[str, Any]], summary: dict[str, Any], unit: str = "mm") -> str:
    """JSON with ``inf`` written as ``null`` (JSON has no infinity); ``distance_unit`` says what HD, HD95 and ASSD
    are in."""

    def clean(row):
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}

    document = {"cases": [clean(r) for r in rows], "summary": clean(summary), "distance_unit": unit}
    prompts = by_prompt(rows)
    if prompts:
        document["prompts"] = [clean(line) for line in prompts]
    return json.dumps(document, indent=2)
