"""Segmentation metrics as the three papers report them.

All functions take binary masks of the same shape (any number of dimensions; nonzero = inside) and, for the
distance metrics, the voxel spacing in mm **in array-axis order** (for a ``(K, J, I)`` volume array that is
``(spacing_k, spacing_j, spacing_i)``, the reverse of ITK's order).

Definitions (P = prediction, R = reference, |.| = voxel count):

* Dice = 2|P n R| / (|P| + |R|).
* Dice Global (over a set of cases) = 2 sum|P n R| / sum(|P| + |R|): large lesions weigh more.
* IoU = |P n R| / |P u R|;  VOE (volume overlap error) = 1 - IoU.
* RAVD (relative absolute volume difference) = | |P| - |R| | / |R|.
* Surface voxels of a mask: the mask minus its erosion with the face-connected structuring element (voxels on
  the array border count as surface). For each surface voxel of one mask, the Euclidean distance in mm to the
  nearest surface voxel of the other.
* HD (Hausdorff) = the largest of those distances in both directions.
* HD95 = the 95th percentile of the distances of both directions pooled (linear interpolation).
* ASSD = the mean of the distances of both directions pooled (the SLIVER07 / LiTS definition:
  ``(sum d(P->R) + sum d(R->P)) / (number of surface voxels of P and R)``).
* Boundary Dice (FreqMedCLIP's Table 5, which does not define it) = ``2 |B(P) n B(R)| / (|B(P)| + |B(R)|)``, where
  the boundary band ``B(M)`` holds the voxels of ``M`` within ``width`` mm (2 by default) of ``M``'s surface
  voxels: the boundary construction of Boundary IoU (Cheng et al., CVPR 2021) with Dice's ratio, the band measured
  in mm. It scores the agreement of the contours and ignores the interiors of large masks.

Empty masks, decided once for all metrics:

* both empty: a perfect answer to "nothing there": Dice = IoU = Boundary Dice = 1, VOE = RAVD = 0,
  HD = HD95 = ASSD = 0.
* only the reference empty: Dice = IoU = Boundary Dice = 0, VOE = 1, RAVD = inf, distances = inf.
* only the prediction empty: Dice = IoU = Boundary Dice = 0, VOE = 1, RAVD = 1, distances = inf.

``inf`` is a value, not an error: a table shows it as ``inf`` and JSON output writes it as ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_NAMES",
    "assd",
    "boundary_dice",
    "dice",
    "dice_from_counts",
    "dice_global",
    "evaluate_case",
    "hausdorff",
    "hd95",
    "iou",
    "iou_from_counts",
    "ravd",
    "surface_distances",
    "voe",
]

METRIC_NAMES = ("dice", "iou", "voe", "ravd", "hd", "hd95", "assd", "boundary_dice")
BOUNDARY_WIDTH_MM = 2.0


def _binary(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask) != 0


def _counts(prediction: np.ndarray, reference: np.ndarray) -> tuple[int, int, int]:
    p, r = _binary(prediction), _binary(reference)
    if p.shape != r.shape:
        raise ValueError(f"prediction {p.shape} and reference {r.shape} have different shapes")
    return int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))


def dice_from_counts(overlap: float, predicted: float, reference: float) -> float:
    """Dice from voxel counts ``|P n R|``, ``|P|`` and ``|R|`` (1 when both are empty): where masks are counted
    piecewise (slices in training) or summed over cases (Dice Global)."""
    return 1.0 if predicted + reference == 0 else 2.0 * overlap / (predicted + reference)


def iou_from_counts(overlap: float, predicted: float, reference: float) -> float:
    """IoU from voxel counts ``|P n R|``, ``|P|`` and ``|R|`` (1 when both are empty)."""
    union = predicted + reference - overlap
    return 1.0 if union == 0 else overlap / union


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice similarity coefficient (1 when both are empty)."""
    return dice_from_counts(*_counts(prediction, reference))


def dice_global(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Dice Global over ``(prediction, reference)`` pairs: overlaps and volumes summed before the ratio."""
    sums = [0, 0, 0]
    for prediction, reference in pairs:
        sums = [total + count for total, count in zip(sums, _counts(prediction, reference), strict=True)]
    return dice_from_counts(*sums)


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union (Jaccard; 1 when both are empty)."""
    return iou_from_counts(*_counts(prediction, reference))


def voe(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Volume overlap error, ``1 - IoU``."""
    return 1.0 - iou(prediction, reference)


def ravd(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Relative absolute volume difference ``| |P| - |R| | / |R|`` (0 if both empty, inf if only R is)."""
    _, p, r = _counts(prediction, reference)
    if r == 0:
        return 0.0 if p == 0 else math.inf
    return abs(p - r) / r


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Directed surface distances in mm: (prediction -> reference, reference -> prediction).

    None when either mask is empty. Work is confined to the masks' joint bounding box (plus one voxel), which
    gives the same distances as the whole array.
    """
    p, r, spacing = _checked(prediction, reference, spacing)
    if not p.any() or not r.any():
        return None
    union = np.argwhere(p | r)
    low = np.maximum(union.min(0) - 1, 0)
    high = np.minimum(union.max(0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    p_surface, r_surface = _surface(p[box]), _surface(r[box])
    to_reference = ndimage.distance_transform_edt(~r_surface, sampling=spacing)[p_surface]
    to_prediction = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[r_surface]
    return to_reference, to_prediction


def _one_sided_empty(prediction: np.ndarray, reference: np.ndarray) -> float:
    """0 when both masks are empty, inf when one is (used by the distance metrics)."""
    return 0.0 if not _binary(prediction).any() and not _binary(reference).any() else math.inf


def hausdorff(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Hausdorff distance in mm (symmetric maximum surface distance)."""
    distances = surface_distances(prediction, reference, spacing)
    if distances is None:
        return _one_sided_empty(prediction, reference)
    return float(max(distances[0].max(), distances[1].max()))


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the pooled surface distances of both directions, in mm."""
    distances = surface_distances(prediction, reference, spacing)
    if distances is None:
        return _one_sided_empty(prediction, reference)
    return float(np.percentile(np.concatenate(distances), 95))


def assd(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance in mm: the mean of both directions' surface distances pooled."""
    distances = surface_distances(prediction, reference, spacing)
    if distances is None:
        return _one_sided_empty(prediction, reference)
    return float(np.concatenate(distances).mean())


def _checked(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None
             ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    p, r = _binary(prediction), _binary(reference)
    if p.shape != r.shape:
        raise ValueError(f"prediction {p.shape} and reference {r.shape} have different shapes")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * p.ndim))
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {spacing} does not match {p.ndim} dimensions")
    return p, r, spacing


def boundary_dice(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None,
                  width: float = BOUNDARY_WIDTH_MM) -> float:
    """Dice of the boundary bands of both masks (voxels within ``width`` mm of their own surface)."""
    p, r, spacing = _checked(prediction, reference, spacing)
    if not p.any() or not r.any():
        return 1.0 if not p.any() and not r.any() else 0.0
    union = np.argwhere(p | r)  # every band lies in its mask: the joint bounding box (plus one voxel) suffices
    low = np.maximum(union.min(0) - 1, 0)
    high = np.minimum(union.max(0) + 2, p.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    bands = []
    for mask in (p[box], r[box]):
        depth = ndimage.distance_transform_edt(~_surface(mask), sampling=spacing)
        bands.append(mask & (depth <= width))
    return 2.0 * np.count_nonzero(bands[0] & bands[1]) / (np.count_nonzero(bands[0]) + np.count_nonzero(bands[1]))


def evaluate_case(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """All metrics of one case (keys :data:`METRIC_NAMES`, plus the voxel counts ``overlap_voxels``,
    ``prediction_voxels`` and ``reference_voxels`` from which Dice Global is summed), surface distances computed
    once."""
    overlap, p, r = _counts(prediction, reference)
    result = {"dice": dice_from_counts(overlap, p, r), "iou": iou_from_counts(overlap, p, r)}
    result["voe"] = 1.0 - result["iou"]
    result["ravd"] = ravd(prediction, reference)
    distances = surface_distances(prediction, reference, spacing)
    if distances is None:
        empty = _one_sided_empty(prediction, reference)
        result.update(hd=empty, hd95=empty, assd=empty)
    else:
        pooled = np.concatenate(distances)
        result["hd"] = float(pooled.max())
        result["hd95"] = float(np.percentile(pooled, 95))
        result["assd"] = float(pooled.mean())
    result["boundary_dice"] = boundary_dice(prediction, reference, spacing)
    result["overlap_voxels"] = float(overlap)
    result["prediction_voxels"] = float(p)
    result["reference_voxels"] = float(r)
    return result
