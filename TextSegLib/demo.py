"""The demo: a real CT case segmented from its text by the shipped demo model, with a picture to look at.

``textseg demo`` reads the case bundled in ``TextSegLib/data/demo/`` (lung2 of the pyradiomics sample data,
BSD-3-Clause, licence beside it), segments it with the shipped checkpoint from its text line, writes the
``.seg.nrrd`` and a PNG montage of the lesion slices (reference outlined in green, prediction in red) and prints
the agreement with the reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .volumes import CanonicalTransform, Volume

__all__ = ["DEMO_DIR", "DEMO_MODEL", "demo_case", "montage", "run_demo"]

DEMO_DIR = Path(__file__).resolve().parent / "data" / "demo"
DEMO_MODEL = "demo-texlivernet-small"

REFERENCE_COLOUR = (40, 220, 70)
PREDICTION_COLOUR = (255, 70, 50)


def demo_case() -> dict[str, Any]:
    """The bundled case's description (``case.json``) with absolute file paths."""
    info = json.loads((DEMO_DIR / "case.json").read_text())
    info["image"] = DEMO_DIR / info["image"]
    info["label"] = DEMO_DIR / info["label"]
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


def run_demo(output: Path, device: str = "auto", model: str = DEMO_MODEL,
             progress: Callable[[int, int], None] | None = None, report: Callable[[str], None] = print
             ) -> dict[str, Any]:
    """Segment the bundled case, write ``<case>.seg.nrrd`` and ``<case>_montage.png`` to ``output``, and return
    the metrics against the reference."""
    from .inference import InferenceEngine, load_model
    from .metrics import evaluate_case
    from .segmentations import segment_for_result, write_seg_nrrd
    from .volumes import read_volume

    case = demo_case()
    volume = read_volume(case["image"], modality=case["modality"])
    reference = read_volume(case["label"]).array != 0
    loaded = load_model(model, device)
    k, j, i = volume.array.shape
    report(f"TextSeg demo: {case['case']} ({case['modality']}, {i} x {j} x {k} voxels)")
    report(f"Prompt: \"{case['prompt']}\"")
    report(f"Model: {loaded.id} ({loaded.info.name or loaded.info.architecture}) on {loaded.device}")
    result = InferenceEngine(loaded).segment(volume, case["prompt"], progress=progress)
    output.mkdir(parents=True, exist_ok=True)
    seg_path = output / f"{case['case']}.seg.nrrd"
    write_seg_nrrd(seg_path, [segment_for_result(result, "TextSeg: " + case["prompt"])], volume)
    spacing = tuple(float(s) for s in volume.spacing[::-1])
    metrics = evaluate_case(result.mask, reference, spacing)
    millilitres = float(np.prod(volume.spacing)) / 1000.0
    report(f"Found {result.voxel_count:,} voxels ({result.voxel_count * millilitres:.1f} mL); the reference has "
           f"{int(reference.sum()):,} ({reference.sum() * millilitres:.1f} mL). Time: {result.seconds:.1f} s")
    report(f"Dice {metrics['dice']:.3f}   IoU {metrics['iou']:.3f}   HD95 {metrics['hd95']:.1f} mm   "
           f"ASSD {metrics['assd']:.1f} mm")
    trained_on = loaded.info.training.get("train_cases", [])
    if case["case"] in trained_on:
        report(f"Note: {case['case']} is one of the {len(trained_on)} cases this model was trained on, so this is "
               "not a held-out result; the README gives leave-one-case-out figures.")
    png_path = montage(volume, result.mask, reference, output / f"{case['case']}_montage.png",
                       f"{case['case']}: \"{case['prompt']}\"   Dice {metrics['dice']:.3f}", case["modality"])
    report(f"Wrote {seg_path} and {png_path}")
    return {"metrics": metrics, "segmentation": seg_path, "montage": png_path, "result": result}
