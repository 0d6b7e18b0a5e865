"""The OpenKBP converter on three real head-and-neck patients: geometry, orientation by anatomy, intensities,
contours and per-split manifests."""

from __future__ import annotations

import contextlib
import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from testkit import OPENKBP

from TextSegLib.io.manifests import read_manifest
from TextSegLib.io.volumes import VolumeError, read_volume
from Training.datasets.__main__ import main
from Training.datasets.openkbp import (
    ABSENT_HELD_OUT,
    ABSENT_LABEL_VALUE,
    ABSENT_TRAINED,
    LABEL_VALUES,
    ORGANS,
    STRUCTURES,
    TARGETS,
    convert,
)

SAMPLE = OPENKBP / "train-pats"
PATIENTS = ("pt_1", "pt_2", "pt_3")
#: The fake source tree: OpenKBP's split folders filled with the sample's patients (pt_4 without its CT).
LAYOUT = {"train-pats": {"pt_1": "pt_1", "pt_2": "pt_2", "pt_4": "pt_1"}, "validation-pats": {"pt_5": "pt_1"},
          "test-pats": {"pt_3": "pt_3"}}
SPLIT_OF = {"pt_1": "train", "pt_2": "train", "pt_5": "val", "pt_3": "test"}
#: Words that carry no anatomy: the test paraphrases may share them with the trained phrasings.
STOPWORDS = {"the", "a", "of", "on", "in", "and", "with", "its", "patient", "s"}
FOLDER = {"pt_1": "train", "pt_2": "train", "pt_3": "test"}  # the three real patients' output folders and manifests


def _fake_source(root: Path) -> Path:
    for split, patients in LAYOUT.items():
        for name, original in patients.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for file in (SAMPLE / original).iterdir():
                if name != "pt_4" or file.name != "ct.csv":
                    (folder / file.name).symlink_to(file)
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, str]:
    """The fake source tree converted once by the command: ``(source, output, stdout)``."""
    if not all((SAMPLE / name / "ct.csv").is_file() for name in PATIENTS):
        pytest.fail(f"the OpenKBP sample is missing: expected {SAMPLE}/pt_1 ... pt_3")
    source = _fake_source(tmp_path_factory.mktemp("openkbp-source"))
    output = tmp_path_factory.mktemp("openkbp")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["openkbp", "--source", str(source), "--output", str(output)]) == 0
    return source, output, stdout.getvalue()


def _indices(path: Path) -> np.ndarray:
    with open(path, newline="") as handle:
        return np.array([int(row[0]) for row in list(csv.reader(handle))[1:]], dtype=np.int64)


def _voxels(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, j, i)`` of flat grid indices in the written files (i = b, j = a, k = 127 - c: the module's finding)."""
    a, b, c = np.unravel_index(flat, (128, 128, 128))
    return 127 - c, a, b


def _masks(output: Path, patient: str) -> dict[str, tuple[np.ndarray, object]]:
    """``structure -> (mask, volume)`` read back through the manifest that names the structure's label map."""
    manifest = output / f"{FOLDER[patient]}.csv"
    names = {value: name for name, value in LABEL_VALUES.items()}
    masks = {}
    for case in read_manifest(manifest):
        if case.case.startswith(f"{patient}-"):
            label = read_volume(case.label)
            for target in case.case_targets:
                masks[names[target.label_value]] = (label.array == target.label_value, label)
    return masks


def _centroid(mask: np.ndarray, volume) -> np.ndarray:
    """The mask's centroid in LPS millimetres, through the file's geometry."""
    k, j, i = np.nonzero(mask)
    return (volume.ijk_to_lps() @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].mean(axis=1)


@pytest.mark.parametrize("patient", PATIENTS)
def test_geometry_is_the_grid_in_lps(converted, patient):
    _, output, _ = converted
    spacing_a, spacing_b, spacing_c = np.loadtxt(SAMPLE / patient / "voxel_dimensions.csv")
    files = sorted((output / FOLDER[patient] / patient).glob("*.nrrd"))
    assert {f.name for f in files} >= {"ct.nrrd", "organs.nrrd", "targets.nrrd"}
    for path in files:
        volume = read_volume(path)
        assert volume.size_ijk == (128, 128, 128)
        np.testing.assert_allclose(volume.spacing, (spacing_b, spacing_a, spacing_c))
        np.testing.assert_array_equal(volume.direction, np.eye(3))
        np.testing.assert_array_equal(volume.origin, (0, 0, 0))


def test_orientation_follows_the_anatomy(converted):
    """Left parotid on the patient's left (+x), brainstem above (+z) the cord and the mandible, the cord behind
    (+y) the oesophagus and the mandible: in LPS millimetres from the written files' geometry."""
    _, output, _ = converted
    checked = {"left": 0, "superior": 0, "posterior": 0}
    for patient in PATIENTS:
        centre = {name: _centroid(mask, volume) for name, (mask, volume) in _masks(output, patient).items()}
        assert centre["LeftParotid"][0] > centre["RightParotid"][0] + 40  # the glands lie about 10 cm apart
        checked["left"] += 1
        for below in ("SpinalCord", "Mandible", "Larynx"):
            if below in centre:
                assert centre["Brainstem"][2] > centre[below][2], (patient, below)
                checked["superior"] += 1
        for front in ("Esophagus", "Larynx", "Mandible"):
            if front in centre:
                assert centre["SpinalCord"][1] > centre[front][1], (patient, front)
                checked["posterior"] += 1
    assert checked == {"left": 3, "superior": 5, "posterior": 3}


@pytest.mark.parametrize("patient", PATIENTS)
def test_ct_is_in_hounsfield_units(converted, patient):
    _, output, _ = converted
    ct = read_volume(output / FOLDER[patient] / patient / "ct.nrrd").array
    assert ct.dtype == np.int16
    with open(SAMPLE / patient / "ct.csv", newline="") as handle:
        rows = np.array([(int(r[0]), float(r[1])) for r in list(csv.reader(handle))[1:]])
    listed = np.zeros(128**3, dtype=bool)
    listed[rows[:, 0].astype(np.int64)] = True
    np.testing.assert_array_equal(ct[_voxels(rows[:, 0].astype(np.int64))], rows[:, 1] - 1024)
    outside = _voxels(np.flatnonzero(~listed))
    assert (ct[outside] == -1024).all() and ct[0, 0, 0] == -1024  # air outside the body
    masks = _masks(output, patient)
    assert 0 < np.median(ct[masks["Brainstem"][0]]) < 80  # soft tissue
    if "Mandible" in masks:
        assert np.median(ct[masks["Mandible"][0]]) > 300  # bone


@pytest.mark.parametrize("patient", PATIENTS)
def test_every_contour_keeps_its_voxels(converted, patient):
    """Each structure, read back through the manifest row that names it, is exactly its CSV's voxels, also where
    structures overlap (organs and target volumes, and organs among themselves in pt_2)."""
    _, output, _ = converted
    masks = _masks(output, patient)
    present = sorted(f.stem for f in (SAMPLE / patient).glob("*.csv") if f.stem in LABEL_VALUES)
    assert sorted(masks) == present
    for name, (mask, _) in masks.items():
        expected = np.zeros_like(mask)
        expected[_voxels(_indices(SAMPLE / patient / f"{name}.csv"))] = True
        np.testing.assert_array_equal(mask, expected, err_msg=name)
    organs = [masks[s.name][0] for s in ORGANS if s.name in masks]
    targets = [masks[s.name][0] for s in TARGETS if s.name in masks]
    assert any((organ & target).any() for organ in organs for target in targets)
    overlapping = any((a & b).any() for n, a in enumerate(organs) for b in organs[n + 1:])
    assert overlapping == (output / FOLDER[patient] / patient / "organs_2.nrrd").is_file()
    assert overlapping == (patient == "pt_2")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_manifests_follow_openkbp_splits(converted):
    _, output, stdout = converted
    manifests = {name: _rows(output / f"{name}.csv")
                 for name in ("train", "validation", "test", "trainval", "test_paraphrases")}
    patients = {name: {row["case"].split("-")[0] for row in rows} for name, rows in manifests.items()}
    assert patients == {"train": {"pt_1", "pt_2"}, "validation": {"pt_5"}, "test": {"pt_3"},
                        "trainval": {"pt_1", "pt_2", "pt_5"}, "test_paraphrases": {"pt_3"}}
    for name, rows in manifests.items():
        assert {row["split"] for row in rows} == {SPLIT_OF[p] for p in patients[name]}
        cases = read_manifest(output / f"{name}.csv")
        assert {case.split for case in cases} == {SPLIT_OF[p] for p in patients[name]}
        assert all(case.modality == "CT" and case.image.is_file() and case.label.is_file() for case in cases)
    phrasings = {s.name: s.phrasings for s in STRUCTURES}
    paraphrases = {text for s in STRUCTURES for text in s.paraphrases}
    for name in ("train", "validation", "test", "trainval"):
        assert not paraphrases & {row["text"] for row in manifests[name]}
    assert {row["text"] for row in manifests["test_paraphrases"]} <= paraphrases
    names = {value: name for name, value in LABEL_VALUES.items()}
    for patient, split in (("pt_1", "train"), ("pt_5", "validation"), ("pt_3", "test")):
        original = SAMPLE / LAYOUT[f"{split}-pats"][patient]
        present = {f.stem for f in original.glob("*.csv") if f.stem in LABEL_VALUES}
        texts: dict[str, list[str]] = {}
        for row in manifests[split]:
            if row["case"].startswith(f"{patient}-"):
                texts.setdefault(names[int(row["label_value"])], []).append(row["text"])
        assert set(texts) == present  # a structure the patient lacks has no row
        assert all(sorted(texts[s]) == sorted(phrasings[s]) for s in present)
    parotids = [row["text"] for row in manifests["trainval"] if names[int(row["label_value"])].endswith("Parotid")]
    assert parotids and all(("left" in t) != ("right" in t) for t in parotids)
    assert all("left" in row["text"] for row in manifests["trainval"] if row["label_value"] == "4")
    assert "train: 2 patients converted, 1 skipped (no ct.csv): pt_4" in stdout
    assert "validation: 1 patients converted, 0 skipped" in stdout and "test: 1 patients converted" in stdout
    assert "  Esophagus    1 / 0 / 0" in stdout and "  Mandible     2 / 1 / 0" in stdout
    assert f"manifest test: {output / 'test.csv'} (" in stdout


def test_the_recipe_manifest_names_each_organ_once_and_never_a_test_patient(converted):
    """``recipe.csv`` (what the head-and-neck recipes train on): organs only, one trained phrasing per training
    patient and organ, rotating over the patients; each validation patient's organ by "the NOUN" and by a
    validation paraphrase; no test patient and no test paraphrase at all."""
    _, output, _ = converted
    rows = _rows(output / "recipe.csv")
    names = {value: name for name, value in LABEL_VALUES.items()}
    organs = {organ.name: organ for organ in ORGANS}
    assert {row["case"].split("-")[0] for row in rows} == {"pt_1", "pt_2", "pt_5"}
    assert {row["split"] for row in rows} == {"train", "val"}
    assert all(names[int(row["label_value"])] in organs for row in rows)  # no planning target volume
    pairs = [(row["case"].split("-")[0], names[int(row["label_value"])], row["split"]) for row in rows]
    training = [pair for pair in pairs if pair[2] == "train"]
    assert len(training) == len(set(training))  # each organ named once per training patient
    validation = [pair for pair in pairs if pair[2] == "val"]
    assert len(validation) == 2 * len(set(validation))  # and twice per validation patient
    trainval = {(row["case"].split("-")[0], names[int(row["label_value"])]) for row in _rows(output / "trainval.csv")
                if names[int(row["label_value"])] in organs}
    assert {pair[:2] for pair in pairs} == trainval  # every organ a patient has, no more
    for row in rows:
        structure = organs[names[int(row["label_value"])]]
        assert row["text"] not in structure.paraphrases
        if row["split"] == "val":
            assert row["text"] in (structure.phrasings[0], *structure.validation)
        else:
            assert row["text"] in structure.phrasings
    asked = {names[int(r["label_value"])]: [] for r in rows if r["split"] == "val"}
    for row in rows:
        if row["split"] == "val":
            asked[names[int(row["label_value"])]].append(row["text"])
    assert all(texts[0] == organs[organ].phrasings[0] and texts[1] in organs[organ].validation
               for organ, texts in asked.items())
    checked = _rows(output / "validation_organs.csv")  # the 3D check before a candidate is chosen
    assert {row["case"].split("-")[0] for row in checked} == {"pt_5"} and {r["split"] for r in checked} == {"val"}
    assert sorted((names[int(r["label_value"])], r["text"]) for r in checked) == sorted(
        (organ, text) for organ in asked for text in (organs[organ].phrasings[0], *organs[organ].validation))
    first, second = ({names[int(r["label_value"])]: r["text"] for r in rows if r["case"].startswith(f"{p}-")}
                     for p in ("pt_1", "pt_2"))
    shared = set(first) & set(second)
    assert shared and all(first[s] != second[s] for s in shared)  # the phrasing turns from patient to patient
    cases = read_manifest(output / "recipe.csv")
    assert {case.split for case in cases} == {"train", "val"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - STOPWORDS


def test_synonyms_and_validation_paraphrases_share_no_word_with_the_test_paraphrases():
    """Each organ is trained under four forms of its name and four synonyms and chosen on two validation
    paraphrases; none of these twelve phrasings may carry a word of the organ's two test paraphrases that its name
    does not carry, so the test asks for wording the network was neither trained nor chosen on."""
    for organ in ORGANS:
        name = _words(organ.phrasings[0])
        assert len(organ.phrasings) == 8 and len(set(organ.phrasings)) == 8 and len(organ.validation) == 2
        tested = set().union(*map(_words, organ.paraphrases)) - name
        assert tested, organ.name  # each test paraphrase asks for something beyond the name
        for text in (*organ.phrasings, *organ.validation):
            assert not _words(text) & tested, (organ.name, text)
        assert not {*organ.phrasings, *organ.validation} & set(organ.paraphrases)
        assert not set(organ.phrasings) & set(organ.validation)
    named = {organ.name: (*organ.phrasings, *organ.validation, *organ.paraphrases) for organ in ORGANS}
    assert all("right" not in _words(text) and "dextra" not in text for text in named["LeftParotid"])
    assert all("left" not in _words(text) and "sinistra" not in text for text in named["RightParotid"])


def test_the_evaluation_manifests_ask_for_each_test_organ_three_ways(converted):
    """The test patient's organs asked by their own name, by a neighbour's (parotids swapped) and by a held-out
    paraphrase: one row per organ in each, the label always the organ's own."""
    _, output, _ = converted
    names = {value: name for name, value in LABEL_VALUES.items()}
    organs = {organ.name: organ for organ in ORGANS}
    asked = {}
    for ask in ("right", "swapped", "paraphrase"):
        rows = _rows(output / f"test_organs_{ask}.csv")
        assert {row["case"].split("-")[0] for row in rows} == {"pt_3"} and {row["split"] for row in rows} == {"test"}
        asked[ask] = {names[int(row["label_value"])]: row["text"] for row in rows}
        assert len(asked[ask]) == len(rows)
    contoured = {f.stem for f in (SAMPLE / "pt_3").glob("*.csv")} & set(organs)
    assert set(asked["right"]) == set(asked["swapped"]) == set(asked["paraphrase"]) == contoured
    for organ, text in asked["right"].items():
        assert text == organs[organ].phrasings[0]
        assert asked["paraphrase"][organ] in organs[organ].paraphrases
        assert asked["swapped"][organ] != text and asked["swapped"][organ] in {o.phrasings[0] for o in ORGANS}
    if {"LeftParotid", "RightParotid"} <= contoured:
        assert asked["swapped"]["LeftParotid"] == "the right parotid gland"
        assert asked["swapped"]["RightParotid"] == "the left parotid gland"


def test_absent_organs_are_asked_with_empty_targets_and_the_held_out_ones_never_in_training(converted):
    """``recipe_absent.csv`` is ``recipe.csv`` and two trained absent organs per training patient; the held-out
    absent organs are asked only of validation (``validation_absent.csv``) and test patients (``test_absent.csv``);
    an absent organ's label value is in no label map, so its target is empty on every slice (read through the
    manifest, as training and ``textseg evaluate`` read it)."""
    _, output, _ = converted
    recipe, with_absent = _rows(output / "recipe.csv"), _rows(output / "recipe_absent.csv")
    assert with_absent[: len(recipe)] == recipe
    added = with_absent[len(recipe):]
    assert {row["split"] for row in added} == {"train"} and {row["label_value"] for row in added} == {
        str(ABSENT_LABEL_VALUE)}
    per_patient = {}
    for row in added:
        per_patient.setdefault(row["case"].split("-")[0], []).append(row["text"])
    assert set(per_patient) == {"pt_1", "pt_2"}  # pt_4 has no CT and was skipped; pt_5 validates, pt_3 tests
    assert all(len(set(texts)) == 2 and set(texts) <= set(ABSENT_TRAINED) for texts in per_patient.values())
    assert per_patient["pt_1"] != per_patient["pt_2"]  # rotating over the patients
    assert not set(ABSENT_HELD_OUT) & {row["text"] for row in with_absent}
    assert not set().union(*map(_words, ABSENT_HELD_OUT)) & set().union(*map(_words, ABSENT_TRAINED))
    assert ABSENT_LABEL_VALUE not in LABEL_VALUES.values()
    for name, patient, split in (("validation_absent", "pt_5", "val"), ("test_absent", "pt_3", "test")):
        rows = _rows(output / f"{name}.csv")
        assert {row["case"] for row in rows} == {f"{patient}-organs"} and {row["split"] for row in rows} == {split}
        assert sorted(row["text"] for row in rows) == sorted(ABSENT_HELD_OUT)
    for case in read_manifest(output / "recipe_absent.csv"):
        absent = [t for t in case.case_targets if t.label_value == ABSENT_LABEL_VALUE]
        assert len(absent) == (2 if case.split == "train" and case.label.name == "organs.nrrd" else 0)
        if absent:
            label = read_volume(case.label).array
            assert label.any() and not (label == ABSENT_LABEL_VALUE).any()


def test_chosen_splits_and_limit(converted, tmp_path, capsys):
    source, _, _ = converted
    assert main(["openkbp", "--source", str(source), "--output", str(tmp_path), "--splits", "train", "test",
                 "--limit", "1"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == [
        "recipe.csv", "recipe_absent.csv", "test.csv", "test_absent.csv", "test_organs_paraphrase.csv",
        "test_organs_right.csv", "test_organs_swapped.csv", "test_paraphrases.csv", "train.csv", "trainval.csv"]
    assert {row["case"].split("-")[0] for row in _rows(tmp_path / "trainval.csv")} == {"pt_1"}
    assert not (tmp_path / "train" / "pt_2").exists() and not (tmp_path / "validation").exists()
    assert "validation" not in capsys.readouterr().out
    assert main(["openkbp", "--source", str(source / "test-pats"), "--output", str(tmp_path / "wrong")]) == 1
    error = capsys.readouterr().err
    assert "has none of the folders train-pats, validation-pats, test-pats" in error and "open-kbp" in error
    assert len(error.strip().splitlines()) == 1
    with pytest.raises(VolumeError, match=r"Unknown split\(s\) \['training'\]"):
        convert(source, tmp_path / "unknown", ["training"])
