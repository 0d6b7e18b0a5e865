"""Noise on the text features in training (``augment.text_noise``): its size, its randomness, and that only training
steps see it, on the real MiniLM features of real prompts."""

from __future__ import annotations

import pytest
import torch
from testkit import CONFIGS, SHORT, write_manifest

from TextSegLib.text.sources import load_text_encoder
from Training.config import load_config
from Training.data import perturb_text
from Training.distributed import Context
from Training.trainer import Trainer

PROMPTS = ["the left parotid gland", "the mandible", "segment the spinal cord", "the larynx organ at risk"]


@pytest.fixture(scope="module")
def features():
    return load_text_encoder("minilm").encode(PROMPTS)


@pytest.mark.parametrize("scale", [0.25, 0.75])
def test_the_noise_is_the_asked_share_of_each_vector_s_length(features, scale):
    noisy = perturb_text(features, torch.Generator().manual_seed(0), scale)
    cosine = torch.nn.functional.cosine_similarity(noisy.pooled, features.pooled, dim=-1)
    assert torch.allclose(cosine, torch.full_like(cosine, (1 + scale**2) ** -0.5), atol=0.04), cosine
    shift = (noisy.pooled - features.pooled).norm(dim=-1) / features.pooled.norm(dim=-1)
    assert torch.allclose(shift, torch.full_like(shift, scale), rtol=0.15), shift
    moved = (noisy.tokens - features.tokens).norm(dim=-1)
    assert torch.equal(moved > 0, features.mask)  # every real token moves, padding stays as it was
    assert torch.equal(noisy.mask, features.mask)


def test_the_noise_comes_from_the_generator(features):
    first = perturb_text(features, torch.Generator().manual_seed(3), 0.5)
    again = perturb_text(features, torch.Generator().manual_seed(3), 0.5)
    generator = torch.Generator().manual_seed(3)
    perturb_text(features, generator, 0.5)
    second_draw = perturb_text(features, generator, 0.5)
    assert torch.equal(first.pooled, again.pooled) and torch.equal(first.tokens, again.tokens)
    assert not torch.allclose(first.pooled, second_draw.pooled)


def test_no_noise_leaves_the_features_and_negative_noise_is_refused(features):
    assert perturb_text(features, torch.Generator(), 0.0) is features
    with pytest.raises(ValueError, match=r"augment\.text_noise"):
        perturb_text(features, torch.Generator(), -0.1)


def test_training_steps_see_the_noise_and_validation_does_not(tmp_path, data_dir, annotations):
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain1", "breast1"], annotations)
    config = load_config(CONFIGS / "texlivernet.toml", [f"data.manifest=\"{manifest}\"", *SHORT,
                                                         "data.val_fraction=0", "augment.text_noise=0.5"])
    trainer = Trainer(config, tmp_path / "run", Context(0, 1, 0, torch.device("cpu")))
    batch = next(iter(trainer.loader))
    images, texts = batch["image"], list(batch["text"])
    trainer.network.eval()
    with torch.no_grad():
        plain = trainer._outputs(images, texts)["logits"]
        assert torch.equal(trainer._outputs(images, texts)["logits"], plain)
        trainer.network.train()
        torch.manual_seed(0)
        noisy = trainer._outputs(images, texts)["logits"]
        torch.manual_seed(0)
        noisy_again = trainer._outputs(images, texts)["logits"]
    assert not torch.allclose(noisy, noisy_again)  # a fresh draw each step (dropout is reseeded alike)
