"""2D pictures and LViT's layout on real MoNuSeg tiles: colour kept, masks binary, tables matched by base name."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from testkit import MONUSEG, MONUSEG_TILES, monuseg_folder

from TextSegLib.engine.preprocessing import IntensitySpec, Preprocessing
from TextSegLib.io.images import lvit_folder, lvit_mask, read_image_2d, read_mask_2d, write_mask_2d
from TextSegLib.io.manifests import ManifestError
from TextSegLib.io.volumes import VolumeError


def test_tiles_are_read_in_colour_and_masks_as_binary():
    items = {i.name: i for split, _ in MONUSEG_TILES for i in lvit_folder(MONUSEG / split)}
    for _, name in MONUSEG_TILES:
        item = items[name]
        image = read_image_2d(item.image)
        assert image.shape == (3, 1000, 1000) and image.dtype == np.float32
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(item.image)))  # (H, W, 3)
        np.testing.assert_array_equal(image, raw.transpose(2, 0, 1))
        assert np.abs(image[0] - image[2]).mean() > 10  # H&E: red and blue differ, nothing was greyed
        mask = read_mask_2d(item.mask)
        assert mask.shape == (1000, 1000) and mask.dtype == bool and 0.05 < mask.mean() < 0.5


def test_lvit_folder_matches_tiff_images_by_base_name():
    items = lvit_folder(MONUSEG / "Test_Folder")
    assert len(items) == 14
    assert all(i.image.suffix == ".tif" and i.mask.suffix == ".png" for i in items)
    first = next(i for i in items if i.name == "TCGA-2Z-A9J9-01A-01-TS1.png")
    assert first.text == "The nuclei are sparsely distributed."
    assert [len(lvit_folder(MONUSEG / f"{s}_Folder")) for s in ("Train", "Val")] == [24, 6]


def test_an_incomplete_folder_is_refused_in_one_line(tmp_path):
    folder = monuseg_folder(tmp_path / "two")
    (folder / "labelcol" / "TCGA-21-5784-01Z-00-DX1.png").unlink()
    with pytest.raises(ManifestError, match=r"^text.csv: .*labelcol/TCGA-21-5784-01Z-00-DX1.png does not exist"):
        lvit_folder(folder)
    with pytest.raises(ManifestError, match="has no img/ or labelcol/ folder"):
        lvit_folder(MONUSEG)
    with pytest.raises(VolumeError, match="not a PNG, TIFF"):
        read_image_2d(folder / "text.csv")


def test_preprocessing_keeps_colour_for_rgb_networks_and_greys_it_for_grey_ones():
    """What the network gets from a real tile: each colour resized on its own (RGB model), or their mean (grey
    model); the old preparation took one channel only and so greyed every picture before."""
    image = read_image_2d(MONUSEG / "Train_Folder" / "img" / MONUSEG_TILES[0][1])
    spec = {"RGB": IntensitySpec("window", 0.0, 255.0)}
    mapping = spec["RGB"].mapping(image)
    batch = torch.from_numpy(image)[None]
    expected = torch.nn.functional.interpolate(batch / 255.0, size=(224, 224), mode="bilinear", align_corners=False,
                                               antialias=True)
    rgb = Preprocessing((224, 224), spec, channels=3).prepare(batch, mapping)
    torch.testing.assert_close(rgb, expected, atol=1e-5, rtol=0)
    grey = Preprocessing((224, 224), spec, channels=1).prepare(batch, mapping)
    torch.testing.assert_close(grey, expected.mean(dim=1, keepdim=True), atol=1e-5, rtol=0)


def test_written_masks_are_8_bit_0_and_255(tmp_path):
    mask = read_mask_2d(MONUSEG / "Train_Folder" / "labelcol" / MONUSEG_TILES[0][1])
    write_mask_2d(tmp_path / "m.png", mask)
    written = sitk.ReadImage(str(tmp_path / "m.png"))
    assert written.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    array = sitk.GetArrayFromImage(written)
    assert set(np.unique(array)) == {0, 255}
    np.testing.assert_array_equal(array != 0, mask)


@pytest.mark.parametrize("size", [(224, 224), (256, 200)])
def test_lvit_mask_is_what_lvits_loader_makes_with_opencv(size):
    """LViT's Load_Dataset.py shrinks a mask with ``cv2.resize`` (bilinear) and keeps every pixel above 0: the same
    pixels on every MoNuSeg mask, and more foreground than a majority rule (each nucleus grows)."""
    import cv2

    masks = sorted(MONUSEG.glob("*_Folder/labelcol/*.png"))
    assert len(masks) == 44
    for path in masks:
        expected = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), size[::-1]) > 0  # cv2 takes (W, H)
        shrunk = lvit_mask(read_mask_2d(path), size)
        assert shrunk.shape == size and shrunk.dtype == bool
        np.testing.assert_array_equal(shrunk, expected, err_msg=path.name)
        full = read_mask_2d(path)
        assert shrunk.mean() > full.mean()
    np.testing.assert_array_equal(lvit_mask(full, full.shape), full)
