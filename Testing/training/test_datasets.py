"""Dataset formats: the 3D-IRCADb converter and LViT's 2D layout, on real slices."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from testkit import MONUSEG_TILES, monuseg_folder, write_dicom_series

from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.io.images import lvit_mask, read_mask_2d
from TextSegLib.io.manifests import ManifestError, read_manifest
from TextSegLib.models.registry import get_spec
from Training.config import load_config
from Training.convert_ircadb import convert
from Training.data import Lvit2DDataset, SliceDataset
from Training.distributed import Context
from Training.trainer import Trainer


@pytest.fixture(scope="module")
def ircadb(tmp_path_factory, data_dir):
    """Two patients in 3D-IRCADb's layout made from real lung2 slices: a CT series, two tumour masks and a liver
    mask (ignored), one patient's masks zipped as the original distribution ships them."""
    import shutil

    root = tmp_path_factory.mktemp("ircadb")
    crop = (slice(312, 408), slice(318, 414), slice(12, 28))  # i, j, k around the lesion, with empty slices
    image = sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))[crop]
    label = sitk.ReadImage(str(data_dir / "lung2_label.nrrd"))[crop]
    ct = sitk.Cast(image, sitk.sitkInt16)
    lesion = sitk.GetArrayFromImage(label) != 0
    halves = [lesion.copy(), lesion.copy()]
    halves[0][:, :, 48:] = False
    halves[1][:, :, :48] = False
    assert halves[0].any() and halves[1].any()
    for number in (1, 2):
        patient = root / f"3Dircadb1.{number}"
        write_dicom_series(ct, patient / "PATIENT_DICOM")
        for name, mask in (("livertumor01", halves[0]), ("livertumor02", halves[1]),
                           ("liver", np.ones_like(lesion))):
            mask_image = sitk.GetImageFromArray((mask * 255).astype(np.int16))
            mask_image.CopyInformation(ct)
            write_dicom_series(mask_image, patient / "MASKS_DICOM" / name)
        if number == 2:
            shutil.make_archive(str(patient / "MASKS_DICOM"), "zip", patient, "MASKS_DICOM")
            shutil.rmtree(patient / "MASKS_DICOM")
    return root, sitk.GetArrayFromImage(ct), halves


@pytest.mark.parametrize("per_lesion", [False, True])
def test_ircadb_conversion(ircadb, tmp_path, per_lesion):
    root, ct, halves = ircadb
    out = tmp_path / "converted"
    converted = convert(root, out, per_lesion=per_lesion)
    assert [p["case"] for p in converted] == ["ircadb1_1", "ircadb1_2"]
    for patient in ("ircadb1_1", "ircadb1_2"):
        image = sitk.ReadImage(str(out / f"{patient}_image.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{patient}_label.nrrd")))
        if per_lesion:
            np.testing.assert_array_equal(label == 1, halves[0])
            np.testing.assert_array_equal(label == 2, halves[1])
        else:
            np.testing.assert_array_equal(label == 1, halves[0] | halves[1])
            assert set(np.unique(label)) == {0, 1}  # the liver mask is not a lesion
    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == (4 if per_lesion else 2) and all(row["text"] == "" for row in rows)
    with pytest.raises(ManifestError, match="no text"):
        read_manifest(out / "manifest.csv")
    with open(out / "slices.csv", newline="") as handle:
        slices = list(csv.DictReader(handle))
    assert len(slices) == 2 * ct.shape[0]
    present = (halves[0] | halves[1]).reshape(ct.shape[0], -1).any(axis=1)
    assert [int(r["has_lesion"]) for r in slices[: ct.shape[0]]] == present.astype(int).tolist()
    assert 0 < present.sum() < ct.shape[0]  # slices with and without lesion
    # Filled in, the manifest trains: per-lesion rows give one target each.
    text = (out / "manifest.csv").read_text().splitlines()
    filled = [text[0]] + [row.replace(",,CT", f",tumour {n},CT") for n, row in enumerate(text[1:])]
    (out / "manifest.csv").write_text("\n".join(filled) + "\n")
    cases = read_manifest(out / "manifest.csv")
    dataset = SliceDataset(cases, Preprocessing.from_metadata(get_spec("texlivernet").default_preprocessing),
                           slices="lesion")
    assert {item.label_value for item in dataset.items} == ({1, 2} if per_lesion else {None})


@pytest.fixture(scope="module")
def lvit_folder(tmp_path_factory, data_dir):
    """LViT's layout (img/, labelcol/ with mask_ names, a text table) from real brain1 MR slices."""
    root = tmp_path_factory.mktemp("lvit")
    (root / "img").mkdir()
    (root / "labelcol").mkdir()
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "brain1_image.nrrd"))).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "brain1_label.nrrd"))) != 0
    rows = []
    for k in range(8, 16):
        grey = np.clip(image[k] / np.percentile(image, 99.5) * 255, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(grey), str(root / "img" / f"brain1_{k}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(label[k].astype(np.uint8) * 255),
                        str(root / "labelcol" / f"mask_brain1_{k}.png"))
        rows.append((f"brain1_{k}.png", f"an enhancing lesion, slice {k}", "p1" if k < 12 else "p2"))
    with open(root / "text.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image", "Description", "Patient"])
        writer.writerows(rows)
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["Image", "Description"])
    for name, text, _ in rows:
        book.active.append([name, text])
    book.save(root / "text.xlsx")
    return root, label


def test_lvit_layout(lvit_folder):
    root, label = lvit_folder
    preprocessing = Preprocessing.from_metadata({"size": [224, 224], "intensity": {
        "XR": {"kind": "window", "low": 0.0, "high": 255.0}}})
    for table in ("text.csv", "text.xlsx"):
        dataset = Lvit2DDataset(root / "img", root / "labelcol", root / table, preprocessing, "mask_{name}")
        assert len(dataset) == 8
        item = dataset[3]
        assert item["image"].shape == (1, 224, 224) and item["image"].min() >= 0.0 and item["image"].max() <= 1.0 + 1e-6
        assert item["text"] == "an enhancing lesion, slice 11"
        assert (item["target"].sum() > 0) == bool(label[11].any())
    assert dataset[0]["case"] == "brain1_8.png" and Lvit2DDataset(
        root / "img", root / "labelcol", root / "text.csv", preprocessing, "mask_{name}")[0]["case"] == "p1"
    with pytest.raises(ManifestError, match="does not exist"):
        Lvit2DDataset(root / "img", root / "labelcol", root / "text.csv", preprocessing, "{name}")


def test_lvit_layout_needs_one_normalisation_for_its_images(lvit_folder):
    """The 2D layout names no modality: with entries for CT and MR (MMRDL's defaults, CT first) the 8-bit images
    would go through the CT lung window and come out almost constant; such a preprocessing is refused."""
    root, _ = lvit_folder
    two = Preprocessing.from_metadata(get_spec("mmrdl").default_preprocessing)
    with pytest.raises(ValueError, match=r"exactly one intensity entry.*\(it has CT, MR\)"):
        Lvit2DDataset(root / "img", root / "labelcol", root / "text.csv", two, "mask_{name}")


def test_training_on_the_lvit_layout_splits_by_patient(lvit_folder, tmp_path):
    root, _ = lvit_folder
    config = load_config(None, [
        "model.architecture=\"texlivernet\"", "model.preset=\"small\"", "text.encoder=\"minilm\"",
        f"data.lvit_images=\"{root / 'img'}\"", f"data.lvit_masks=\"{root / 'labelcol'}\"",
        f"data.lvit_texts=\"{root / 'text.csv'}\"", "data.lvit_mask_name=\"mask_{name}\"", "data.val_fraction=0.5",
        "data.preprocessing={size=[64, 64], intensity={XR={kind=\"window\", low=0.0, high=255.0}}}",
        "train.epochs=1", "train.batch_size=2", "train.max_steps=1"])
    trainer = Trainer(config, tmp_path / "run", Context(0, 1, 0, torch.device("cpu")))
    assert sorted([*trainer.train_cases, *trainer.val_cases]) == ["p1", "p2"]
    assert len(trainer.train_cases) == len(trainer.val_cases) == 1
    progress = trainer.fit()
    assert progress["steps"] == 1 and (tmp_path / "run" / "model.safetensors").is_file()


def test_lvit_layout_gives_rgb_networks_the_colours(tmp_path):
    """Real H&E tiles reach a 3-channel network in colour (they were greyed by channel mean and the grey repeated),
    and a 1-channel network as the mean of the colours; the test tile is a TIFF its table names .png."""
    folder = monuseg_folder(tmp_path / "two")
    spec = {"size": [224, 224], "intensity": {"RGB": {"kind": "window", "low": 0.0, "high": 255.0}}}
    colour = Lvit2DDataset(folder / "img", folder / "labelcol", folder / "text.csv",
                           Preprocessing.from_metadata(spec, channels=3))
    grey = Lvit2DDataset(folder / "img", folder / "labelcol", folder / "text.csv", Preprocessing.from_metadata(spec))
    assert [row[0].suffix for row in colour.rows] == [".png", ".tif"] and len(MONUSEG_TILES) == 2
    for index in range(2):
        item = colour[index]
        image = item["image"]
        assert image.shape == (3, 224, 224)
        assert (image[0] - image[2]).abs().mean() > 0.05  # red and blue differ in H&E
        torch.testing.assert_close(grey[index]["image"], image.mean(dim=0, keepdim=True), atol=1e-5, rtol=0)
        assert 0.05 < float(item["target"].mean()) < 0.5


def test_lvit_layout_shrinks_masks_by_the_rule_asked(tmp_path):
    """``mask_rule="lvit"`` (the MoNuSeg recipes) gives the targets LViT trains and tests on, each nucleus grown by
    the pixels it touches; the default keeps pixels at least half covered; another rule is refused."""
    folder = monuseg_folder(tmp_path / "two")
    spec = {"size": [224, 224], "intensity": {"RGB": {"kind": "window", "low": 0.0, "high": 255.0}}}
    preprocessing = Preprocessing.from_metadata(spec, channels=3)
    args = (folder / "img", folder / "labelcol", folder / "text.csv", preprocessing)
    majority, lvit = Lvit2DDataset(*args), Lvit2DDataset(*args, mask_rule="lvit")
    for index, (_, mask, _, _) in enumerate(lvit.rows):
        target = lvit[index]["target"]
        assert target.shape == (1, 224, 224)
        np.testing.assert_array_equal(target[0].numpy() != 0, lvit_mask(read_mask_2d(mask), (224, 224)))
        smaller = majority[index]["target"]
        assert float((smaller * target).sum() / smaller.sum()) > 0.97  # nearly every half-covered pixel is kept
        assert float(target.mean()) > float(smaller.mean()) * 1.05
    with pytest.raises(ValueError, match="lvit_mask_rule"):
        Lvit2DDataset(*args, mask_rule="nearest")
