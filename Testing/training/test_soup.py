"""Training/soup.py on the shipped checkpoints: the average is exact, it loads as a checkpoint, and members of
different networks are refused with one line."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from TextSegLib.engine.catalogue import SHIPPED_MODELS_DIR
from TextSegLib.engine.checkpoints import file_sha256, load_checkpoint, read_checkpoint_info, save_like
from Training.soup import main, soup

HEADNECK = SHIPPED_MODELS_DIR / "headneck-freqmedclip-small.safetensors"
ABDOMEN = SHIPPED_MODELS_DIR / "abdomen-freqmedclip-small.safetensors"


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """The head-and-neck model with every floating-point tensor moved by seeded noise, as a second member."""
    network, info = load_checkpoint(HEADNECK)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in network.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=generator))
    path = tmp_path_factory.mktemp("soup") / "shifted.safetensors"
    save_like(path, network, info)
    return path


def test_the_soup_is_the_mean_of_its_members_weights(shifted, tmp_path):
    info = soup([HEADNECK, shifted], tmp_path / "soup.safetensors")
    averaged, loaded = load_checkpoint(tmp_path / "soup.safetensors")
    first, second = load_checkpoint(HEADNECK)[0].state_dict(), load_checkpoint(shifted)[0].state_dict()
    for key, value in averaged.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (first[key] + second[key]) / 2, rtol=0, atol=1e-6)
            assert not torch.equal(value, first[key]) or not first[key].numel()
        else:
            assert torch.equal(value, first[key])
    assert loaded.name == info.name == read_checkpoint_info(HEADNECK).name
    assert [m["sha256"] for m in loaded.training["soup_of"]] == [file_sha256(HEADNECK), file_sha256(shifted)]
    assert loaded.description == read_checkpoint_info(HEADNECK).description
    assert main([str(shifted), str(HEADNECK), "--output", str(tmp_path / "described.safetensors"),
                 "--description", "an average of two runs"]) == 0
    described, described_info = load_checkpoint(tmp_path / "described.safetensors")
    assert described_info.description == "an average of two runs" and described_info.name == info.name
    for key, value in described.state_dict().items():  # the order changes the summary and integer counters only
        assert torch.equal(value, averaged.state_dict()[key]), key
    assert described_info.training["soup_of"][0]["sha256"] == file_sha256(shifted)


def test_a_soup_of_one_network_with_itself_is_that_network(tmp_path):
    soup([HEADNECK, HEADNECK], tmp_path / "same.safetensors")
    same, original = load_checkpoint(tmp_path / "same.safetensors")[0], load_checkpoint(HEADNECK)[0]
    for key, value in same.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key


def test_members_of_different_networks_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="preprocessing"):
        soup([HEADNECK, ABDOMEN], tmp_path / "mixed.safetensors")
    with pytest.raises(ValueError, match="two or more"):
        soup([HEADNECK], tmp_path / "one.safetensors")
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        assert main([str(HEADNECK), str(ABDOMEN), "--output", str(tmp_path / "cli.safetensors")]) == 1
    assert len(errors.getvalue().strip().splitlines()) == 1 and not (tmp_path / "cli.safetensors").exists()
