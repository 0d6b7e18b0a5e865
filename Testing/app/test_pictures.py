"""``textseg segment`` and ``textseg evaluate --lvit`` on 2D pictures, end to end on two real MoNuSeg tiles with a
checkpoint that the training code makes from them (small MMRDL, RGB, one tile to train, the other to validate).

Making that checkpoint (two training steps, the MiniLM encoder loaded) takes about 12 s on a busy CI core, once
for the module: it is what proves the recipe's data path, the export and the 2D inference agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from testkit import MONUSEG, MONUSEG_TILES, monuseg_folder, rewrite_metadata

from TextSegLib.app.cli import main
from TextSegLib.engine.loading import load_model
from TextSegLib.io.images import lvit_folder, read_image_2d, read_mask_2d, write_mask_2d

TRAIN_TILE, TEST_TILE = (name.removesuffix(".png") for _, name in MONUSEG_TILES)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return monuseg_folder(tmp_path_factory.mktemp("monuseg") / "two")


@pytest.fixture(scope="module")
def checkpoint(tiles, tmp_path_factory) -> Path:
    """Two steps of Training/train.py: the tiles' own training and validation folders, RGB in, MiniLM text."""
    from Training.train import main as train

    root = tmp_path_factory.mktemp("split")
    for folder, tile in (("train", TRAIN_TILE), ("val", TEST_TILE)):
        (root / folder / "img").mkdir(parents=True)
        (root / folder / "labelcol").mkdir()
        for sub in ("img", "labelcol"):
            for path in (tiles / sub).glob(f"{tile}.*"):
                (root / folder / sub / path.name).symlink_to(path)
        line = next(row for row in (tiles / "text.csv").read_text().splitlines() if row.startswith(tile))
        (root / folder / "text.csv").write_text(f"Image,Description\n{line}\n")
    output = tmp_path_factory.mktemp("run")
    sets = ["model.architecture=\"mmrdl\"", "model.preset=\"small\"", "text.encoder=\"minilm\"",
            "data.preprocessing={size=[224, 224], intensity={RGB={kind=\"window\", low=0.0, high=255.0}}}",
            "train.batch_size=1", "train.epochs=1", "train.max_steps=2", "augment.scale=[1.0, 1.0]"]
    for split, prefix in (("train", "lvit"), ("val", "lvit_val")):
        folder = root / split
        sets += [f"data.{prefix}_images=\"{folder / 'img'}\"", f"data.{prefix}_masks=\"{folder / 'labelcol'}\"",
                 f"data.{prefix}_texts=\"{folder / 'text.csv'}\""]
    assert train(["--config", str(Path(__file__).parents[2] / "Training" / "configs" / "mmrdl-monuseg.toml"),
                  "--output", str(output), *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((output / "config.json").read_text())
    assert summary["data"]["lvit_val_images"].endswith("val/img")
    # Two steps leave every probability on one side of 0.5: the threshold is moved (weights untouched) to where
    # a third of the test tile is inside, so that masks and scores have something to compare.
    item = next(i for i in lvit_folder(tiles) if i.name.startswith(TEST_TILE))
    probability = _probability(output / "model.safetensors", read_image_2d(item.image), item.text)
    calibrated = output / "calibrated.safetensors"
    rewrite_metadata(output / "model.safetensors", calibrated, threshold=float(np.quantile(probability, 0.67)))
    return calibrated


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _probability(checkpoint: Path, image: np.ndarray, text: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The checkpoint's probability, computed here without the engine: colours to [0, 1], 224 x 224, the network,
    logits back to the tile's size (or to ``size``)."""
    model = load_model(checkpoint, "cpu")
    x = F.interpolate(torch.from_numpy(image)[None] / 255.0, size=(224, 224), mode="bilinear", align_corners=False,
                      antialias=True)
    with torch.no_grad():
        logits = model.network(x, model.text_encoder.encode([text]))
    logits = F.interpolate(logits.float(), size=size or image.shape[1:], mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].numpy()


def _by_hand(checkpoint: Path, image: np.ndarray, text: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The mask: the probability above the checkpoint's threshold."""
    return _probability(checkpoint, image, text, size) > load_model(checkpoint, "cpu").info.threshold


def test_segment_writes_one_mask_png_per_picture_on_its_grid(tiles, checkpoint, tmp_path, capsys):
    items = {Path(i.name).stem: i for i in lvit_folder(tiles)}
    out = tmp_path / "masks"
    out.mkdir()
    code, stdout, _ = run(["segment", items[TRAIN_TILE].image, items[TEST_TILE].image, "-p",
                           items[TEST_TILE].text, "-m", checkpoint, "-o", out, "--device", "cpu", "--fp32", "-q"],
                          capsys)
    assert code == 0, stdout
    assert "(RGB)" in stdout and "1000 x 1000" in stdout
    for tile in (TRAIN_TILE, TEST_TILE):
        written = sitk.ReadImage(str(out / f"{tile}.mask.png"))
        assert written.GetSize() == (1000, 1000) and written.GetNumberOfComponentsPerPixel() == 1
        array = sitk.GetArrayFromImage(written)
        assert set(np.unique(array)) <= {0, 255}
        expected = _by_hand(checkpoint, read_image_2d(items[tile].image), items[TEST_TILE].text)
        assert 0.01 < expected.mean() < 0.99  # neither empty nor full: the comparison has something to compare
        assert np.mean((array != 0) != expected) < 1e-3  # equal but where BatchNorm folding moves a pixel across
    code, _, stderr = run(["segment", items[TEST_TILE].image, "-p", "nuclei", "-m", checkpoint, "-o", out,
                           "--probability"], capsys)
    assert code != 0 and stderr.count("\n") == 1 and "--probability" in stderr


def test_evaluate_lvit_scores_each_picture_with_its_own_sentence(tiles, checkpoint, tmp_path, capsys):
    table, markdown = tmp_path / "scores.json", tmp_path / "scores.md"
    code, stdout, _ = run(["evaluate", "--lvit", tiles, "-m", checkpoint, "--device", "cpu", "--fp32", "--json",
                           table, "--markdown", markdown], capsys)
    assert code == 0, stdout
    assert "HD, HD95 and ASSD are in pixels." in stdout  # pictures carry no pixel size
    assert "| HD (px) | HD95 (px) | ASSD (px) |" in markdown.read_text() and "(mm)" not in markdown.read_text()
    scores = json.loads(table.read_text())
    assert scores["distance_unit"] == "px"
    rows = {row["case"]: row for row in scores["cases"]}
    assert sorted(rows) == sorted([TRAIN_TILE, TEST_TILE])
    for item in lvit_folder(tiles):
        row = rows[Path(item.name).stem]
        assert row["text"] == item.text
        prediction = _by_hand(checkpoint, read_image_2d(item.image), item.text)
        reference = read_mask_2d(item.mask)
        overlap, predicted, actual = (prediction & reference).sum(), prediction.sum(), reference.sum()
        assert row["dice"] == pytest.approx(2 * overlap / (predicted + actual), abs=2e-3)
        assert row["iou"] == pytest.approx(overlap / (predicted + actual - overlap), abs=2e-3)
    assert scores["summary"]["dice"] == pytest.approx(np.mean([r["dice"] for r in rows.values()]))
    assert scores["summary"]["iou"] == pytest.approx(np.mean([r["iou"] for r in rows.values()]))


def test_evaluate_lvit_at_the_input_size_scores_as_lvits_test_script(tiles, checkpoint, tmp_path, capsys):
    """``--lvit-size 224``: each tile segmented at 224 x 224 and scored there against its mask as LViT's loader
    shrinks it with OpenCV (every pixel above 0 after a bilinear resize), the protocol of MMRDL's Table 1."""
    import cv2

    table = tmp_path / "scores.json"
    code, stdout, _ = run(["evaluate", "--lvit", tiles, "--lvit-size", 224, "-m", checkpoint, "--device", "cpu",
                           "--fp32", "--json", table], capsys)
    assert code == 0, stdout
    rows = {row["case"]: row for row in json.loads(table.read_text())["cases"]}
    full = {row["case"]: row for row in _scores(tiles, checkpoint, tmp_path, capsys)}
    for item in lvit_folder(tiles):
        row = rows[Path(item.name).stem]
        reference = cv2.resize(cv2.imread(str(item.mask), cv2.IMREAD_GRAYSCALE), (224, 224)) > 0
        prediction = _by_hand(checkpoint, read_image_2d(item.image), item.text, (224, 224))
        overlap, predicted = (prediction & reference).sum(), prediction.sum()
        assert row["reference_voxels"] == reference.sum() and row["prediction_voxels"] <= 224 * 224
        assert row["dice"] == pytest.approx(2 * overlap / (predicted + reference.sum()), abs=2e-3)
        assert row["dice"] != pytest.approx(full[row["case"]]["dice"], abs=1e-3)  # another protocol, another score
    for wrong in (["--lvit-size", "0"], ["--lvit-size", "224", tiles / "labelcol", tiles / "labelcol"]):
        code, _, stderr = run(["evaluate", *wrong, *([] if len(wrong) > 2 else ["--lvit", tiles]), "-m", checkpoint],
                              capsys)
        assert code != 0 and stderr.count("\n") == 1 and "--lvit-size" in stderr


def _scores(tiles: Path, checkpoint: Path, tmp_path: Path, capsys) -> list[dict]:
    """``textseg evaluate --lvit`` at the tiles' own size: its rows."""
    table = tmp_path / "full.json"
    assert run(["evaluate", "--lvit", tiles, "-m", checkpoint, "--device", "cpu", "--fp32", "--json", table],
               capsys)[0] == 0
    return json.loads(table.read_text())["cases"]


def test_an_fp16_copy_segments_as_the_checkpoint_does(tiles, checkpoint, tmp_path, capsys):
    """Training/half.py: half the file, the same settings, and on both real tiles the same masks (Dice above 0.99)
    but for pixels at the threshold; a weight fp16 cannot hold stops it with one line and no file."""
    from TextSegLib.engine.checkpoints import load_checkpoint, read_checkpoint_info, save_checkpoint
    from Training.half import main as half

    copy = tmp_path / "half.safetensors"
    assert half([str(checkpoint), str(copy), "--description", "Nuclei; CC BY-NC-SA 4.0"]) == 0
    assert copy.stat().st_size < 0.55 * checkpoint.stat().st_size
    original, halved = read_checkpoint_info(checkpoint), read_checkpoint_info(copy)
    assert (halved.config, halved.threshold, halved.preprocessing) == (original.config, original.threshold,
                                                                        original.preprocessing)
    assert halved.description == "Nuclei; CC BY-NC-SA 4.0" and original.description != halved.description
    for item in lvit_folder(tiles):
        image = read_image_2d(item.image)
        full, reduced = _by_hand(checkpoint, image, item.text), _by_hand(copy, image, item.text)
        assert 0.01 < full.mean() < 0.99  # a two-step network: its probabilities crowd the threshold
        assert 2 * (full & reduced).sum() / (full.sum() + reduced.sum()) > 0.99
    assert half([str(checkpoint), str(copy)]) == 1 and "--overwrite" in capsys.readouterr().err
    network, info = load_checkpoint(checkpoint)
    next(network.parameters()).data.view(-1)[0] = 1e6
    with pytest.raises(ValueError, match="beyond 65504"):
        save_checkpoint(tmp_path / "big.safetensors", network, architecture=info.architecture,
                        text_encoder=info.text_encoder, preprocessing=info.preprocessing, weights_dtype=torch.float16)
    assert not (tmp_path / "big.safetensors").exists()


@pytest.mark.parametrize("removed, added", [(5000, 0), (3000, 7000)])
def test_dice_and_iou_of_a_real_mask_with_a_known_perturbation(tmp_path, capsys, removed, added):
    """A real MoNuSeg mask against itself with ``removed`` of its pixels dropped and ``added`` background pixels
    set: Dice = 2(n - r) / (2n - r + a), IoU = (n - r) / (n + a)."""
    reference = read_mask_2d(MONUSEG / "Test_Folder" / "labelcol" / f"{TEST_TILE}.png")
    flat = reference.copy().reshape(-1)
    inside, outside = np.flatnonzero(flat), np.flatnonzero(~flat)
    flat[inside[:removed]] = False
    flat[outside[::7][:added]] = True
    write_mask_2d(tmp_path / "prediction.png", flat.reshape(reference.shape))
    write_mask_2d(tmp_path / "reference.png", reference)
    code, stdout, _ = run(["evaluate", tmp_path / "prediction.png", tmp_path / "reference.png", "--json",
                           tmp_path / "s.json"], capsys)
    assert code == 0, stdout
    row = json.loads((tmp_path / "s.json").read_text())["cases"][0]
    n = int(reference.sum())
    assert row["dice"] == pytest.approx(2 * (n - removed) / (2 * n - removed + added), rel=1e-9)
    assert row["iou"] == pytest.approx((n - removed) / (n + added), rel=1e-9)
