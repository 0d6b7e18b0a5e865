"""The shipped model and the demo: bundled real cases, `textseg demo` on held-out patient B, the montage, and what
the prompt does on the shipped model."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from testkit import TOTALSEG

from TextSegLib.app.cli import main
from TextSegLib.core.results import MIN_FOUND_ML
from TextSegLib.engine.catalogue import SHIPPED_MODELS_DIR, Catalogue
from TextSegLib.engine.checkpoints import read_checkpoint_info
from TextSegLib.engine.loading import load_model
from TextSegLib.evaluation.demo import CASE_DIRS, DEFAULT_CASE, DEMO_DIR, DEMO_MODEL, demo_case, montage
from TextSegLib.evaluation.metrics import dice
from TextSegLib.evaluation.tables import read_mask
from TextSegLib.io.segnrrd import TAG_FOUND, read_seg_nrrd
from TextSegLib.io.volumes import Volume, labels_on_grid, read_volume
from Training.prompt_effect import patient_b, score_prompts, scored_structures, summarise
from Training.structures import STRUCTURES, label_values

SHIPPED_EPOCHS = 12  # Training/configs/shipped.toml


def test_the_lung2_case_is_the_real_lung2_with_its_licence(data_dir, annotations):
    case = demo_case("lung2")
    assert case["case"] == "lung2" and case["prompt"] == annotations["lung2"]["prompt"]
    assert [t["prompt"] for t in case["targets"]] == [case["prompt"]]
    for name in ("image", "label"):
        assert case[name].read_bytes() == (data_dir / f"lung2_{name}.nrrd").read_bytes()
    assert (DEMO_DIR / "LICENSE.txt").read_text() == (data_dir / "LICENSE.txt").read_text()


def test_patient_b_is_bundled_unchanged_and_asks_for_the_trained_structures():
    case = demo_case("abdomen")
    folder = CASE_DIRS["abdomen"]
    assert DEFAULT_CASE == "abdomen" and demo_case() == case  # the one default, also `textseg demo`'s
    files = sorted(p.name for p in (TOTALSEG / "ct_b_dicom").iterdir())
    assert sorted(p.name for p in case["image"].iterdir()) == files and len(files) == 20
    for name in files:
        assert (case["image"] / name).read_bytes() == (TOTALSEG / "ct_b_dicom" / name).read_bytes()
    for name in ("ct_b_labels.nii.gz", "ct_b_labels.csv", "LICENSE.txt"):
        assert (folder / name).read_bytes() == (TOTALSEG / name).read_bytes()
    values = label_values(folder / "ct_b_labels.csv")
    # Every structure the model was trained on, by its canonical prompt; the absent ones have no label value.
    assert [(t["prompt"], t["label_value"]) for t in case["targets"]] == [
        (s.prompt, values.get(s.name)) for s in STRUCTURES]
    assert {t["structure"] for t in case["targets"] if t["label_value"] is None} == {
        "left kidney", "right kidney", "gallbladder"}


def test_the_shipped_checkpoint_comes_with_its_config_and_log():
    path = SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.safetensors"
    info = read_checkpoint_info(path)
    assert info.architecture == "freqmedclip" and info.text_encoder["source"] == "minilm"
    assert sorted(info.training["train_cases"]) == ["brain1", "brain2", "breast1", "ct_a", "lung1", "lung2", "mr_a"]
    assert info.training["epoch"] == SHIPPED_EPOCHS and info.example_prompts
    assert path.stat().st_size < 20 * 2**20
    log = (SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.log.csv").read_text()
    assert log.count("\n") == SHIPPED_EPOCHS + 1  # header + one line an epoch
    assert (SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.toml").read_text().count(f"epochs = {SHIPPED_EPOCHS}") == 1
    assert sorted(entry.id for entry in Catalogue().entries() if entry.shipped) == [
        DEMO_MODEL, "headneck-freqmedclip-small", "monuseg-mmrdl"]


@pytest.fixture(scope="module")
def abdomen_demo(tmp_path_factory):
    """``textseg demo`` as a user runs it (held-out patient B): its output folder and what it printed."""
    output = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "-o", str(output), "--device", "cpu", "-q"]) == 0
    return output, printed.getvalue()


def _printed_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for target in demo_case("abdomen")["targets"]:
        line = next(line for line in out.splitlines() if line.startswith(target["structure"] + "  "))
        rows[target["structure"]] = line[len(target["structure"]):].split()
    return rows


def test_textseg_demo_scores_held_out_patient_b_in_physical_space(abdomen_demo):
    output, out = abdomen_demo
    assert "This case is held out: the model never saw it." in out
    assert "a silver standard, not manual ground truth" in out
    case = demo_case("abdomen")
    image = read_volume(case["image"])
    labels = labels_on_grid(read_volume(case["label"]), image)
    segments = {segment["name"]: segment for segment in read_seg_nrrd(output / "patient_b.seg.nrrd")["segments"]}
    rows = _printed_rows(out)
    dices = {}
    for target in case["targets"]:
        verdict = rows[target["structure"]]
        tag = segments[target["structure"]]["tags"][TAG_FOUND]
        assert tag.startswith("found" if verdict[4] == "found" else "not found")
        if target["label_value"] is None:
            assert verdict[:2] == ["-", "-"] and "absent from the scan" in " ".join(verdict)
            continue
        printed = float(verdict[0])
        mask, _ = read_mask(output / "patient_b.seg.nrrd", target["structure"])
        assert printed == pytest.approx(dice(mask, labels == target["label_value"]), abs=5e-4)
        dices[target["structure"]] = printed
    mean = float(re.search(r"Mean Dice over the 9 structures in the scan: (\d\.\d+)", out).group(1))
    assert mean == pytest.approx(np.mean(list(dices.values())), abs=1e-3)
    # Regression guards for the shipped model on the held-out patient (measured: mean 0.257, liver 0.892).
    assert mean > 0.2
    assert dices["liver"] > 0.8
    picture = Image.open(output / "patient_b_montage.png")
    assert picture.mode == "RGB" and picture.size[0] == 4 * 224 and picture.size[1] > 3 * 224


def test_the_written_segmentation_overlays_the_label_file_in_physical_space(abdomen_demo):
    """Read back with SimpleITK, the .seg.nrrd has the DICOM series' geometry, and the label file resampled onto it
    by SimpleITK (not by TextSeg) agrees with the liver segment as the printed Dice says; the raw arrays do not."""
    output, out = abdomen_demo
    series = read_volume(demo_case("abdomen")["image"])
    written = sitk.ReadImage(str(output / "patient_b.seg.nrrd"))
    assert written.GetSize() == series.size_ijk
    np.testing.assert_allclose(written.GetOrigin(), series.origin, atol=1e-3)
    np.testing.assert_allclose(np.reshape(written.GetDirection(), (3, 3)), series.direction, atol=1e-6)
    np.testing.assert_allclose(written.GetSpacing(), series.spacing, atol=1e-5)
    liver, _ = read_mask(output / "patient_b.seg.nrrd", "liver")
    labels = sitk.ReadImage(str(demo_case("abdomen")["label"]))
    resampled = sitk.GetArrayFromImage(sitk.Resample(labels, written[:, :, :, 0] if written.GetDimension() == 4
                                                     else written, sitk.Transform(), sitk.sitkNearestNeighbor))
    printed = float(_printed_rows(out)["liver"][0])
    assert dice(liver, resampled == 5) == pytest.approx(printed, abs=5e-4)
    assert dice(liver, sitk.GetArrayFromImage(labels) == 5) < printed - 0.2  # the flipped raw array is elsewhere


def test_absent_structures_are_reported_not_found(abdomen_demo):
    _, out = abdomen_demo
    rows = _printed_rows(out)
    absent = [name for name, row in rows.items() if "absent" in " ".join(row)]
    said_not_found = [name for name in absent if rows[name][4] == "not"]
    assert said_not_found == absent and len(absent) == 3
    assert "Said \"not found\" for" in out


def test_textseg_demo_lung2(tmp_path, capsys):
    assert main(["demo", "--case", "lung2", "-o", str(tmp_path), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "not a held-out result" in out  # lung2 is a training case of the shipped model, and it says so
    prediction, _ = read_mask(tmp_path / "lung2.seg.nrrd")
    reference, _ = read_mask(DEMO_DIR / "lung2_label.nrrd")
    row = next(line for line in out.splitlines() if line.startswith("lesion  "))
    printed = float(row.split()[1])
    assert printed == pytest.approx(dice(prediction, reference), abs=5e-4)
    assert row.split()[5] == ("found" if prediction.sum() * np.prod(read_volume(DEMO_DIR / "lung2_image.nrrd").spacing)
                              / 1000 >= MIN_FOUND_ML else "not")
    image = Image.open(tmp_path / "lung2_montage.png")
    assert image.mode == "RGB" and image.size[0] == 4 * 224 and image.size[1] > 224


def test_the_right_prompt_beats_a_swapped_one_on_the_shipped_model():
    """Patient B's structures, each asked for by its own prompt and by another structure's
    (``Training/prompt_effect.py``'s swap): a network that followed the image alone would find the same organ
    either way. The shipped model must not: the right prompt scores higher."""
    volume, labels, values = patient_b()
    rows = score_prompts(load_model(DEMO_MODEL, "cpu"), volume, labels, values, scored_structures(),
                         ["right", "swapped"])
    mean = summarise(rows)[-1]
    assert mean["right"] > mean["swapped"] + 0.2, summarise(rows)
    assert mean["p_right"] > mean["p_swapped"]


def test_montage_is_in_the_radiological_convention_whatever_the_axis_order(tmp_path):
    """The same patient stored with the i axis reversed gives the same picture."""
    volume = read_volume(demo_case("lung2")["image"])
    label = read_volume(demo_case("lung2")["label"]).array
    slab = Volume.from_sitk(volume.to_sitk()[:, :, 18:22])
    mask = label[18:22]
    flipped_image = sitk.Flip(slab.to_sitk(), (True, False, False))  # same physical image, i reversed
    flipped = Volume.from_sitk(flipped_image)
    assert not np.array_equal(flipped.array, slab.array)
    first = montage(slab, mask, mask, tmp_path / "a.png", "a")
    second = montage(flipped, mask[:, :, ::-1], mask[:, :, ::-1], tmp_path / "b.png", "a")
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
