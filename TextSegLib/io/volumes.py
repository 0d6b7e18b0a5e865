"""Reading and writing images, their geometry, and the canonical orientation networks see.

A :class:`Volume` is a scalar 3D image: a NumPy array in SimpleITK's ``(k, j, i)`` order (slice, row, column)
plus the ITK geometry in LPS millimetres: spacing and origin per ``(i, j, k)`` axis and a direction matrix whose
columns are the ``i``, ``j`` and ``k`` axes. Files are read with SimpleITK (NRRD, NIfTI, MHA/MHD and DICOM series
folders); a Slicer volume node maps onto the same fields (see :mod:`TextSegLib.app.mrml`).

Networks are trained on slices in one *canonical orientation* (stored in the checkpoint as a three-letter code
such as ``"LPS"``: the directions the ``i``, ``j`` and ``k`` axes point to). :class:`CanonicalTransform` permutes
and flips array axes, never resamples, so "left lobe" means the patient's left whatever the file's axis order,
and the result maps back to the input grid exactly. Oblique volumes are assigned the axis permutation closest to
their direction matrix.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextSegLib.core.errors import TextSegError, TextSegTypeError
from TextSegLib.core.files import atomic_write, check_readable_file

__all__ = [
    "CanonicalTransform",
    "Volume",
    "VolumeError",
    "case_name",
    "check_volume",
    "check_volume_file",
    "guess_modality",
    "labels_on_grid",
    "orientation_code",
    "read_volume",
    "write_image",
]

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
SUPPORTED = "NRRD (.nrrd, .nhdr), NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) or a folder of one DICOM series"

_AXIS_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


class VolumeError(TextSegError, ValueError):
    """An image that cannot be read or segmented; the message says why and what to do."""


@dataclass
class Volume:
    """A scalar 3D image with its geometry.

    Attributes:
        array: ``(K, J, I)`` voxel values (SimpleITK / NumPy order: slice, row, column).
        spacing: voxel size along ``i, j, k`` in mm.
        origin: LPS position of voxel ``(0, 0, 0)`` in mm.
        direction: ``3 x 3``; column ``a`` is the LPS unit vector of index axis ``a`` (``i, j, k``).
        modality: ``"CT"``, ``"MR"`` or None when unknown.
        source: file or node the volume came from (for messages).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    modality: str | None = None
    source: str = ""

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return i, j, k

    def ijk_to_lps(self) -> np.ndarray:
        """``4 x 4`` matrix from voxel index ``(i, j, k, 1)`` to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction, dtype=float) @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, other voxels (``array`` must have the same shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction, self.modality, self.source)

    def to_sitk(self, array: np.ndarray | None = None):
        """SimpleITK image of ``array`` (default: the volume's own voxels) with this geometry."""
        import SimpleITK as sitk

        array = self.array if array is None else array
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        image = sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == bool else array)
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in np.asarray(self.direction).reshape(-1)))
        return image

    @classmethod
    def from_sitk(cls, image, source: str = "", modality: str | None = None) -> Volume:
        """Validate a SimpleITK image (scalar, 2D or 3D, not empty) and wrap it."""
        import SimpleITK as sitk

        _check_layout(source or "The image", image.GetNumberOfComponentsPerPixel(), image.GetDimension(),
                      image.GetSize())
        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        array = sitk.GetArrayFromImage(image)
        if array.dtype == np.float64 or not np.issubdtype(array.dtype, np.number):
            array = array.astype(np.float32)
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        return cls(array, tuple(image.GetSpacing()), tuple(image.GetOrigin()), direction, modality, source)


def check_volume(volume: object) -> Volume:
    """Return ``volume`` if TextSeg can segment it; else raise :class:`~TextSegLib.core.errors.TextSegTypeError` (not
    a :class:`Volume`) or :class:`VolumeError` (not a non-empty 3D array of real numbers, or a geometry that is not
    one: spacing not positive, a singular direction matrix, values that are not finite)."""
    if not isinstance(volume, Volume):
        raise TextSegTypeError(
            f"Expected a TextSegLib Volume, got {type(volume).__module__}.{type(volume).__name__}: read a file with "
            "read_volume(path), or wrap an array with Volume(array, spacing, origin, direction)."
        )
    name = volume.source or "The volume"
    array = volume.array
    if not isinstance(array, np.ndarray):
        raise TextSegTypeError(f"{name}: Volume.array must be a NumPy array, not {type(array).__name__}.")
    if array.ndim != 3:
        raise VolumeError(
            f"{name} has {array.ndim} dimensions (shape {array.shape}); TextSeg segments 3D volumes: give a "
            "(K, J, I) array (one 2D slice as shape (1, J, I))."
        )
    if 0 in array.shape:
        raise VolumeError(f"{name} is empty (shape {array.shape}); there is nothing to segment.")
    if array.dtype == bool:
        raise VolumeError(f"{name} holds True/False values (a mask), not intensities; give the CT or MR image.")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise VolumeError(f"{name} holds complex values; give real intensities (for example the magnitude).")
    if not np.issubdtype(array.dtype, np.number):
        raise VolumeError(f"{name} holds {array.dtype} values, not numbers; give a CT or MR image.")
    try:
        spacing = np.asarray(volume.spacing, dtype=float).reshape(3)
        origin = np.asarray(volume.origin, dtype=float).reshape(3)
        direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    except (TypeError, ValueError) as error:
        raise VolumeError(
            f"{name} has no valid geometry (spacing and origin need 3 numbers, direction 3 x 3): {error}"
        ) from error
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise VolumeError(f"{name} has the spacing {tuple(spacing.tolist())}; every voxel size must be above 0 mm.")
    if not (np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))) or abs(np.linalg.det(direction)) < 1e-6:
        raise VolumeError(f"{name} has an invalid origin or direction matrix; fix the image header.")
    return volume


def case_name(path: Path) -> str:
    """File name without image suffixes (``lung2_image.nrrd`` -> ``lung2_image``); folder name for DICOM."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_layout(name: str, components: int, dimension: int, size: tuple[int, ...]) -> None:
    """Refuse what TextSeg cannot segment: vector images, 4D (or other non 2D/3D) images, empty images."""
    if components != 1:
        raise VolumeError(
            f"{name} has {components} values per voxel (a vector or colour image); "
            "TextSeg segments scalar CT or MR volumes: convert it to a scalar volume first."
        )
    if dimension == 4:
        raise VolumeError(
            f"{name} is 4D (a time series or several volumes in one file); extract one 3D volume first, "
            "for example with Slicer's Sequences module."
        )
    if dimension not in (2, 3):
        raise VolumeError(f"{name} has {dimension} dimensions; TextSeg segments 3D (or 2D) images.")
    if 0 in size:
        raise VolumeError(f"{name} is empty (size {tuple(size)}); there is nothing to segment.")


def _dicom_files(folder: Path, warn: bool = True) -> list[str]:
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(f"No DICOM series found in the folder {str(folder)!r}; give a folder of DICOM files.")
    files = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series]
    largest = max(files, key=len)
    if len(series) > 1 and warn:  # said when the voxels are read, not also when the header is checked
        import logging

        logging.getLogger("textseg").warning(
            "%s holds %d DICOM series; using the largest (%d files). Put one series per folder to choose.",
            folder, len(series), len(largest),
        )
    return list(largest)


def _read_sitk(path: Path, header_only: bool):
    import SimpleITK as sitk

    if not path.exists():
        raise VolumeError(f"File not found: {str(path)!r}.")
    check_readable_file(path, "input")
    if path.name.lower().endswith(".seg.nrrd"):
        raise VolumeError(f"{str(path)!r} is a segmentation (.seg.nrrd), not an image; give the image it was made "
                          "from.")
    if path.name.lower().endswith((".nii", ".nii.gz", ".hdr")):
        _check_nifti_scaling(path)
    try:
        if path.is_dir():
            files = _dicom_files(path, warn=not header_only)
            if header_only:
                reader = sitk.ImageFileReader()
                reader.SetFileName(files[0])
                reader.ReadImageInformation()
                return reader
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            if reader.HasMetaDataKey(0, "0008|0060"):
                image.SetMetaData("0008|0060", reader.GetMetaData(0, "0008|0060").strip())
            _warn_uneven_slices(path, reader, image)
            return image
        if header_only:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return reader
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeError(
            f"Cannot read {str(path)!r}: it is not an image TextSeg can read ({SUPPORTED}), or it is damaged."
        ) from error


def _check_nifti_scaling(path: Path) -> None:
    """Refuse a NIfTI file whose intensity scaling (``scl_slope``, ``scl_inter``) is infinite: ITK then reads the
    voxels unscaled, without a word. NaN and 0 mean "no scaling" in NIfTI and pass; an unreadable header is left to
    the reader."""
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error):
        return
    for order in "<>":
        if len(head) >= 348 and struct.unpack(f"{order}i", head[:4])[0] == 348:
            slope, inter = struct.unpack(f"{order}2f", head[112:120])
        elif len(head) >= 540 and struct.unpack(f"{order}i", head[:4])[0] == 540:
            slope, inter = struct.unpack(f"{order}2d", head[176:192])
        else:
            continue
        for name, value in (("scl_slope", slope), ("scl_inter", inter)):
            if math.isinf(value):
                raise VolumeError(f"The NIfTI header of {str(path)!r} scales the intensities with {name} = {value}; "
                                  "the file is damaged: save it again (scl_slope 0 means no scaling).")
        return


def _warn_uneven_slices(folder: Path, reader, image) -> None:
    """One warning line when a DICOM series' slices are not evenly spaced (missing slices): ITK's own warning runs
    to several lines (the ``textseg`` command turns ITK warnings off)."""
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    try:
        positions = [np.asarray(reader.GetMetaData(n, "0020|0032").split("\\"), dtype=float) @ normal
                     for n in range(image.GetSize()[2])]
    except (RuntimeError, ValueError):
        return
    steps = np.abs(np.diff(positions))
    if steps.size and steps.max() - steps.min() > 0.01 * max(float(np.median(steps)), 1e-6):
        import logging

        logging.getLogger("textseg").warning(
            "The DICOM series in %s has unevenly spaced slices (%.3g to %.3g mm apart; slices missing?); it is "
            "segmented as if they were %.3g mm apart.", folder, steps.min(), steps.max(), image.GetSpacing()[2])


def check_volume_file(path: str | os.PathLike[str]) -> None:
    """Check from the file header alone that ``path`` is a readable scalar 2D/3D image (raises VolumeError)."""
    path = Path(path)
    reader = _read_sitk(path, header_only=True)
    _check_layout(str(path), reader.GetNumberOfComponents(), reader.GetDimension(), reader.GetSize())


def read_volume(path: str | os.PathLike[str], modality: str | None = None) -> Volume:
    """Read a scalar image file or DICOM series folder. Raises :class:`VolumeError` with a readable message.

    ``modality`` defaults to the DICOM Modality tag when there is one (CT or MR), else stays None (the engine
    then guesses it from the intensities).
    """
    path = Path(path)
    image = _read_sitk(path, header_only=False)
    if modality is None and image.HasMetaDataKey("0008|0060"):  # DICOM Modality
        modality = {"CT": "CT", "MR": "MR"}.get(image.GetMetaData("0008|0060").strip().upper())
    return Volume.from_sitk(image, source=str(path), modality=modality)


def guess_modality(array: np.ndarray) -> str:
    """``"CT"`` when the intensities look like Hounsfield units (air near -1000 present), else ``"MR"``.

    Looks at a strided sample of at most about a million voxels; pass the modality explicitly when a CT crop
    holds no air.
    """
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)]
    return "CT" if float(np.percentile(sample, 1.0)) < -500.0 else "MR"


def orientation_code(direction: np.ndarray) -> str:
    """Three-letter code of the directions the ``i, j, k`` axes point to (closest axes for oblique volumes)."""
    permutation, signs = _closest_axes(np.asarray(direction, dtype=float))
    letters = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}
    return "".join(letters[(world, sign)] for world, sign in zip(permutation, signs, strict=True))


def _closest_axes(direction: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For each index axis, the world axis it is closest to (as a permutation) and the sign along it."""
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(direction[p[a], a]) for a in range(3)))
    signs = tuple(1 if direction[best[a], a] >= 0 else -1 for a in range(3))
    return best, signs


@dataclass(frozen=True)
class CanonicalTransform:
    """Axis permutation and flips taking a ``(K, J, I)`` array to the canonical orientation and back.

    ``source_axes[t]`` is the input index axis (0 = i, 1 = j, 2 = k) that becomes canonical index axis ``t``;
    ``flips[t]`` says whether it is reversed. Both directions return NumPy views (no copy).
    """

    source_axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def create(cls, direction: np.ndarray, target: str = "LPS") -> CanonicalTransform:
        target = target.upper()
        if len(target) != 3 or sorted(_AXIS_LETTERS[c][0] for c in target if c in _AXIS_LETTERS) != [0, 1, 2]:
            raise ValueError(f"{target!r} is not an orientation code such as 'LPS' or 'RAS'")
        world_of_axis, signs = _closest_axes(np.asarray(direction, dtype=float))
        axis_of_world = {world: axis for axis, world in enumerate(world_of_axis)}
        source_axes, flips = [], []
        for letter in target:
            world, sign = _AXIS_LETTERS[letter]
            axis = axis_of_world[world]
            source_axes.append(axis)
            flips.append(signs[axis] != sign)
        return cls(tuple(source_axes), tuple(flips))

    def forward(self, array: np.ndarray) -> np.ndarray:
        """``(K, J, I)`` input-grid array -> canonical ``(K', J', I')`` array (a view)."""
        # NumPy axis of ITK index axis a is 2 - a.
        out = np.transpose(array, [2 - self.source_axes[2 - n] for n in range(3)])
        for t, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=2 - t)
        return out

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """Canonical array -> array on the input grid (a view)."""
        for t, flip in enumerate(self.flips):
            if flip:
                array = np.flip(array, axis=2 - t)
        forward_axes = [2 - self.source_axes[2 - n] for n in range(3)]
        return np.transpose(array, np.argsort(forward_axes))

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Voxel size along the canonical ``i, j, k`` axes."""
        return tuple(float(spacing[axis]) for axis in self.source_axes)


def labels_on_grid(labels: Volume, reference: Volume, tolerance_mm: float = 0.5) -> np.ndarray:
    """``labels`` (an integer label map) on ``reference``'s voxel grid, matched in physical (LPS) space.

    Each reference voxel takes the label whose voxel contains its centre (nearest neighbour), so a label file
    stored with another axis order, flip or origin (patient B of ``../shared/data/totalsegmentator``) lines up with
    its image. Returns ``(K, J, I)`` of the labels' dtype. Raises :class:`VolumeError` when the two do not cover
    the same region (their corners differ by more than ``tolerance_mm``): labels of another image.
    """
    import SimpleITK as sitk

    def corners(volume: Volume) -> np.ndarray:
        i, j, k = volume.size_ijk
        index = np.array([[a, b, c, 1.0] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)])
        points = (volume.ijk_to_lps() @ index.T).T[:, :3]
        return points[np.lexsort(points.T[::-1])]

    gap = float(np.abs(corners(labels) - corners(reference)).max())
    if gap > tolerance_mm:
        raise VolumeError(f"{labels.source or 'The label file'} does not cover the same region as "
                          f"{reference.source or 'the image'} (corners {gap:.1f} mm apart): use the labels of this "
                          "image.")
    resampled = sitk.Resample(labels.to_sitk(), reference.to_sitk(np.zeros(reference.array.shape, np.uint8)),
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.to_sitk().GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def write_image(path: str | os.PathLike[str], array: np.ndarray, like: Volume, compress: bool = True) -> None:
    """Write ``array`` (``(K, J, I)``, the grid of ``like``) as an image file with ``like``'s geometry."""
    import SimpleITK as sitk

    image = like.to_sitk(array)
    atomic_write(path, lambda temporary: sitk.WriteImage(image, temporary, useCompression=compress))
