"""Reading and writing volumes, their geometry, the input checks and the canonical orientation transform.

SimpleITK's own reading of the real pyradiomics files is the reference for geometry; physical equivalence of
reoriented copies is checked voxel by voxel with SimpleITK's ``TransformIndexToPhysicalPoint``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from testkit import TOTALSEG, write_dicom_series

from TextSegLib.io.volumes import (
    CanonicalTransform,
    Volume,
    VolumeError,
    check_volume_file,
    guess_modality,
    labels_on_grid,
    orientation_code,
    read_volume,
    write_image,
)

SIGNED_PERMUTATIONS = [
    (tuple(axes), tuple(flips))
    for axes in itertools.permutations(range(3))
    for flips in itertools.product((False, True), repeat=3)
]


def signed_permutation_direction(world_of_axis, negative) -> np.ndarray:
    """Direction matrix whose column ``a`` is ``-/+`` the unit vector of world axis ``world_of_axis[a]``."""
    direction = np.zeros((3, 3))
    for axis, (world, flip) in enumerate(zip(world_of_axis, negative, strict=True)):
        direction[world, axis] = -1.0 if flip else 1.0
    return direction


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "z":
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    if axis == "x":
        return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    raise AssertionError(axis)


def assert_same_geometry(volume: Volume, image: sitk.Image, atol: float = 0.0, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=atol, rtol=rtol)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=atol, rtol=rtol)
    np.testing.assert_allclose(volume.direction, np.reshape(image.GetDirection(), (3, 3)), atol=atol, rtol=rtol)


# --- reading the real files -------------------------------------------------------------------------------------


def test_read_volume_lung2_matches_simpleitk(lung2, data_dir):
    image = sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))
    assert lung2.array.shape == (61, 512, 512)  # (K, J, I)
    assert lung2.size_ijk == (512, 512, 61) == image.GetSize()
    assert lung2.array.dtype == np.int16
    np.testing.assert_array_equal(lung2.array, sitk.GetArrayFromImage(image))
    assert lung2.spacing == image.GetSpacing()
    assert lung2.origin == image.GetOrigin()
    np.testing.assert_array_equal(lung2.direction, np.reshape(image.GetDirection(), (3, 3)))
    assert lung2.direction.shape == (3, 3)
    assert lung2.source == str(data_dir / "lung2_image.nrrd")
    assert lung2.modality is None
    assert read_volume(data_dir / "lung2_image.nrrd", modality="CT").modality == "CT"


def test_ijk_to_lps_matches_simpleitk(data_dir):
    """brain1's direction flips j, so a wrong matrix order or sign shows."""
    image = sitk.ReadImage(str(data_dir / "brain1_image.nrrd"))
    volume = read_volume(data_dir / "brain1_image.nrrd")
    assert orientation_code(volume.direction) == "LAS"
    matrix = volume.ijk_to_lps()
    for index in ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 24), (17, 200, 11)):
        np.testing.assert_allclose(
            matrix @ np.array([*index, 1.0]), [*image.TransformIndexToPhysicalPoint(index), 1.0], atol=1e-9
        )


def test_guess_modality(lung2, data_dir):
    assert guess_modality(lung2.array) == "CT"
    assert guess_modality(read_volume(data_dir / "brain1_image.nrrd").array) == "MR"
    assert guess_modality(np.full((4, 5, 6), -1000.0)) == "CT"
    assert guess_modality(np.zeros((4, 5, 6))) == "MR"


# --- writing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
@pytest.mark.parametrize("case", ["lung2", "brain1"])
def test_write_image_round_trip(tmp_path, data_dir, case, suffix):
    original = read_volume(data_dir / f"{case}_image.nrrd")
    path = tmp_path / f"written{suffix}"
    write_image(path, original.array, like=original)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    again = read_volume(path)
    assert again.array.dtype == original.array.dtype
    np.testing.assert_array_equal(again.array, original.array)
    # NIfTI stores spacing, origin and direction as float32 (relative rounding 6e-8, 5e-5 mm on an origin of -777 mm);
    # MetaImage writes decimal text. Both are well inside 1e-5 relative + 1e-5 absolute.
    for ours, theirs in ((again.spacing, original.spacing), (again.origin, original.origin)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(again.direction, original.direction, atol=1e-5)


def test_write_image_of_a_label_keeps_geometry_and_values(tmp_path, lung2):
    mask = (lung2.array > 0).astype(np.uint8)
    path = tmp_path / "sub" / "mask.nii.gz"  # missing folders are created
    write_image(path, mask, like=lung2, compress=False)
    again = read_volume(path)
    np.testing.assert_array_equal(again.array, mask)
    assert again.array.dtype == np.uint8
    np.testing.assert_allclose(again.origin, lung2.origin, rtol=1e-6, atol=1e-5)


# --- DICOM series -----------------------------------------------------------------------------------------------


def _dicom_test_image(data_dir: Path, case: str, reorient=None) -> sitk.Image:
    full = sitk.ReadImage(str(data_dir / f"{case}_image.nrrd"))
    small = sitk.Cast(full[60:124, 100:164, 10:15], sitk.sitkInt16)  # 64 x 64 x 5, origin moved by the crop
    assert small.GetOrigin() != full.GetOrigin()
    return small if reorient is None else reoriented_copy(small, *reorient)


# Right-handed directions only: DICOM has no slice-direction field, readers take the slice normal as the cross
# product of the row and column directions (see the left-handed test below).
@pytest.mark.parametrize(
    "reorient", [None, ((0, 1, 2), (True, True, False)), ((1, 0, 2), (False, True, False))],
    ids=["LPS", "RAS", "rows_and_columns_swapped"],
)
def test_read_dicom_series_folder(tmp_path, data_dir, reorient):
    small = _dicom_test_image(data_dir, "lung2", reorient)
    folder = tmp_path / "series"
    write_dicom_series(small, folder, "CT")
    check_volume_file(folder)
    volume = read_volume(folder)
    assert volume.array.shape == (5, 64, 64)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(small))
    np.testing.assert_allclose(volume.origin, small.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.spacing, small.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(volume.direction, np.reshape(small.GetDirection(), (3, 3)), atol=1e-6)
    for index in ((0, 0, 0), (63, 0, 4), (10, 50, 2), (63, 63, 4)):  # voxel centres within 1e-3 mm
        np.testing.assert_allclose(
            volume.ijk_to_lps() @ np.array([*index, 1.0]), [*small.TransformIndexToPhysicalPoint(index), 1.0],
            atol=1e-3,
        )
    assert guess_modality(volume.array) == "CT"
    assert volume.modality == "CT"  # from the DICOM Modality tag
    assert read_volume(folder, modality="MR").modality == "MR"  # the caller's word wins


def test_read_left_handed_dicom_series_as_the_same_physical_image(tmp_path, data_dir):
    """brain1's direction diag(1, -1, 1) is left-handed; in DICOM the slices then run along -z. The reader returns
    the slices in the other order with k pointing to -z: other indices, the same physical image."""
    small = _dicom_test_image(data_dir, "brain1")
    assert np.linalg.det(np.reshape(small.GetDirection(), (3, 3))) < 0
    folder = tmp_path / "series"
    write_dicom_series(small, folder, "MR")
    volume = read_volume(folder)
    assert volume.modality == "MR"
    original = Volume.from_sitk(small)
    assert orientation_code(volume.direction) == "LAI"
    np.testing.assert_array_equal(volume.array, original.array[::-1])
    forward = CanonicalTransform.create(volume.direction, "LPS")
    expected = CanonicalTransform.create(original.direction, "LPS")
    np.testing.assert_array_equal(forward.forward(volume.array), expected.forward(original.array))
    np.testing.assert_allclose(forward.spacing(volume.spacing), expected.spacing(original.spacing), atol=1e-3)
    corners = np.array([[*c, 1.0] for c in itertools.product((0, 63), (0, 63), (0, 4))]).T
    ours = (volume.ijk_to_lps() @ corners).T.tolist()
    theirs = (original.ijk_to_lps() @ corners).T.tolist()
    np.testing.assert_allclose(sorted(ours), sorted(theirs), atol=1e-3)


@pytest.mark.parametrize("content", ["empty", "text"])
def test_folder_without_dicom(tmp_path, content):
    folder = tmp_path / "nothing"
    folder.mkdir()
    if content == "text":
        (folder / "notes.txt").write_text("not an image\n")
    for function in (read_volume, check_volume_file):
        with pytest.raises(VolumeError, match="DICOM") as error:
            function(folder)
        assert "\n" not in str(error.value)


# --- bad inputs -----------------------------------------------------------------------------------------------------


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.nrrd"


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "x.nrrd"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)))
    return path


def _four_d(tmp_path: Path) -> Path:
    path = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(path))
    return path


def _joined(tmp_path: Path) -> Path:
    path = tmp_path / "joined.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.Image([5, 4, 3], sitk.sitkInt16)] * 2), str(path))
    return path


def _vector(tmp_path: Path) -> Path:
    path = tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.Compose([sitk.Image([5, 4, 3], sitk.sitkFloat32)] * 3), str(path))
    return path


BAD_INPUTS = {
    "missing": (_missing, ["not found", "missing.nrrd"]),
    "garbage": (_garbage, ["Cannot read", "x.nrrd", "NRRD", "damaged"]),
    "4d": (_four_d, ["4D", "four.nrrd", "3D volume"]),
    "joined_4d": (_joined, ["4D", "joined.nii.gz"]),
    "vector": (_vector, ["3 values per voxel", "vector", "scalar"]),
}


@pytest.mark.parametrize("function", [read_volume, check_volume_file], ids=["read_volume", "check_volume_file"])
@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_inputs_raise_volume_error(tmp_path, bad, function):
    make, words = BAD_INPUTS[bad]
    path = make(tmp_path)
    with pytest.raises(VolumeError) as error:
        function(path)
    message = str(error.value)
    assert "\n" not in message and len(message) < 300
    for word in words:
        assert word in message
    assert isinstance(error.value, ValueError)


def test_check_volume_file_and_read_volume_give_the_same_message(tmp_path):
    for make, _ in BAD_INPUTS.values():
        path = make(tmp_path)
        with pytest.raises(VolumeError) as from_header:
            check_volume_file(path)
        with pytest.raises(VolumeError) as from_voxels:
            read_volume(path)
        assert str(from_header.value) == str(from_voxels.value)


def test_two_d_image_is_one_slice(tmp_path):
    values = np.arange(6 * 8, dtype=np.int16).reshape(6, 8)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.5, 0.7))
    image.SetOrigin((3.0, -4.0))
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(image, str(path))
    check_volume_file(path)  # no error
    volume = read_volume(path)
    assert volume.array.shape == (1, 6, 8)
    np.testing.assert_array_equal(volume.array[0], values)
    assert volume.spacing[:2] == (0.5, 0.7)
    assert volume.origin[:2] == (3.0, -4.0)
    np.testing.assert_array_equal(volume.direction, np.eye(3))


def test_check_volume_file_accepts_the_real_files(data_dir):
    for case in ("lung2", "brain1", "breast1"):
        check_volume_file(data_dir / f"{case}_image.nrrd")
        check_volume_file(data_dir / f"{case}_label.nrrd")


# --- orientation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["LPS", "RAS", "SAL", "ipr"])
def test_forward_then_inverse_is_identity_for_all_signed_permutations(target):
    array = np.random.default_rng(1).random((3, 4, 5))
    seen = set()
    for world_of_axis, negative in SIGNED_PERMUTATIONS:
        transform = CanonicalTransform.create(signed_permutation_direction(world_of_axis, negative), target)
        seen.add(transform)
        canonical = transform.forward(array)
        assert sorted(canonical.shape) == [3, 4, 5]
        np.testing.assert_array_equal(transform.inverse(canonical), array)
        assert transform.inverse(canonical).shape == array.shape
    assert len(seen) == 48  # every input orientation needs its own transform


def reoriented_copy(image: sitk.Image, source_axes, flips) -> sitk.Image:
    """The same physical image stored with another axis order: new index axis ``t`` is old axis ``source_axes[t]``,
    reversed where ``flips[t]``. Spacing, direction and origin are adjusted; every voxel centre is checked to keep
    its value and its physical point (with SimpleITK)."""
    old = sitk.GetArrayFromImage(image)  # (K, J, I): NumPy axis of ITK axis a is 2 - a
    array = np.transpose(old, [2 - source_axes[2 - n] for n in range(3)])
    for t, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis=2 - t)
    old_direction = np.reshape(image.GetDirection(), (3, 3))
    size, spacing = image.GetSize(), image.GetSpacing()
    direction = np.zeros((3, 3))
    origin = np.array(image.GetOrigin(), dtype=float)
    for t, (axis, flip) in enumerate(zip(source_axes, flips, strict=True)):
        direction[:, t] = -old_direction[:, axis] if flip else old_direction[:, axis]
        if flip:  # new index 0 is the old last index along that axis
            origin += old_direction[:, axis] * spacing[axis] * (size[axis] - 1)
    copy = sitk.GetImageFromArray(np.ascontiguousarray(array))
    copy.SetSpacing([spacing[axis] for axis in source_axes])
    copy.SetOrigin(origin.tolist())
    copy.SetDirection(direction.reshape(-1).tolist())

    indices = list(itertools.product(*(range(n) for n in copy.GetSize())))
    if len(indices) > 400:  # large images: every corner and a fixed sample of the rest
        corners = list(itertools.product(*((0, n - 1) for n in copy.GetSize())))
        picked = np.random.default_rng(0).choice(len(indices), 400, replace=False)
        indices = corners + [indices[i] for i in picked]
    for raw_index in indices:
        new_index = tuple(int(n) for n in raw_index)
        old_index = [0, 0, 0]
        for t, (axis, flip) in enumerate(zip(source_axes, flips, strict=True)):
            old_index[axis] = size[axis] - 1 - new_index[t] if flip else new_index[t]
        np.testing.assert_allclose(
            copy.TransformIndexToPhysicalPoint(new_index), image.TransformIndexToPhysicalPoint(old_index), atol=1e-9
        )
        assert copy[new_index] == image[old_index]
    return copy


def _small_image(data_dir: Path, case: str) -> sitk.Image:
    """A 5 x 4 x 3 crop (different sizes per axis, so a wrong permutation shows)."""
    image = sitk.ReadImage(str(data_dir / f"{case}_image.nrrd"))
    return image[100:105, 120:124, 10:13]


@pytest.mark.parametrize("case", ["lung2", "brain1"])
def test_reoriented_copies_give_identical_canonical_arrays(data_dir, case):
    image = _small_image(data_dir, case)
    original = Volume.from_sitk(image)
    for target in ("LPS", "RAS"):
        reference_transform = CanonicalTransform.create(original.direction, target)
        expected = reference_transform.forward(original.array)
        if case == "lung2" and target == "LPS":
            np.testing.assert_array_equal(expected, original.array)  # lung2 is stored LPS already
        for source_axes, flips in SIGNED_PERMUTATIONS:
            copy = Volume.from_sitk(reoriented_copy(image, source_axes, flips))
            transform = CanonicalTransform.create(copy.direction, target)
            np.testing.assert_array_equal(transform.forward(copy.array), expected)
            assert transform.spacing(copy.spacing) == pytest.approx(reference_transform.spacing(original.spacing))
            np.testing.assert_array_equal(transform.inverse(expected), copy.array)


def test_oblique_directions_pick_the_closest_axes():
    tilt = rotation("x", 10.0) @ rotation("z", 20.0)
    assert orientation_code(tilt) == "LPS"
    assert CanonicalTransform.create(tilt, "LPS") == CanonicalTransform((0, 1, 2), (False, False, False))
    for world_of_axis, negative in SIGNED_PERMUTATIONS:
        exact = signed_permutation_direction(world_of_axis, negative)
        oblique = tilt @ exact
        assert not np.allclose(oblique, exact)
        assert orientation_code(oblique) == orientation_code(exact)
        for target in ("LPS", "RAS"):
            assert CanonicalTransform.create(oblique, target) == CanonicalTransform.create(exact, target)
    # Past 45 degrees about z the i axis is closer to P than to L and the j axis closer to R.
    turned = rotation("z", 60.0)
    assert orientation_code(turned) == "PRS"
    assert CanonicalTransform.create(turned, "LPS") == CanonicalTransform((1, 0, 2), (True, False, False))


def test_orientation_codes():
    assert orientation_code(np.eye(3)) == "LPS"
    assert orientation_code(np.diag([-1.0, -1.0, 1.0])) == "RAS"
    assert orientation_code(np.diag([1.0, -1.0, 1.0])) == "LAS"
    letters = {(0, False): "L", (0, True): "R", (1, False): "P", (1, True): "A", (2, False): "S", (2, True): "I"}
    codes = set()
    for world_of_axis, negative in SIGNED_PERMUTATIONS:
        code = orientation_code(signed_permutation_direction(world_of_axis, negative))
        assert code == "".join(letters[pair] for pair in zip(world_of_axis, negative, strict=True))
        codes.add(code)
        # A volume brought to its own orientation is left as it is.
        assert CanonicalTransform.create(signed_permutation_direction(world_of_axis, negative), code) == (
            CanonicalTransform((0, 1, 2), (False, False, False))
        )
    assert len(codes) == 48


@pytest.mark.parametrize("code", ["LPX", "LLS", "RAP", "LP", "LPSI", "", "XYZ"])
def test_invalid_orientation_codes(code):
    with pytest.raises(ValueError, match="orientation code"):
        CanonicalTransform.create(np.eye(3), code)


def test_ras_target_on_lps_volume_flips_i_and_j():
    transform = CanonicalTransform.create(np.eye(3), "RAS")
    assert transform == CanonicalTransform((0, 1, 2), (True, True, False))
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(transform.forward(array), array[:, ::-1, ::-1])
    assert transform.spacing((0.5, 0.7, 5.0)) == (0.5, 0.7, 5.0)
    # Lower case is accepted; "LPS" on an LPS volume changes nothing.
    assert CanonicalTransform.create(np.eye(3), "ras") == transform
    np.testing.assert_array_equal(CanonicalTransform.create(np.eye(3), "LPS").forward(array), array)


def test_canonical_transform_permutes_spacing():
    # i points S, j points L, k points A: canonical LPS takes i from j, j from k (flipped), k from i.
    direction = signed_permutation_direction((2, 0, 1), (False, False, True))
    transform = CanonicalTransform.create(direction, "LPS")
    assert transform == CanonicalTransform((1, 2, 0), (False, True, False))
    assert transform.spacing((1.0, 2.0, 3.0)) == (2.0, 3.0, 1.0)
    array = np.random.default_rng(2).random((3, 4, 5))  # K=3, J=4, I=5
    assert transform.forward(array).shape == (5, 3, 4)


def test_patient_b_labels_are_put_on_the_dicom_grid_in_physical_space():
    """Patient B's label file is stored y-flipped: matched in physical space, every voxel keeps its label."""
    image = read_volume(TOTALSEG / "ct_b_dicom")
    labels = read_volume(TOTALSEG / "ct_b_labels.nii.gz")
    assert labels.array.shape == image.array.shape and labels.origin != image.origin
    on_grid = labels_on_grid(labels, image)
    reference = sitk.Resample(sitk.ReadImage(str(TOTALSEG / "ct_b_labels.nii.gz")), image.to_sitk(),
                              sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(on_grid, sitk.GetArrayFromImage(reference))
    liver = on_grid == 5  # ct_b_labels.csv: 5 = liver
    assert liver.sum() == (labels.array == 5).sum()
    assert 40 < image.array[liver].mean() < 140  # liver parenchyma in HU; the raw array lands on other tissue
    assert not 40 < image.array[labels.array == 5].mean() < 140


def test_labels_of_another_image_are_refused(lung2, data_dir):
    labels = read_volume(data_dir / "lung1_label.nrrd")
    with pytest.raises(VolumeError, match="does not cover the same region"):
        labels_on_grid(labels, lung2)
