"""The TotalSegmentator full-length converter on the shared patient A: a source laid out as a TotalSegmentator clone
holds the shared CT and label map under the clone's file names, and a class map written from the shared label
table in the form of the clone's ``totalsegmentator/map_to_binary.py`` (a ``class_map`` dict literal keyed by task).
What comes out must be the same patient in the same physical space, with the structures where anatomy puts them.
On the real clone (commit 0e65a44) the command writes 112 slices and 61 structures."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from testkit import TOTALSEG

from TextSegLib.io.manifests import read_manifest
from TextSegLib.io.volumes import VolumeError, read_volume
from Training.datasets.__main__ import main
from Training.datasets.totalsegmentator import CLASS_MAP, IMAGE, LABELS, class_names, convert
from Training.structures import STRUCTURES


def _shared_table() -> list[dict[str, str]]:
    with open(TOTALSEG / "ct_a_labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _clone(root: Path, labels: Path = TOTALSEG / "ct_a_labels.nii.gz") -> Path:
    """A folder with a TotalSegmentator clone's layout holding the shared patient A."""
    references = root / "tests" / "reference_files"
    references.mkdir(parents=True)
    (references / IMAGE).symlink_to(TOTALSEG / "ct_a_image.nii.gz")
    (references / LABELS).symlink_to(labels)
    names = {int(row["value"]): row["structure"] for row in _shared_table()}
    (root / CLASS_MAP).parent.mkdir(parents=True)
    (root / CLASS_MAP).write_text(f"import os\n\nclass_map = {{\n    'total_v1': {{1: 'spleen'}},\n"
                                  f"    'total': {names!r},\n}}\n\nother = class_map['total']\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, str]:
    """The shared patient A converted once by the command: ``(clone, output, stdout)``."""
    clone = _clone(tmp_path_factory.mktemp("TotalSegmentator"))
    output = tmp_path_factory.mktemp("full")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["totalsegmentator", "--source", str(clone), "--output", str(output)]) == 0
    return clone, output, stdout.getvalue()


def test_the_patient_keeps_its_voxels_and_its_place_in_physical_space(converted):
    _, output, stdout = converted
    for written, original in (("ct_a_full_image.nii.gz", "ct_a_image.nii.gz"),
                              ("ct_a_full_labels.nii.gz", "ct_a_labels.nii.gz")):
        new, old = read_volume(output / written), read_volume(TOTALSEG / original)
        np.testing.assert_array_equal(new.array, old.array)
        np.testing.assert_allclose(new.ijk_to_lps(), old.ijk_to_lps(), atol=1e-4)
    assert sitk.ReadImage(str(output / "ct_a_full_image.nii.gz")).GetPixelID() == sitk.sitkInt16
    assert sitk.ReadImage(str(output / "ct_a_full_labels.nii.gz")).GetPixelID() == sitk.sitkUInt8
    with open(output / "ct_a_full_labels.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == _shared_table()  # values, names and voxel counts
    assert f"patient A: 30 slices, {len(_shared_table())} structures" in stdout


def _centroid(output: Path, structure: str) -> np.ndarray:
    """LPS centroid (mm) of ``structure`` in the converted label map."""
    labels = read_volume(output / "ct_a_full_labels.nii.gz")
    with open(output / "ct_a_full_labels.csv", newline="") as handle:
        value = next(int(row["value"]) for row in csv.DictReader(handle) if row["structure"] == structure)
    k, j, i = np.nonzero(labels.array == value)
    return (labels.ijk_to_lps() @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]


def test_structures_lie_where_anatomy_puts_them(converted):
    """In LPS, x grows towards the patient's left, y posteriorly and z superiorly."""
    _, output, _ = converted
    liver, spleen = _centroid(output, "liver"), _centroid(output, "spleen")
    assert liver[0] < spleen[0]
    assert _centroid(output, "kidney_right")[0] < _centroid(output, "kidney_left")[0]
    assert _centroid(output, "autochthon_right")[0] < _centroid(output, "autochthon_left")[0]
    assert _centroid(output, "vertebrae_T12")[2] > _centroid(output, "vertebrae_L1")[2]
    assert _centroid(output, "spinal_cord")[1] > _centroid(output, "aorta")[1]


def test_the_manifests_name_structures_by_trained_phrasings_and_never_patient_b(converted):
    _, output, _ = converted
    names = {row["structure"]: int(row["value"]) for row in _shared_table()}
    present = [s for s in STRUCTURES if s.name in names]
    with open(output / "totalsegmentator_full.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["text"], int(r["label_value"])) for r in rows) == sorted(
        (text, names[s.name]) for s in present for text in s.phrasings)
    assert not {r["text"] for r in rows} & {p for s in STRUCTURES for p in s.paraphrases}
    cases = read_manifest(output / "shipped_full.csv")
    assert {case.case for case in cases} >= {"ct_a_full", "mr_a", "lung1", "breast1"}
    assert all(case.image.exists() and case.label.exists() for case in cases)
    assert not any("ct_b" in str(case.image) or case.image.name == "ct_a_image.nii.gz" for case in cases)
    with open(output / "shipped_full.csv", newline="") as handle:
        lesions = [r for r in csv.DictReader(handle) if not r["label_value"]]
    assert lesions and all(sum(r == other for other in lesions) == 4 for r in lesions)


def test_the_class_map_is_read_as_data_from_the_clone(tmp_path):
    clone = _clone(tmp_path / "clone")
    names = class_names(clone / CLASS_MAP)
    assert names[5] == "liver" and names == {int(r["value"]): r["structure"] for r in _shared_table()}
    assert class_names(clone / CLASS_MAP, "total_v1") == {1: "spleen"}
    with pytest.raises(VolumeError, match="defines no class_map\\['total_mr'\\]"):
        class_names(clone / CLASS_MAP, "total_mr")
    (tmp_path / "call.py").write_text("class_map = {'total': dict(liver=5)}\n", encoding="utf-8")
    with pytest.raises(VolumeError, match="not a plain table"):
        class_names(tmp_path / "call.py")


def test_bad_sources_get_one_line(tmp_path, capsys):
    assert main(["totalsegmentator", "--source", str(TOTALSEG), "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "github.com/wasserth/TotalSegmentator" in error
    assert not (tmp_path / "out").exists()
    moved = _clone(tmp_path / "moved", labels=TOTALSEG / "mr_a_labels.nii.gz")
    with pytest.raises(VolumeError, match="is not on the grid of"):
        convert(moved / "tests" / "reference_files", tmp_path / "out")
    unnamed = _clone(tmp_path / "unnamed")
    (unnamed / CLASS_MAP).write_text("class_map = {'total': {5: 'liver'}}\n", encoding="utf-8")
    with pytest.raises(VolumeError, match="does not name"):
        convert(unnamed, tmp_path / "out")
    assert not (tmp_path / "out").exists()
