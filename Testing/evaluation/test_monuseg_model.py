"""The shipped MMRDL trained on MoNuSeg (``monuseg-mmrdl``): fp16 under the 64 MB limit, the data's licence in its
description, and the README's test-set figures reproduced by the command the README gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open
from testkit import MONUSEG

from TextSegLib.app.cli import main
from TextSegLib.engine.catalogue import SHIPPED_MODELS_DIR, Catalogue
from TextSegLib.engine.checkpoints import read_checkpoint_info

MODEL = "monuseg-mmrdl"
README = Path(__file__).parents[2] / "README.md"


def _readme_row() -> list[str]:
    """The cells of the README's MoNuSeg table row for the shipped model."""
    lines = README.read_text(encoding="utf-8").splitlines()
    (line,) = [line for line in lines if line.startswith("|") and f"`{MODEL}`" in line]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_shipped_file_is_fp16_under_64_mb_and_names_the_data_s_licence():
    path = SHIPPED_MODELS_DIR / f"{MODEL}.safetensors"
    assert path.stat().st_size < 64 * 2**20
    info = read_checkpoint_info(path)
    assert info.architecture == "mmrdl" and info.config["use_text"] and info.text_encoder["source"] == "minilm"
    assert "CC BY-NC-SA 4.0" in info.description and "2D" in info.description
    assert info.preprocessing["size"] == [224, 224] and list(info.preprocessing["intensity"]) == ["RGB"]
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()
        floating = {str(handle.get_slice(name).get_dtype()) for name in names} - {"I64"}
    assert floating == {"F16"}
    log = (SHIPPED_MODELS_DIR / f"{MODEL}.log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,") and len(log) - 1 >= info.training["epoch"]
    assert (SHIPPED_MODELS_DIR / f"{MODEL}.toml").is_file()
    assert MODEL in {entry.id for entry in Catalogue().entries() if entry.shipped}


@pytest.mark.parametrize("size, columns", [(["--lvit-size", "224"], (2, 3)), ([], (4, 5))])
def test_the_readme_s_test_figures_come_from_textseg_evaluate(tmp_path, capsys, size, columns):
    """``textseg evaluate --lvit Test_Folder -m monuseg-mmrdl --fp32`` on the 14 test tiles, as LViT scores (224 x
    224) and at full size: the per-image means the README's table gives, to its two decimals."""
    table = tmp_path / "scores.json"
    assert main(["evaluate", "--lvit", str(MONUSEG / "Test_Folder"), *size, "-m", MODEL, "--device", "cpu",
                 "--fp32", "--json", str(table)]) == 0
    capsys.readouterr()
    scores = json.loads(table.read_text(encoding="utf-8"))
    summary = scores["summary"]
    assert len(scores["cases"]) == 14
    row = _readme_row()
    dice, iou = (float(re.sub(r"[^0-9.]", "", row[column])) for column in columns)
    assert 100 * summary["dice"] == pytest.approx(dice, abs=0.006)
    assert 100 * summary["iou"] == pytest.approx(iou, abs=0.006)
