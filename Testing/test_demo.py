"""The shipped demo: bundled real case, trained checkpoint, `textseg demo`, the montage."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from TextSegLib.checkpoints import SHIPPED_MODELS_DIR, Catalogue, read_checkpoint_info
from TextSegLib.cli import main
from TextSegLib.demo import DEMO_DIR, DEMO_MODEL, demo_case, montage
from TextSegLib.evaluation import read_mask
from TextSegLib.metrics import dice
from TextSegLib.volumes import Volume, read_volume


def test_the_demo_case_is_the_real_lung2_with_its_licence(data_dir, annotations):
    case = demo_case()
    assert case["case"] == "lung2" and case["prompt"] == annotations["lung2"]["prompt"]
    for name in ("image", "label"):
        assert case[name].read_bytes() == (data_dir / f"lung2_{name}.nrrd").read_bytes()
    assert (DEMO_DIR / "LICENSE.txt").read_text() == (data_dir / "LICENSE.txt").read_text()


def test_the_demo_checkpoint_is_shipped_with_its_config_and_log():
    path = SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.safetensors"
    info = read_checkpoint_info(path)
    assert info.architecture == "texlivernet" and info.text_encoder["source"] == "minilm"
    assert sorted(info.training["train_cases"]) == ["brain1", "brain2", "breast1", "lung1", "lung2"]
    assert info.training["epoch"] == 80 and info.example_prompts
    assert path.stat().st_size < 20 * 2**20
    assert (SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.log.csv").read_text().count("\n") == 81  # header + 80 epochs
    assert (SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.toml").is_file()
    assert [entry.id for entry in Catalogue().entries() if entry.shipped] == [DEMO_MODEL]


def test_textseg_demo(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Prompt: \"a large soft-tissue mass in the posterior left lower lung\"" in out
    assert "not a held-out result" in out  # lung2 is a training case of the demo model, and it says so
    seg, png = tmp_path / "lung2.seg.nrrd", tmp_path / "lung2_montage.png"
    prediction, _ = read_mask(seg)
    reference, _ = read_mask(DEMO_DIR / "lung2_label.nrrd")
    printed = float(out.split("Dice ")[1].split()[0])
    assert printed == pytest.approx(dice(prediction, reference), abs=5e-4)
    # A regression guard for the shipped, trained model on the case it was trained on (measured: 0.949).
    assert printed > 0.9
    image = Image.open(png)
    assert image.mode == "RGB" and image.size[0] == 4 * 224 and image.size[1] > 224


def test_montage_is_in_the_radiological_convention_whatever_the_axis_order(tmp_path):
    """The same patient stored with the i axis reversed gives the same picture."""
    volume = read_volume(demo_case()["image"])
    label = read_volume(demo_case()["label"]).array
    slab = Volume.from_sitk(volume.to_sitk()[:, :, 18:22])
    mask = label[18:22]
    flipped_image = sitk.Flip(slab.to_sitk(), (True, False, False))  # same physical image, i reversed
    flipped = Volume.from_sitk(flipped_image)
    assert not np.array_equal(flipped.array, slab.array)
    first = montage(slab, mask, mask, tmp_path / "a.png", "a")
    second = montage(flipped, mask[:, :, ::-1], mask[:, :, ::-1], tmp_path / "b.png", "a")
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
