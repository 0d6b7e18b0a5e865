"""The demo: a held-out abdominal CT segmented by name with the shipped model, scored, with a picture to look at.

``textseg demo`` reads patient B (bundled in ``TextSegLib/data/abdomen/``: a DICOM series that the shipped model
never saw, with TotalSegmentator's silver-standard labels), segments every structure its ``case.json`` names, from
"the liver" to "the left kidney" (absent from this scan), in one run, writes one ``.seg.nrrd`` and a PNG montage
(reference outlined in green, prediction in red) and prints per-structure Dice and HD95 against the labels, compared
in physical space, and whether each was found. ``textseg demo --case lung2`` does the same for the lung2 lesion
(pyradiomics, ``TextSegLib/data/demo/``), which the model was trained on, and ``textseg demo --case headneck``
segments OpenKBP's test patient pt_247 (``TextSegLib/data/headneck/``, clinical contours of seven organs at risk)
with the head-and-neck model. Each case names its model in ``case.json`` (``"model"``; the abdomen model otherwise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from TextSegLib.core.files import check_writable
from TextSegLib.core.options import SegmentOptions
from TextSegLib.io.volumes import CanonicalTransform, Volume

__all__ = [
    "CASE_DIRS",
    "DEFAULT_CASE",
    "DEMO_DIR",
    "DEMO_MODEL",
    "demo_case",
    "montage",
    "run_demo",
    "structure_montage",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEMO_DIR = DATA_DIR / "demo"
CASE_DIRS = {"abdomen": DATA_DIR / "abdomen", "headneck": DATA_DIR / "headneck", "lung2": DEMO_DIR}
DEFAULT_CASE = "abdomen"
DEMO_MODEL = "abdomen-freqmedclip-small"

REFERENCE_COLOUR = (40, 220, 70)
PREDICTION_COLOUR = (255, 70, 50)


def demo_case(name: str = DEFAULT_CASE) -> dict[str, Any]:
    """A bundled case's description (its ``case.json``) with absolute file paths: ``"abdomen"`` (patient B, the
    default), ``"headneck"`` (OpenKBP's pt_247) or ``"lung2"`` (the chest CT with one lesion). ``targets`` lists
    ``{"structure", "prompt", "label_value"}``; a null label value is a structure the scan does not contain.
    ``model`` is the catalogue id the case is segmented with by default."""
    if name not in CASE_DIRS:
        raise ValueError(f"There is no demo case {name!r}; choose one of {', '.join(CASE_DIRS)}.")
    folder = CASE_DIRS[name]
    info = json.loads((folder / "case.json").read_text())
    info["image"] = folder / info["image"]
    info["label"] = folder / info["label"]
    info.setdefault("model", DEMO_MODEL)
    return info


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=2, border_value=0)


def _display_window(array: np.ndarray, modality: str) -> tuple[float, float]:
    if modality == "CT":
        return -1350.0, 150.0  # lung window (width 1500, level -600)
    low, high = np.percentile(array[:: max(1, array.size // 1_000_000)], [1, 99])
    return float(low), float(max(high, low + 1))


def montage(volume: Volume, prediction: np.ndarray, reference: np.ndarray | None, path: Path, title: str,
            modality: str = "CT", tiles: int = 12, tile_size: int = 224) -> Path:
    """PNG of up to ``tiles`` slices through the lesion, cropped around it, outlines of reference and prediction.

    Slices are shown in the radiological convention (patient's right on the image's left, anterior up) whatever
    the file's axis order: the volume is put in LPS orientation first.
    """
    from PIL import Image, ImageDraw, ImageFont

    transform = CanonicalTransform.create(volume.direction, "LPS")
    image = transform.forward(volume.array)
    predicted = transform.forward(prediction != 0)
    truth = transform.forward(reference != 0) if reference is not None else np.zeros_like(predicted)
    union = predicted | truth
    present = np.flatnonzero(union.reshape(union.shape[0], -1).any(axis=1))
    if present.size == 0:
        present = np.array([image.shape[0] // 2])
    chosen = present[np.unique(np.linspace(0, present.size - 1, min(tiles, present.size)).round().astype(int))]
    rows, columns = np.nonzero(union[chosen].any(axis=0)) if union[chosen].any() else (
        np.array([image.shape[1] // 2]), np.array([image.shape[2] // 2]))
    centre = ((rows.min() + rows.max()) // 2, (columns.min() + columns.max()) // 2)
    half = int(max(rows.max() - rows.min(), columns.max() - columns.min()) // 2 + 40)
    half = min(half, max(image.shape[1], image.shape[2]) // 2)
    top = int(np.clip(centre[0] - half, 0, max(0, image.shape[1] - 2 * half)))
    left = int(np.clip(centre[1] - half, 0, max(0, image.shape[2] - 2 * half)))
    window = slice(top, top + 2 * half), slice(left, left + 2 * half)
    low, high = _display_window(image, modality)
    font = ImageFont.load_default()
    per_row = 4
    grid_rows = -(-len(chosen) // per_row)
    header, caption = 34, 16
    sheet = Image.new("RGB", (per_row * tile_size, header + grid_rows * (tile_size + caption)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), title, fill=(255, 255, 255), font=font)
    draw.text((6, 18), "reference", fill=REFERENCE_COLOUR, font=font)
    draw.text((80, 18), "TextSeg", fill=PREDICTION_COLOUR, font=font)
    for number, index in enumerate(chosen):
        grey = np.clip((image[index][window].astype(np.float32) - low) / (high - low), 0, 1)
        tile = Image.fromarray((grey * 255).astype(np.uint8)).resize((tile_size, tile_size), Image.BILINEAR)
        rgb = np.array(tile.convert("RGB"))
        for mask, colour in ((truth, REFERENCE_COLOUR), (predicted, PREDICTION_COLOUR)):
            big = np.array(Image.fromarray(mask[index][window].astype(np.uint8) * 255).resize(
                (tile_size, tile_size), Image.NEAREST)) > 0
            rgb[_outline(big)] = colour
        x, y = (number % per_row) * tile_size, header + (number // per_row) * (tile_size + caption)
        sheet.paste(Image.fromarray(rgb), (x, y))
        draw.text((x + 4, y + tile_size + 2), f"slice {index}", fill=(200, 200, 200), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def structure_montage(volume: Volume, entries: list[tuple[str, np.ndarray, np.ndarray | None]], path: Path,
                      title: str, window: tuple[float, float], tile_size: int = 224) -> Path:
    """PNG with one whole slice per structure, in the radiological convention, reference and prediction outlined.

    ``entries``: ``(caption, prediction, reference)`` with ``(K, J, I)`` masks on the volume's grid (reference None
    for a structure the scan does not contain). Each tile shows the slice where the reference is largest (else the
    prediction, else the middle slice).
    """
    from PIL import Image, ImageDraw, ImageFont

    transform = CanonicalTransform.create(volume.direction, "LPS")
    image = transform.forward(volume.array)
    low, high = window
    font = ImageFont.load_default()
    per_row = 4
    header, caption = 34, 16
    grid_rows = -(-len(entries) // per_row)
    sheet = Image.new("RGB", (per_row * tile_size, header + grid_rows * (tile_size + caption)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 4), title, fill=(255, 255, 255), font=font)
    draw.text((6, 18), "reference", fill=REFERENCE_COLOUR, font=font)
    draw.text((80, 18), "TextSeg", fill=PREDICTION_COLOUR, font=font)
    for number, (text, prediction, reference) in enumerate(entries):
        predicted = transform.forward(prediction != 0)
        truth = transform.forward(reference != 0) if reference is not None else np.zeros_like(predicted)
        shown = truth if truth.any() else predicted
        index = int(shown.reshape(shown.shape[0], -1).sum(axis=1).argmax()) if shown.any() else image.shape[0] // 2
        grey = np.clip((image[index].astype(np.float32) - low) / (high - low), 0, 1)
        tile = Image.fromarray((grey * 255).astype(np.uint8)).resize((tile_size, tile_size), Image.BILINEAR)
        rgb = np.array(tile.convert("RGB"))
        for mask, colour in ((truth, REFERENCE_COLOUR), (predicted, PREDICTION_COLOUR)):
            big = np.array(Image.fromarray(mask[index].astype(np.uint8) * 255).resize(
                (tile_size, tile_size), Image.NEAREST)) > 0
            rgb[_outline(big)] = colour
        x, y = (number % per_row) * tile_size, header + (number // per_row) * (tile_size + caption)
        sheet.paste(Image.fromarray(rgb), (x, y))
        draw.text((x + 4, y + tile_size + 2), text, fill=(200, 200, 200), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _figure(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def run_demo(output: Path, device: str = "auto", model: str | None = None, case: str = DEFAULT_CASE,
             progress: Callable[[int, int], None] | None = None, report: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Segment a bundled case by every prompt of its ``case.json``, write ``<case>.seg.nrrd`` and
    ``<case>_montage.png`` to ``output``, report per-target figures and return them. ``model`` defaults to the
    case's own (``case.json``).

    Returns ``{"rows": [{"structure", "prompt", "present", "found", "max_probability", "volume_ml",
    "reference_ml", "dice", "hd95"}, ...], "mean_dice": ..., "segmentation": path, "montage": path}``; Dice and HD95
    (mm) are NaN for a structure the scan does not contain.
    """
    from TextSegLib.engine.run import Segmenter
    from TextSegLib.evaluation.metrics import dice, hd95
    from TextSegLib.io.segnrrd import segment_for_result, write_seg_nrrd
    from TextSegLib.io.volumes import labels_on_grid, read_volume

    info = demo_case(case)
    seg_path, png_path = output / f"{info['case']}.seg.nrrd", output / f"{info['case']}_montage.png"
    for path in (seg_path, png_path):  # before minutes of segmenting, not after
        check_writable(path)
    volume = read_volume(info["image"], modality=info["modality"])
    labels = labels_on_grid(read_volume(info["label"]), volume)
    segmenter = Segmenter([model or info["model"]], SegmentOptions(device=device))
    loaded = segmenter.loaded[0]
    k, j, i = volume.array.shape
    source = "DICOM series" if Path(info["image"]).is_dir() else Path(info["image"]).name
    report(f"TextSeg demo: {info['title']} ({info['modality']}, {i} x {j} x {k} voxels, {source})")
    report(f"Model: {loaded.id} ({loaded.info.name or loaded.info.architecture}) on {segmenter.device}")
    for note in segmenter.notes:
        report(f"Note: {note}")
    trained_on = loaded.info.training.get("train_cases", [])
    held_out = info["case"] not in trained_on
    report("This case is held out: the model never saw it." if held_out else
           f"Note: {info['case']} is one of the {len(trained_on)} cases this model was trained on, so this is not a "
           "held-out result.")
    targets = info["targets"]
    total = len(targets) * k

    def step(index: int) -> Callable[[int, int], None] | None:
        return None if progress is None else lambda done, _: progress(index * k + done, total)

    spacing = tuple(float(s) for s in volume.spacing[::-1])
    millilitres = float(np.prod(volume.spacing)) / 1000.0
    rows, specs, entries = [], [], []
    for index, target in enumerate(targets):
        result = segmenter.segment(volume, target["prompt"], progress=step(index))
        present = target["label_value"] is not None
        reference = labels == target["label_value"] if present else None
        row = {"structure": target["structure"], "prompt": target["prompt"], "present": present,
               "found": result.found, "max_probability": result.max_probability, "volume_ml": result.volume_ml,
               "reference_ml": float(reference.sum()) * millilitres if present else 0.0,
               "dice": dice(result.mask, reference) if present else math.nan,
               "hd95": hd95(result.mask, reference, spacing) if present else math.nan}
        rows.append(row)
        specs.append(segment_for_result(result, target["structure"], index))
        caption = f"{target['structure']}: Dice {row['dice']:.2f}" if present else \
            f"{target['structure']} (absent): {'found' if result.found else 'not found'}"
        entries.append((caption, result.mask, reference))
    output.mkdir(parents=True, exist_ok=True)
    write_seg_nrrd(seg_path, specs, volume)
    width = max(len(r["structure"]) for r in rows) + 2
    report(f"{'structure':<{width}}{'Dice':>6}{'HD95 mm':>9}{'mL':>9}{'ref. mL':>9}  result")
    for row in rows:
        verdict = "found" if row["found"] else "not found"
        reference_ml = _figure(row["reference_ml"] if row["present"] else math.nan, 1)
        report(f"{row['structure']:<{width}}{_figure(row['dice'], 3):>6}{_figure(row['hd95'], 1):>9}"
               f"{row['volume_ml']:>9.1f}{reference_ml:>9}  {verdict} "
               f"(max p {row['max_probability']:.2f}){'' if row['present'] else ', absent from the scan'}")
    present = [r for r in rows if r["present"]]
    mean_dice = float(np.mean([r["dice"] for r in present])) if present else math.nan
    absent = [r for r in rows if not r["present"]]
    report(f"Mean Dice over the {len(present)} structures in the scan: {mean_dice:.3f}. Said \"not found\" for "
           f"{sum(not r['found'] for r in absent)} of {len(absent)} absent and {sum(not r['found'] for r in present)} "
           f"of {len(present)} present structures.")
    report(f"Dice and HD95 are measured against {info.get('labels', 'the reference labels')}, on the image's grid "
           "in physical space.")
    title = f"{info['title']}: mean Dice {mean_dice:.3f}"
    if len(entries) == 1 and present:  # one lesion: the slices through it, cropped around it
        _, prediction, reference = entries[0]
        montage(volume, prediction, reference, png_path, f"{title}  \"{targets[0]['prompt']}\"", info["modality"])
    else:
        structure_montage(volume, entries, png_path, title, tuple(info["display_window"]))
    report(f"Wrote {seg_path} and {png_path}")
    return {"rows": rows, "mean_dice": mean_dice, "segmentation": seg_path, "montage": png_path}
