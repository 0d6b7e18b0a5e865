"""Segmentation metrics checked against medpy 0.5.2, DeepMind's surface-distance package and plain NumPy formulas.

The masks are the real lesion labels of the five pyradiomics cases and perturbed copies of them (shifted, eroded,
dilated, with a second blob added far away). Our metrics get the full arrays; medpy and surface-distance get both
masks cropped to the union bounding box plus a margin of a few voxels, because medpy's distance transforms are slow on
whole 512 x 512 volumes. The crop does not change any metric value: the voxel counts are the same, every mask voxel
keeps its face neighbours (the margin is background, so no voxel becomes a surface voxel because of the crop), and a
Euclidean distance between two surface voxels does not depend on how much background surrounds them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import surface_distance
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from testkit import CASES, read_label

from TextSegLib.evaluation import metrics

FACES = ndimage.generate_binary_structure(3, 1)
PERTURBATIONS = ("identical", "shift_k", "shift_j", "shift_i", "eroded", "dilated", "far_blob")


@pytest.fixture(scope="module")
def labels(data_dir) -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    """Each case's binary (K, J, I) lesion mask and its spacing in array-axis order."""
    return {case: read_label(data_dir, case) for case in CASES}


def add_far_blob(mask: np.ndarray) -> np.ndarray:
    """A copy with a 2 x 4 x 4 blob placed up to 30 voxels beyond the lesion's bounding box along j and i."""
    out = mask.copy()
    found = np.argwhere(mask)
    low, high = found.min(0), found.max(0)
    size = (2, 4, 4)
    start = [int(min(low[0], mask.shape[0] - size[0]))]
    for axis in (1, 2):
        room_after = mask.shape[axis] - 1 - high[axis] - size[axis]
        room_before = low[axis] - size[axis]
        if room_after >= room_before:
            start.append(int(high[axis] + 1 + min(30, room_after)))
        else:
            start.append(int(low[axis] - size[axis] - min(30, room_before)))
    region = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    assert not mask[region].any() and min(start) >= 0
    out[region] = True
    return out


def perturb(reference: np.ndarray, name: str) -> np.ndarray:
    if name == "identical":
        return reference.copy()
    if name == "shift_k":
        return np.roll(reference, 2, axis=0)
    if name == "shift_j":
        return np.roll(reference, 3, axis=1)
    if name == "shift_i":
        return np.roll(reference, -3, axis=2)
    if name == "eroded":
        return ndimage.binary_erosion(reference, FACES)
    if name == "dilated":
        return ndimage.binary_dilation(reference, FACES)
    if name == "far_blob":
        return add_far_blob(reference)
    raise AssertionError(name)


def crop_to_union(prediction: np.ndarray, reference: np.ndarray, margin: int = 3):
    """Both masks cropped to their union's bounding box plus ``margin`` voxels (metric values are unchanged)."""
    found = np.argwhere(prediction | reference)
    low = np.maximum(found.min(0) - margin, 0)
    high = np.minimum(found.max(0) + margin + 1, prediction.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    return prediction[box], reference[box]


def test_perturbations_are_what_they_claim(labels):
    reference, _ = labels["lung2"]
    assert perturb(reference, "eroded").sum() < reference.sum() < perturb(reference, "dilated").sum()
    assert perturb(reference, "far_blob").sum() == reference.sum() + 32
    for name in ("shift_k", "shift_j", "shift_i"):
        shifted = perturb(reference, name)
        assert shifted.sum() == reference.sum() and not np.array_equal(shifted, reference)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # surface-distance uses scipy.ndimage.filters/morphology
@pytest.mark.parametrize("name", PERTURBATIONS)
@pytest.mark.parametrize("case", CASES)
def test_against_medpy_and_surface_distance(labels, case, name):
    reference, spacing = labels[case]
    prediction = perturb(reference, name)
    assert prediction.any() and prediction.shape == reference.shape

    ours = {
        "dice": metrics.dice(prediction, reference),
        "hd": metrics.hausdorff(prediction, reference, spacing),
        "hd95": metrics.hd95(prediction, reference, spacing),
        "assd": metrics.assd(prediction, reference, spacing),
    }
    case_metrics = metrics.evaluate_case(prediction, reference, spacing)

    pred_crop, ref_crop = crop_to_union(prediction, reference)
    medpy = {
        "dice": medpy_binary.dc(pred_crop, ref_crop),
        "hd": medpy_binary.hd(pred_crop, ref_crop, voxelspacing=spacing),
        "hd95": medpy_binary.hd95(pred_crop, ref_crop, voxelspacing=spacing),
        "assd": medpy_binary.assd(pred_crop, ref_crop, voxelspacing=spacing),
    }
    assert ours["dice"] == pytest.approx(medpy["dice"], abs=1e-6)
    assert case_metrics["dice"] == pytest.approx(medpy["dice"], abs=1e-6)
    for key in ("hd", "hd95", "assd"):
        assert ours[key] == pytest.approx(medpy[key], abs=0.01), key
        assert case_metrics[key] == pytest.approx(medpy[key], abs=0.01), key
    assert case_metrics["prediction_voxels"] == prediction.sum()
    assert case_metrics["reference_voxels"] == reference.sum()
    if name == "identical":
        assert ours == {"dice": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0}
    else:
        assert ours["dice"] < 1.0 and ours["hd"] > 0.0

    distances = surface_distance.compute_surface_distances(ref_crop, pred_crop, spacing)
    assert surface_distance.compute_dice_coefficient(ref_crop, pred_crop) == pytest.approx(ours["dice"], abs=1e-6)
    # surface-distance measures between surfels on the voxel-corner grid, weighted by surfel area, so its HD95 is an
    # area-weighted percentile of other points and is not comparable with the voxel-centre HD95 (left out). Its HD at
    # 100 percent is: every surface voxel centre of a mask has a surface corner of the same mask within half a voxel
    # diagonal (a corner of its face towards the background) and every surface corner has a surface voxel within half
    # a diagonal (some voxel of its 2x2x2 neighbourhood is inside with a face neighbour outside), so by the triangle
    # inequality the two Hausdorff distances differ by at most two half diagonals, one voxel diagonal.
    diagonal = math.hypot(*spacing)
    assert surface_distance.compute_robust_hausdorff(distances, 100) == pytest.approx(ours["hd"], abs=diagonal)


@pytest.mark.parametrize("seed", range(4))
def test_masks_touching_the_array_border_match_medpy(seed):
    """Voxels on the array border are surface voxels; the internal crop must not change that (no crop here)."""
    generator = np.random.default_rng(seed)
    shape = (9, 14, 11)
    reference = ndimage.binary_opening(generator.random(shape) > 0.35, FACES)
    prediction = ndimage.binary_opening(generator.random(shape) > 0.4, FACES)
    assert reference.any() and prediction.any()
    for mask in (reference, prediction):  # both masks reach the array border on several sides
        sides = [mask.take(end, axis=axis).any() for axis in range(3) for end in (0, -1)]
        assert sum(sides) >= 3
    spacing = (2.5, 0.8, 1.1)
    assert metrics.hausdorff(prediction, reference, spacing) == pytest.approx(
        medpy_binary.hd(prediction, reference, voxelspacing=spacing), abs=1e-9
    )
    assert metrics.hd95(prediction, reference, spacing) == pytest.approx(
        medpy_binary.hd95(prediction, reference, voxelspacing=spacing), abs=1e-9
    )
    assert metrics.assd(prediction, reference, spacing) == pytest.approx(
        medpy_binary.assd(prediction, reference, voxelspacing=spacing), abs=1e-9
    )


@pytest.mark.parametrize("name", PERTURBATIONS)
@pytest.mark.parametrize("case", CASES)
def test_overlap_metrics_against_numpy(labels, case, name):
    reference, _ = labels[case]
    prediction = perturb(reference, name)
    overlap = np.logical_and(prediction, reference).sum()
    union = np.logical_or(prediction, reference).sum()
    expected_iou = overlap / union
    expected_ravd = abs(int(prediction.sum()) - int(reference.sum())) / reference.sum()

    assert metrics.iou(prediction, reference) == pytest.approx(expected_iou, abs=1e-12)
    assert metrics.voe(prediction, reference) == pytest.approx(1.0 - expected_iou, abs=1e-12)
    assert metrics.ravd(prediction, reference) == pytest.approx(expected_ravd, abs=1e-12)
    case_metrics = metrics.evaluate_case(prediction, reference)
    assert case_metrics["iou"] == pytest.approx(expected_iou, abs=1e-12)
    assert case_metrics["voe"] == pytest.approx(1.0 - expected_iou, abs=1e-12)
    assert case_metrics["ravd"] == pytest.approx(expected_ravd, abs=1e-12)
    assert set(metrics.METRIC_NAMES) <= set(case_metrics)
    # Nonzero label values other than 1 count as inside.
    assert metrics.iou(prediction.astype(np.uint8) * 7, reference.astype(np.int16) * 3) == pytest.approx(expected_iou)


def test_ravd_known_values():
    reference = np.zeros((4, 4, 4), bool)
    reference[:2] = True  # 32 voxels
    prediction = np.zeros_like(reference)
    prediction[:3] = True  # 48 voxels
    assert metrics.ravd(prediction, reference) == pytest.approx(0.5)
    assert metrics.ravd(reference, prediction) == pytest.approx(16 / 48)
    assert metrics.iou(prediction, reference) == pytest.approx(32 / 48)
    assert metrics.dice(prediction, reference) == pytest.approx(64 / 80)


def test_dice_global_weighs_large_lesions(labels):
    pairs = []
    for case, name in (("lung2", "identical"), ("breast1", "shift_j"), ("brain2", "eroded"), ("lung1", "far_blob")):
        reference, _ = labels[case]
        pairs.append((perturb(reference, name), reference))
    overlap = sum(int(np.logical_and(p, r).sum()) for p, r in pairs)
    volumes = sum(int(p.sum()) + int(r.sum()) for p, r in pairs)
    assert metrics.dice_global(pairs) == pytest.approx(2 * overlap / volumes, abs=1e-12)
    assert metrics.dice_global(iter(pairs)) == pytest.approx(2 * overlap / volumes, abs=1e-12)  # any iterable

    # A perfectly found large lesion and a completely missed small one: the mean Dice is 0.5, Dice Global near 1.
    large, _ = labels["lung2"]
    small, _ = labels["breast1"]
    missed = np.roll(small, 20, axis=1)
    assert metrics.dice(missed, small) == 0.0
    mean_dice = (metrics.dice(large, large) + metrics.dice(missed, small)) / 2
    global_dice = metrics.dice_global([(large, large), (missed, small)])
    assert mean_dice == pytest.approx(0.5)
    assert global_dice == pytest.approx(2 * large.sum() / (2 * large.sum() + 2 * small.sum()))
    assert global_dice > 0.99
    # For a single pair Dice Global is the Dice.
    assert metrics.dice_global(pairs[1:2]) == pytest.approx(metrics.dice(*pairs[1]))


def _single_voxel(shape=(4, 5, 6)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[1, 2, 3] = True
    return mask


EMPTY_CASES = {
    "both_empty": (np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool),
                   {"dice": 1.0, "iou": 1.0, "voe": 0.0, "ravd": 0.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0,
                    "boundary_dice": 1.0}),
    "reference_empty": (_single_voxel(), np.zeros((4, 5, 6), bool),
                        {"dice": 0.0, "iou": 0.0, "voe": 1.0, "ravd": math.inf,
                         "hd": math.inf, "hd95": math.inf, "assd": math.inf, "boundary_dice": 0.0}),
    "prediction_empty": (np.zeros((4, 5, 6), bool), _single_voxel(),
                         {"dice": 0.0, "iou": 0.0, "voe": 1.0, "ravd": 1.0,
                          "hd": math.inf, "hd95": math.inf, "assd": math.inf, "boundary_dice": 0.0}),
}


@pytest.mark.parametrize("which", EMPTY_CASES)
def test_empty_mask_conventions(which):
    prediction, reference, expected = EMPTY_CASES[which]
    spacing = (5.0, 0.7, 0.7)
    functions = {
        "dice": lambda: metrics.dice(prediction, reference),
        "iou": lambda: metrics.iou(prediction, reference),
        "voe": lambda: metrics.voe(prediction, reference),
        "ravd": lambda: metrics.ravd(prediction, reference),
        "hd": lambda: metrics.hausdorff(prediction, reference, spacing),
        "hd95": lambda: metrics.hd95(prediction, reference, spacing),
        "assd": lambda: metrics.assd(prediction, reference, spacing),
        "boundary_dice": lambda: metrics.boundary_dice(prediction, reference, spacing),
    }
    assert set(functions) == set(metrics.METRIC_NAMES)
    case_metrics = metrics.evaluate_case(prediction, reference, spacing)
    for key, value in expected.items():
        assert functions[key]() == value, key
        assert case_metrics[key] == value, key
    assert metrics.dice_global([(prediction, reference)]) == expected["dice"]
    assert metrics.surface_distances(prediction, reference, spacing) is None
    assert case_metrics["prediction_voxels"] == prediction.sum()
    assert case_metrics["reference_voxels"] == reference.sum()


def test_counted_dice_and_iou_are_the_masks_own(labels):
    """Training counts voxels slice by slice and tables sum them over cases: the same Dice, IoU and Dice Global."""
    from TextSegLib.evaluation.tables import summarise

    pairs = [(perturb(labels[case][0], name), labels[case][0])
             for case, name in (("lung2", "identical"), ("breast1", "shift_j"), ("brain2", "eroded"))]
    rows = [metrics.evaluate_case(prediction, reference) for prediction, reference in pairs]
    for (prediction, reference), row in zip(pairs, rows, strict=True):
        slices = [(np.count_nonzero(p & r), np.count_nonzero(p), np.count_nonzero(r))
                  for p, r in zip(prediction, reference, strict=True)]
        counts = [float(sum(column)) for column in zip(*slices, strict=True)]
        assert metrics.dice_from_counts(*counts) == metrics.dice(prediction, reference) == row["dice"]
        assert metrics.iou_from_counts(*counts) == metrics.iou(prediction, reference) == row["iou"]
    assert summarise(rows)["dice_global"] == metrics.dice_global(pairs)
    assert summarise([])["dice_global"] == metrics.dice_global([]) == metrics.dice_from_counts(0, 0, 0) == 1.0


def test_dice_global_with_empty_cases():
    empty = np.zeros((3, 3, 3), bool)
    voxel = np.zeros((3, 3, 3), bool)
    voxel[1, 1, 1] = True
    assert metrics.dice_global([]) == 1.0
    assert metrics.dice_global([(empty, empty), (empty, empty)]) == 1.0
    # Empty pairs add nothing to the sums; a missed voxel does.
    assert metrics.dice_global([(empty, empty), (voxel, voxel)]) == 1.0
    assert metrics.dice_global([(empty, voxel), (voxel, voxel)]) == pytest.approx(2 / 3)


def _cube_pair(axis: int) -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((14, 15, 16), bool)
    reference[4:10, 4:10, 4:10] = True
    return np.roll(reference, 1, axis=axis), reference


@pytest.mark.parametrize("axis", range(3))
def test_hausdorff_uses_the_spacing_of_each_axis(axis):
    spacing = (5.0, 0.7, 0.5)
    prediction, reference = _cube_pair(axis)
    assert metrics.hausdorff(prediction, reference, spacing) == pytest.approx(spacing[axis])
    assert metrics.hausdorff(prediction, reference, spacing[::-1]) == pytest.approx(spacing[::-1][axis])
    assert metrics.hausdorff(prediction, reference) == pytest.approx(1.0)  # default: unit spacing
    assert metrics.evaluate_case(prediction, reference, spacing)["hd"] == pytest.approx(spacing[axis])
    # Surface voxels move by one voxel along the axis at most: no distance exceeds that step.
    to_reference, to_prediction = metrics.surface_distances(prediction, reference, spacing)
    pooled = np.concatenate([to_reference, to_prediction])
    assert pooled.max() == pytest.approx(spacing[axis]) and pooled.min() == 0.0
    assert 0.0 < metrics.assd(prediction, reference, spacing) < spacing[axis]


def test_distances_scale_with_spacing_on_a_real_mask(labels):
    reference, spacing = labels["lung1"]
    prediction = np.roll(reference, 1, axis=0)
    assert metrics.hausdorff(prediction, reference, spacing) == pytest.approx(5.0)  # one slice of 5 mm
    assert metrics.hausdorff(prediction, reference, spacing[::-1]) == pytest.approx(spacing[2])  # i spacing on k
    prediction = perturb(reference, "far_blob")
    base = metrics.evaluate_case(prediction, reference, spacing)
    doubled = metrics.evaluate_case(prediction, reference, tuple(2 * s for s in spacing))
    for key in ("hd", "hd95", "assd"):
        assert doubled[key] == pytest.approx(2 * base[key]), key
    stretched = metrics.evaluate_case(prediction, reference, (spacing[0], spacing[1], 3 * spacing[2]))
    assert stretched["hd"] > base["hd"]
    assert stretched["dice"] == base["dice"]


SHAPE_CHECKED = {
    "dice": metrics.dice,
    "iou": metrics.iou,
    "voe": metrics.voe,
    "ravd": metrics.ravd,
    "hausdorff": metrics.hausdorff,
    "hd95": metrics.hd95,
    "assd": metrics.assd,
    "boundary_dice": metrics.boundary_dice,
    "surface_distances": metrics.surface_distances,
    "evaluate_case": metrics.evaluate_case,
    "dice_global": lambda p, r: metrics.dice_global([(r, r), (p, r)]),
}


@pytest.mark.parametrize("function", SHAPE_CHECKED)
def test_shape_mismatch_raises(function):
    prediction = np.ones((4, 5, 6), bool)
    reference = np.ones((4, 6, 5), bool)
    with pytest.raises(ValueError, match="shape"):
        SHAPE_CHECKED[function](prediction, reference)
    with pytest.raises(ValueError, match="shape"):
        SHAPE_CHECKED[function](np.zeros((4, 5, 6), bool), np.zeros((4, 5), bool))


def test_spacing_of_the_wrong_length_raises():
    prediction, reference = _cube_pair(0)
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff(prediction, reference, (1.0, 1.0))


def brute_force_band(mask: np.ndarray, spacing, width: float) -> np.ndarray:
    """Voxels of ``mask`` within ``width`` mm of a surface voxel (a voxel of the mask with a face neighbour outside
    it or on the array border), by explicit distances from every voxel to every surface voxel."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    surface = np.argwhere(mask & ~inner) * np.asarray(spacing)
    voxels = np.argwhere(mask)
    distances = np.sqrt((((voxels * np.asarray(spacing))[:, None, :] - surface[None]) ** 2).sum(-1)).min(1)
    band = np.zeros_like(mask)
    band[tuple(voxels[distances <= width].T)] = True
    return band


@pytest.mark.parametrize("case", ["lung1", "brain1"])
def test_boundary_dice_matches_its_definition_on_real_masks(labels, case):
    reference, spacing = labels[case]
    box = tuple(slice(max(a - 2, 0), b + 3) for a, b in zip(np.argwhere(reference).min(0),
                                                             np.argwhere(reference).max(0), strict=True))
    reference = reference[box]
    prediction = ndimage.binary_dilation(np.roll(reference, 1, axis=2), iterations=1)
    for width in (1.0, 2.0, 4.0):
        a, b = brute_force_band(prediction, spacing, width), brute_force_band(reference, spacing, width)
        expected = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert metrics.boundary_dice(prediction, reference, spacing, width) == pytest.approx(expected, abs=1e-12)
    assert metrics.boundary_dice(reference, reference, spacing) == 1.0
    assert metrics.evaluate_case(prediction, reference, spacing)["boundary_dice"] == metrics.boundary_dice(
        prediction, reference, spacing)


def test_boundary_dice_scores_contours_not_interiors():
    """A large square predicted one pixel too wide keeps a high Dice but loses much of its Boundary Dice."""
    reference = np.zeros((64, 64), bool)
    reference[8:56, 8:56] = True
    prediction = np.zeros_like(reference)
    prediction[8:56, 8:58] = True
    spacing = (1.0, 1.0)
    assert metrics.dice(prediction, reference) > 0.97
    assert metrics.boundary_dice(prediction, reference, spacing, width=1.0) < 0.85


def test_by_prompt_summarises_each_prompt_of_a_manifest(labels):
    """Rows of two prompts over the real lesion masks: one prompt's predictions are the eroded references, the
    other's are empty for one case; the per-prompt lines hold their own cases' figures and appear in every table."""
    import json

    from TextSegLib.evaluation import tables

    rows = []
    for case, (reference, spacing) in labels.items():
        eroded = perturb(reference, "eroded")
        rows.append({"case": case, **metrics.evaluate_case(eroded, reference, spacing), "text": "the lesion"})
        missed = np.zeros_like(reference) if case == CASES[0] else reference
        rows.append({"case": case, **metrics.evaluate_case(missed, reference, spacing), "text": "the mass"})
    lines = {line["prompt"]: line for line in tables.by_prompt(rows)}
    assert set(lines) == {"the lesion", "the mass"}
    lesion = [row["dice"] for row in rows if row["text"] == "the lesion"]
    assert lines["the lesion"]["cases"] == len(CASES) and lines["the lesion"]["found"] == len(CASES)
    assert lines["the lesion"]["dice_mean"] == pytest.approx(np.mean(lesion))
    assert lines["the lesion"]["dice_sd"] == pytest.approx(np.std(lesion))
    assert lines["the mass"]["found"] == len(CASES) - 1
    assert lines["the mass"]["dice_median"] == 1.0 and lines["the mass"]["dice_mean"] < 1.0
    summary = tables.summarise(rows)
    assert "By prompt:" in tables.to_text(rows, summary)
    assert "| the mass | " in tables.to_markdown(rows, summary)
    assert {line["prompt"] for line in json.loads(tables.to_json(rows, summary))["prompts"]} == set(lines)
    assert tables.by_prompt([row for row in rows if row["text"] == "the mass"]) == []  # one prompt: no table
