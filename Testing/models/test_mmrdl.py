"""MMRDL: its blocks (Fourier prompt, Gaussians and KL, tokens, U-shape stages), the whole network, its ablation
switches, loss, checkpoints, and `textseg segment` on the real lung2 CT."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
import torch.nn.functional as F
from testkit import DATA, assert_same_grid, check_shape_and_gradients

from TextSegLib.app.cli import main
from TextSegLib.engine.checkpoints import file_sha256, load_checkpoint, read_checkpoint_info, save_checkpoint
from TextSegLib.io.segnrrd import TAG_CHECKPOINT, TAG_MODEL, TAG_PROMPT, decode_tag
from TextSegLib.models.blocks.distribution import DistributionFusion, gaussian_from_set, gaussian_kl, reparameterise
from TextSegLib.models.blocks.fourier import FrequencyPromptEncoder, amplitude_and_phase, spectrum_features
from TextSegLib.models.blocks.tokens import (
    PatchEmbedding,
    TextTokenProjection,
    TokenConvBN,
    TokenUNet,
    TransformerBlock,
    tokens_to_map,
)
from TextSegLib.models.blocks.ushape import DownStage, PixelLevelAttention, TokenReconstruct, UpStage
from TextSegLib.models.mmrdl import MMRDL, MMRDLConfig
from TextSegLib.models.registry import architectures, config_from_dict, create_model, get_spec, preset_config
from TextSegLib.text.features import TextFeatures
from TextSegLib.text.sources import load_text_encoder

PROMPT = "a large soft-tissue mass in the posterior left lower lung"
TINY = {"widths": (8, 8, 16, 16, 16), "processor_widths": (4, 8, 12, 16), "processor_heads": 2,
        "prompt_widths": (4, 8), "image_size": 64, "text_dim": 24, "max_text_tokens": 12, "num_learnable": 6,
        "in_channels": 1}


def random_text(batch: int, length: int = 9, dim: int = 24, seed: int = 0) -> TextFeatures:
    generator = torch.Generator().manual_seed(seed)
    return TextFeatures(torch.randn(batch, length, dim, generator=generator),
                        torch.ones(batch, length, dtype=torch.bool), torch.randn(batch, dim, generator=generator))


def tiny(seed: int = 0, **overrides) -> MMRDL:
    torch.manual_seed(seed)
    return create_model("mmrdl", preset_config("mmrdl", "small", **{**TINY, **overrides}))


# ------------------------------------------------------------------------------------------ Fourier prompt


def test_amplitude_and_phase_are_those_of_equation_12_and_recombine_to_the_image():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    amplitude, phase = amplitude_and_phase(image)
    height, width = image.shape[-2:]
    u = torch.arange(height, dtype=torch.float64)
    v = torch.arange(width, dtype=torch.float64)
    rows = torch.exp(-2j * math.pi * u[:, None] * u[None, :] / height)  # e^{-j 2 pi h u / H}
    cols = torch.exp(-2j * math.pi * v[:, None] * v[None, :] / width)
    dft = rows @ image.to(torch.complex128) @ cols / math.sqrt(height * width)  # Eq. 12, orthonormal
    torch.testing.assert_close(amplitude.double(), dft.abs(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.polar(amplitude.double(), phase.double()), dft, atol=1e-5, rtol=1e-5)
    recombined = torch.fft.ifft2(torch.polar(amplitude, phase), norm="ortho")
    torch.testing.assert_close(recombined.real.double(), image, atol=1e-5, rtol=1e-5)
    assert recombined.imag.abs().max() < 1e-5


def test_spectrum_features_choose_phase_amplitude_or_both():
    image = torch.rand(2, 3, 8, 8)
    amplitude, phase = amplitude_and_phase(image)
    torch.testing.assert_close(spectrum_features(image, "phase"), phase / math.pi)
    torch.testing.assert_close(spectrum_features(image, "amplitude"), torch.log1p(amplitude))
    both = spectrum_features(image, "both")
    assert both.shape == (2, 6, 8, 8)
    torch.testing.assert_close(both, torch.cat([torch.log1p(amplitude), phase / math.pi], dim=1))
    assert spectrum_features(image).abs().max() <= 1.0
    with pytest.raises(ValueError, match="unknown spectrum"):
        spectrum_features(image, "power")


@pytest.mark.parametrize(("spectrum", "in_channels"), [("phase", 3), ("amplitude", 3), ("both", 6)])
def test_frequency_prompt_encoder_shapes_gradients_and_stages(spectrum, in_channels):
    torch.manual_seed(0)
    encoder = FrequencyPromptEncoder(3, 10, widths=(4, 8), spectrum=spectrum)
    check_shape_and_gradients(encoder, torch.rand(2, 3, 16, 12), expected=(2, 10, 16, 12))
    kinds = [type(m).__name__ for m in encoder.encode] + [type(m).__name__ for m in encoder.decode]
    assert kinds == ["Conv2d", "LayerNorm2d", "GELU"] * 2 + ["ConvTranspose2d", "LayerNorm2d", "GELU"] * 2  # n = 2
    assert encoder.encode[0].in_channels == in_channels
    assert [encoder.encode[0].stride, encoder.decode[0].stride] == [(2, 2), (2, 2)]
    with pytest.raises(ValueError, match="divisible by 4"):
        encoder(torch.rand(1, 3, 10, 12))


def test_the_phase_prompt_ignores_the_amplitude_and_the_amplitude_prompt_sees_it():
    """Scaling an image scales its amplitude spectrum and leaves its phase spectrum unchanged."""
    torch.manual_seed(0)
    image = torch.rand(1, 1, 16, 16) + 0.1
    phase = FrequencyPromptEncoder(1, 4, spectrum="phase").eval()
    amplitude = FrequencyPromptEncoder(1, 4, spectrum="amplitude").eval()
    with torch.no_grad():
        torch.testing.assert_close(phase(3.0 * image), phase(image), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(amplitude(3.0 * image), amplitude(image), atol=1e-3)


# ---------------------------------------------------------------------------------- Gaussians and the KL


def test_gaussian_from_set_is_equations_5_and_6():
    torch.manual_seed(0)
    text, learnable = torch.randn(3, 5), torch.randn(4, 3, 5)  # F_T and K = 4 learnable features
    mean, std = gaussian_from_set(torch.cat([text[None], learnable]), dim=0, eps=0.0)
    expected_mean = (text + learnable.sum(0)) / 5
    torch.testing.assert_close(mean, expected_mean)
    deviations = torch.cat([text[None], learnable]) - expected_mean
    covariance = torch.einsum("mi,mj->ij", deviations.flatten(1), deviations.flatten(1)) / 5  # Eq. 6
    torch.testing.assert_close(std.square().flatten(), covariance.diagonal())


def test_kl_equals_torch_distributions_is_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(4, 7), torch.randn(4, 7)
    std_p, std_q = torch.rand(4, 7) + 0.1, torch.rand(4, 7) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean_p, std_p),
                                                 torch.distributions.Normal(mean_q, std_q))
    kl = gaussian_kl(mean_p, std_p, mean_q, std_q)
    torch.testing.assert_close(kl, expected)
    assert (kl > 0).all()
    torch.testing.assert_close(gaussian_kl(mean_p, std_p, mean_p, std_p), torch.zeros(4, 7))
    assert (gaussian_kl(mean_p, std_p, mean_p, std_q) > 0).all()  # equal means, different deviations
    assert (gaussian_kl(mean_p, std_p, mean_q, std_p) > 0).all()  # equal deviations, different means


def test_reparameterised_sample_carries_gradients_to_the_mean_and_the_deviation():
    mean = torch.randn(50_000, requires_grad=True)
    std = (torch.rand(50_000) + 0.5).requires_grad_(True)
    sample = reparameterise(mean, std, torch.Generator().manual_seed(0))
    omega = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, mean + omega * std)
    sample.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(50_000))
    torch.testing.assert_close(std.grad, omega)
    standardised = ((sample - mean) / std).detach()
    assert abs(standardised.mean()) < 0.02 and abs(standardised.std() - 1) < 0.02


def make_fusion(statistics: str = "joint") -> DistributionFusion:
    torch.manual_seed(0)
    fusion = DistributionFusion(num_features=5, tokens=4, channels=6, statistics=statistics)
    fusion.initialise(torch.randn(4, 6), generator=torch.Generator().manual_seed(1))
    return fusion


def test_distribution_fusion_kl_is_that_of_p_and_q_from_equations_5_to_8():
    fusion = make_fusion()
    text, vision = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    _, kl = fusion(text, vision, sample=False)
    learnable = fusion.learnable.detach()
    k = learnable.shape[0]

    def normal(observed):
        mean = (observed + learnable.sum(0)) / (k + 1)  # Eq. 5 / 7
        members = torch.cat([observed[None], learnable])
        variance = (members - mean).square().sum(0) / (k + 1)  # diagonal of Eq. 6 / 8
        return torch.distributions.Normal(mean, (variance + fusion.eps).sqrt())

    for row in range(2):
        expected = torch.distributions.kl_divergence(normal(text[row]), normal(vision[row])).mean()
        torch.testing.assert_close(kl[row], expected)
    assert (kl > 0).all()
    _, same = fusion(text, text.clone(), sample=False)
    torch.testing.assert_close(same, torch.zeros(2))


def test_distribution_fusion_gradients_and_the_fused_mean():
    fusion = make_fusion()
    text = torch.randn(2, 4, 6, requires_grad=True)
    vision = torch.randn(2, 4, 6, requires_grad=True)
    fused, kl = fusion(text, vision, sample=True)
    assert fused.shape == (2, 4, 6) and kl.shape == (2,)
    (fused.square().mean() + kl.sum()).backward()
    for tensor in (text, vision, fusion.learnable):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    with torch.no_grad():
        mean, _ = fusion(text, vision, sample=False)
        again, _ = fusion(text, vision, sample=False)
        drawn, _ = fusion(text, vision, sample=True)
    assert torch.equal(mean, again) and not torch.allclose(mean, drawn)
    expected = (text + vision + fusion.learnable.sum(0)) / (fusion.learnable.shape[0] + 2)  # r of {F_T, F_V, F_L}
    torch.testing.assert_close(mean, expected.detach())


def test_literal_learnable_statistics_give_a_fused_feature_independent_of_the_input():
    fusion = make_fusion("learnable")
    with torch.no_grad():
        a, kl_a = fusion(torch.randn(2, 4, 6), torch.randn(2, 4, 6), sample=False)
        b, kl_b = fusion(torch.randn(2, 4, 6), torch.randn(2, 4, 6), sample=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a[0], fusion.learnable.mean(0).detach())  # mu_r = mu(F_L)
    assert not torch.allclose(kl_a, kl_b)
    with pytest.raises(ValueError, match="fused statistics"):
        DistributionFusion(3, 4, 6, statistics="mixture")


def test_learnable_features_start_at_the_prompt_feature_plus_a_tenth_of_unit_noise():
    torch.manual_seed(0)
    fusion = DistributionFusion(num_features=32, tokens=49, channels=16)
    prompt = torch.randn(49, 16)
    fusion.initialise(prompt, generator=torch.Generator().manual_seed(3))
    noise = fusion.learnable.detach() - prompt
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 0.1) < 0.005
    assert not torch.allclose(fusion.learnable[0], fusion.learnable[1])  # the K copies differ
    with pytest.raises(ValueError, match="prompt feature"):
        fusion.initialise(torch.randn(48, 16))


# --------------------------------------------------------------------------------------------- tokens


def test_tokens_to_map_inverts_flattening():
    x = torch.randn(2, 5, 3, 3)
    assert torch.equal(tokens_to_map(x.flatten(2).transpose(1, 2)), x)
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(torch.randn(1, 8, 4))


def test_patch_embedding_shapes_gradients_and_grid():
    torch.manual_seed(0)
    embedding = PatchEmbedding(3, 8, patch=4, grid=5)
    check_shape_and_gradients(embedding, torch.randn(2, 3, 20, 20), expected=(2, 25, 8))
    with pytest.raises(ValueError, match="5 x 5 token grid"):
        embedding(torch.randn(1, 3, 24, 24))


def test_text_projection_convb_shapes_gradients_and_padding():
    torch.manual_seed(0)
    projection = TextTokenProjection(text_dim=12, max_tokens=10, channels=8, tokens=16)
    assert [type(m).__name__ for m in (projection.conv, projection.norm, projection.act)] == [
        "Conv1d", "BatchNorm1d", "ReLU"]
    tokens = torch.randn(3, 7, 12)
    check_shape_and_gradients(projection, tokens, torch.ones(3, 7, dtype=torch.bool), expected=(3, 16, 8))
    projection.eval()
    short = projection(tokens[:, :4], torch.ones(3, 4, dtype=torch.bool))
    padded = projection(tokens, torch.tensor([[True] * 4 + [False] * 3] * 3))
    torch.testing.assert_close(short, padded)
    with pytest.raises(ValueError, match="at most 10 tokens"):
        projection(torch.randn(1, 11, 12), torch.ones(1, 11, dtype=torch.bool))


def test_transformer_block_and_token_unet():
    torch.manual_seed(0)
    check_shape_and_gradients(TransformerBlock(8, heads=2), torch.randn(2, 9, 8), expected=(2, 9, 8))
    with pytest.raises(ValueError, match="divisible by the heads"):
        TransformerBlock(6, heads=4)
    check_shape_and_gradients(TokenConvBN(8, 5), torch.randn(2, 9, 8), expected=(2, 9, 5))
    unet = TokenUNet((8, 12, 16, 20), depth=2, heads=2)
    x = torch.randn(2, 9, 8, requires_grad=True)
    inputs = [torch.randn(2, 9, w, requires_grad=True) for w in (12, 16, 20)]
    levels = unet(x, inputs)
    assert [tuple(level.shape) for level in levels] == [(2, 9, 8), (2, 9, 12), (2, 9, 16), (2, 9, 20)]
    sum(level.square().mean() for level in levels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert x.grad.abs().sum() > 0 and all(e.grad.abs().sum() > 0 for e in inputs)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in unet.modules()) == 6  # ConvTransBN between levels
    with pytest.raises(ValueError, match="must increase"):
        TokenUNet((8, 8, 16, 16), heads=2)
    with pytest.raises(ValueError, match="one input per level"):
        unet(x, inputs[:2])


def test_token_unet_levels_2_to_4_read_their_own_inputs_and_the_paths_are_linked():
    """As LViT's ViT branch: the input of every level j >= 2 reaches the outputs of all levels (the down path
    concatenates each level into the next, the up path carries each level down through ConvTransBN); the up-path
    output of the finest level changes when only its own up-path transformer is perturbed."""
    torch.manual_seed(0)
    unet = TokenUNet((8, 12, 16, 20), heads=2).eval()
    x = torch.randn(1, 4, 8)
    inputs = [torch.randn(1, 4, w) for w in (12, 16, 20)]
    with torch.no_grad():
        base = unet(x, inputs)
        for level in (1, 2, 3):
            changed = [tensor.clone() for tensor in inputs]
            changed[level - 1] += 1.0
            moved = unet(x, changed)
            assert all(not torch.allclose(base[j], moved[j]) for j in range(4)), level
        unet.up[0][0].proj.bias.add_(1.0)
        moved = unet(x, inputs)
    assert not torch.allclose(base[0], moved[0])
    assert all(torch.equal(a, b) for a, b in zip(base[1:], moved[1:], strict=True))


def test_the_processor_reads_the_fused_feature_and_enc_i_stages_2_to_4():
    model = tiny().eval()
    seen = {}
    model.processor.register_forward_pre_hook(lambda module, args: seen.update(args=args))
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        model(image, random_text(1))
        stages = [model.stem(image)]
        for stage in model.down:
            stages.append(stage(stages[-1]))
    fused, inputs = seen["args"]
    assert fused.shape == (1, 16, 4)
    for j, tokens in enumerate(inputs, start=1):
        torch.testing.assert_close(tokens, model.level_embeddings[j - 1](stages[j]))
        assert tokens.shape == (1, 16, TINY["processor_widths"][j])


# ---------------------------------------------------------------------------------------------- U-shape


def test_u_shape_stages_shapes_and_gradients():
    torch.manual_seed(0)
    check_shape_and_gradients(DownStage(4, 8), torch.randn(2, 4, 16, 16), expected=(2, 8, 8, 8))
    check_shape_and_gradients(PixelLevelAttention(6), torch.randn(2, 6, 8, 8), expected=(2, 6, 8, 8))
    check_shape_and_gradients(UpStage(8, 4, 6), torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8),
                              expected=(2, 6, 8, 8))
    plain = UpStage(8, 4, 6, depth=1, pixel_attention=False)
    assert not any(isinstance(m, PixelLevelAttention) for m in plain.modules())
    check_shape_and_gradients(TokenReconstruct(8, 5, scale=4), torch.randn(2, 9, 8), expected=(2, 5, 12, 12))


def test_pixel_level_attention_weights_every_channel_of_a_pixel_alike():
    torch.manual_seed(0)
    module = PixelLevelAttention(6).eval()
    x = torch.rand(1, 6, 5, 5) + 0.5
    ratio = module(x) / x
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))


def test_token_reconstruct_equals_upsampling_before_the_convolution():
    torch.manual_seed(0)
    module = TokenReconstruct(8, 5, scale=4).eval()
    tokens = torch.randn(2, 9, 8)
    upsampled = F.interpolate(tokens_to_map(tokens), scale_factor=4.0, mode="nearest")
    expected = module.act(module.norm(module.conv(upsampled)))  # LViT's order
    torch.testing.assert_close(module(tokens), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ the network


def test_registry_presets_preprocessing_and_text_encoder():
    assert "mmrdl" in architectures()
    spec = get_spec("mmrdl")
    paper, small = preset_config("mmrdl", "paper"), preset_config("mmrdl", "small")
    assert paper == MMRDLConfig()
    assert paper.widths == (64, 128, 256, 512, 512) and paper.num_learnable == 32 and paper.image_size == 224
    assert paper.kl_weight == 1.0 and paper.prompt_widths == (16, 32) and paper.spectrum == "phase"
    assert paper.text_dim == 512 and spec.default_text_encoder.startswith("open_clip:")
    assert spec.default_preprocessing["size"] == [224, 224]
    assert set(spec.default_preprocessing["intensity"]) == {"CT", "MR"}

    def count(config) -> int:
        return sum(p.numel() for p in create_model("mmrdl", config).parameters())

    assert count(small) * 10 < count(paper)
    with pytest.raises(ValueError, match="unknown mmrdl config keys: bogus"):
        config_from_dict("mmrdl", {"bogus": 1})


@pytest.mark.slow
def test_paper_configuration_forward_and_backward_at_224():
    torch.manual_seed(0)
    model = create_model("mmrdl", preset_config("mmrdl", "paper"))
    image = torch.randn(2, 3, 224, 224, requires_grad=True)
    outputs = model.forward_train(image, random_text(1, length=77, dim=512))
    assert outputs["logits"].shape == (2, 1, 224, 224) and outputs["kl"].shape == ()
    losses = get_spec("mmrdl").loss(model.config)(outputs, torch.rand(2, 1, 224, 224).round())
    losses["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [name for name, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters without gradient signal: {zero}"
    assert image.grad.abs().sum() > 0


def test_small_configuration_forward_backward_and_loss_at_224():
    torch.manual_seed(0)
    config = preset_config("mmrdl", "small", text_dim=24, kl_weight=0.5)
    model = create_model("mmrdl", config)
    target = torch.zeros(2, 1, 224, 224)
    target[:, :, 90:140, 80:160] = 1
    outputs = model.forward_train(torch.randn(2, 3, 224, 224), random_text(2, dim=24))
    assert outputs["logits"].shape == (2, 1, 224, 224) and outputs["kl"] > 0
    losses = get_spec("mmrdl").loss(config)(outputs, target)
    assert set(losses) == {"loss", "bce", "dice", "kl"}
    torch.testing.assert_close(losses["loss"], 0.5 * losses["dice"] + 0.5 * losses["bce"] + 0.5 * losses["kl"])
    losses["loss"].backward()
    zero = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero
    assert model.fusion.learnable.grad.abs().sum() > 0


def test_switches_build_the_ablations_of_tables_2_to_4():
    def kinds(model):
        return {type(m).__name__ for m in model.modules()}

    full = tiny()
    assert {"TextTokenProjection", "DistributionFusion", "FrequencyPromptEncoder", "TokenUNet"} <= kinds(full)
    backbone = tiny(use_text=False, use_frequency_prompt=False)
    assert not kinds(backbone) & {"TextTokenProjection", "DistributionFusion", "FrequencyPromptEncoder"}
    assert "TokenUNet" in kinds(backbone)
    addition = tiny(fusion="addition")
    assert "TextTokenProjection" in kinds(addition) and "DistributionFusion" not in kinds(addition)
    both = tiny(spectrum="both")
    assert both.prompt_encoder.encode[0].in_channels == 2 and full.prompt_encoder.encode[0].in_channels == 1
    image, text = torch.randn(2, 1, 64, 64), random_text(1)
    for model in (backbone, addition):
        outputs = model.eval().forward_train(image, text)
        assert outputs["logits"].shape == (2, 1, 64, 64) and outputs["kl"] == 0
    assert backbone(image, None).shape == (2, 1, 64, 64)
    for bad, message in (({"fusion": "concat"}, "fusion"), ({"spectrum": "power"}, "spectrum"),
                         ({"embed_stage": 6}, "embed_stage"), ({"image_size": 72}, "divisible by 16")):
        with pytest.raises(ValueError, match=message):
            tiny(**bad)


def test_addition_fusion_adds_the_text_to_the_vision_tokens():
    model = tiny(fusion="addition").eval()
    image, text = torch.randn(1, 1, 64, 64), random_text(1)
    seen = {}
    model.processor.register_forward_pre_hook(lambda module, args: seen.update(fused=args[0]))
    with torch.no_grad():
        model(image, text)
        vision = model.embedding(model.stem(image))
        expected = vision + model.text_projection(text.tokens, text.mask)
    torch.testing.assert_close(seen["fused"], expected)


def test_the_frequency_prompt_is_added_to_the_decoder_input_of_equation_16():
    """Switching Enc_P off equals a zero prompt ``F_pha`` (its last LayerNorm zeroed: GELU(0) = 0), and a non-zero
    prompt changes the output."""
    model = tiny().eval()
    without = tiny(use_frequency_prompt=False).eval()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prompt_encoder.")})
    image, text = torch.randn(2, 1, 64, 64), random_text(1)
    with torch.no_grad():
        assert not torch.allclose(model(image, text), without(image, text), atol=1e-4)
        last_norm = model.prompt_encoder.decode[-2]
        last_norm.weight.zero_()
        last_norm.bias.zero_()
        torch.testing.assert_close(model(image, text), without(image, text))


@pytest.mark.parametrize("embed_stage", [1, 3, 5])
def test_the_embedding_reads_the_chosen_encoder_stage(embed_stage):
    model = tiny(embed_stage=embed_stage)
    assert model.embedding.project.kernel_size == (2 ** (5 - embed_stage),) * 2
    assert model.embedding.project.in_channels == TINY["widths"][embed_stage - 1]
    assert model(torch.randn(1, 1, 64, 64), random_text(1)).shape == (1, 1, 64, 64)


def test_eval_is_deterministic_and_sampling_is_opt_in():
    model = tiny().eval()
    image, text = torch.randn(3, 1, 64, 64), random_text(1)
    with torch.no_grad():
        first = model(image, text.expand(3))
        second = model(image, text.expand(3))
        single = torch.cat([model(image[i : i + 1], text) for i in range(3)])
        sampled = model(image, text, sample=True)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first, sampled)
    sampling = tiny(sample_at_inference=True).eval()
    with torch.no_grad():
        assert not torch.equal(sampling(image, text), sampling(image, text))


def test_the_prompt_reaches_the_output_and_not_with_text_switched_off():
    image = torch.randn(2, 1, 64, 64)
    a, b = random_text(1, seed=1), random_text(1, seed=2)
    for fusion in ("distribution", "addition"):
        model = tiny(fusion=fusion).eval()
        with torch.no_grad():
            assert not torch.allclose(model(image, a), model(image, b), atol=1e-6)
    without = tiny(use_text=False).eval()
    with torch.no_grad():
        assert torch.equal(without(image, a), without(image, b))
        assert torch.equal(without(image, a), without(image, None))


def test_literal_fused_statistics_keep_the_prompt_out_of_the_output_but_in_the_kl():
    model = tiny(fused_statistics="learnable").eval()
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a = model.forward_train(image, random_text(1, seed=1))
        b = model.forward_train(image, random_text(1, seed=2))
    assert torch.equal(a["logits"], b["logits"]) and a["kl"] != b["kl"]


def test_text_and_image_size_are_checked():
    model = tiny().eval()
    with pytest.raises(ValueError, match="needs text features"):
        model(torch.randn(1, 1, 64, 64), None)
    with pytest.raises(ValueError, match="takes 64 x 64 images"):
        model(torch.randn(1, 1, 96, 96), random_text(1))
    with pytest.raises(ValueError, match="at most 12 tokens"):
        model(torch.randn(1, 1, 64, 64), random_text(1, length=13))


def test_initialise_learnable_features_from_the_encoded_prompt():
    model = tiny()
    features = random_text(1, seed=5)
    model.train()
    model.initialise_learnable_features(features, generator=torch.Generator().manual_seed(0))
    assert model.text_projection.training  # mode kept
    assert model.text_projection.norm.num_batches_tracked == 0  # batch-norm statistics untouched
    projection = model.text_projection
    with torch.no_grad():  # ConvB with the batch normalised by its own statistics, as in training
        x = projection.width(F.pad(features.tokens, (0, 0, 0, 12 - 9)).transpose(1, 2)).transpose(1, 2)
        x = projection.conv(x)
        mean, var = x.mean(dim=(0, 2), keepdim=True), x.var(dim=(0, 2), unbiased=False, keepdim=True)
        normalised = (x - mean) / torch.sqrt(var + projection.norm.eps)
        prompt = F.relu(normalised * projection.norm.weight[:, None] + projection.norm.bias[:, None])[0]
    noise = model.fusion.learnable.detach() - prompt
    assert noise.shape == (6, 16, 4) and abs(noise.std() - 0.1) < 0.02
    with pytest.raises(ValueError, match="one prompt"):
        model.initialise_learnable_features(random_text(2))
    with pytest.raises(ValueError, match="no learnable features"):
        tiny(fusion="addition").initialise_learnable_features(features)


def test_learnable_features_start_at_the_scale_of_the_training_text_features():
    """The paper's premise: F_L starts close to F_T. With the real MiniLM encoder and fresh batch-norm statistics,
    the initialising prompt's F_P has the spread that training-mode F_T has for a batch of real case descriptions
    (eval-mode ConvB gave about a tenth of it, below the 0.1 noise)."""
    encoder = load_text_encoder("minilm")
    torch.manual_seed(0)
    model = create_model("mmrdl", preset_config("mmrdl", "small", text_dim=encoder.dim)).train()
    model.initialise_learnable_features(encoder.encode([model.config.init_prompt]))
    prompts = ["a small solid nodule in the right upper lung near the mediastinum",
               "a large soft-tissue mass in the posterior left lower lung",
               "a contrast-enhancing lesion in the left cerebral hemisphere with irregular margins",
               "a small enhancing mass in the right breast"]
    with torch.no_grad():
        batch = encoder.encode(prompts)
        text = model.text_projection(batch.tokens, batch.mask)
    prompt = model.fusion.learnable.detach().mean(dim=0)  # F_P (the K noises average out)
    assert 0.8 < float(prompt.std() / text.std()) < 1.25


def test_the_training_hook_encodes_the_initialising_prompt():
    model = tiny(init_prompt="ground-glass opacity in the lung")
    asked = []

    def encode(prompt: str) -> TextFeatures:
        asked.append(prompt)
        return random_text(1, seed=5)

    torch.manual_seed(1)
    model.prepare_training(encode)
    assert asked == ["ground-glass opacity in the lung"]
    expected = tiny(init_prompt="ground-glass opacity in the lung")
    torch.manual_seed(1)
    expected.initialise_learnable_features(random_text(1, seed=5))
    assert torch.equal(model.fusion.learnable, expected.fusion.learnable)
    tiny(fusion="addition").prepare_training(encode)
    tiny(use_text=False).prepare_training(encode)
    assert len(asked) == 1  # nothing to initialise without learnable features


def test_checkpoint_keeps_the_initialising_prompt_and_the_learnable_features(tmp_path):
    model = tiny(init_prompt="ground-glass opacity in the lung")
    model.initialise_learnable_features(random_text(1, seed=5))
    path = tmp_path / "mmrdl.safetensors"
    save_checkpoint(path, model, architecture="mmrdl", text_encoder={"source": "open_clip:ViT-B-16@openai"})
    info = read_checkpoint_info(path)
    assert info.config["init_prompt"] == "ground-glass opacity in the lung"
    assert info.preprocessing == dict(get_spec("mmrdl").default_preprocessing)
    loaded, _ = load_checkpoint(path, expected_architecture="mmrdl")
    assert loaded.config == model.config
    assert torch.equal(loaded.fusion.learnable, model.fusion.learnable)
    image, text = torch.randn(1, 1, 64, 64), random_text(1)
    with torch.no_grad():
        assert torch.equal(loaded(image, text), model.eval()(image, text))


def test_config_round_trips_through_a_dict():
    config = preset_config("mmrdl", "small", fusion="addition", spectrum="amplitude")
    assert config_from_dict("mmrdl", dataclasses.asdict(config)) == config
    assert isinstance(create_model("mmrdl", dataclasses.asdict(config)), MMRDL)


# --------------------------------------------------------------------------- textseg segment on real CT


def make_small_mmrdl(clip_folder, seed: int = 0) -> MMRDL:
    """An MMRDL at half the small preset's widths (the engine runs it on every slice of lung2) for a tiny open_clip
    text tower, with seeded random weights calibrated on real slices.

    The learnable features are initialised from the encoded ``init_prompt`` (as training starts); batch-norm
    statistics are those of eight lung2 slices in the lung window, and the output bias is set so that about a
    third of those slices' pixels come out inside: masks are neither empty nor full.
    """
    encoder = load_text_encoder({"source": f"open_clip:local-dir:{clip_folder}", "max_tokens": 77})
    torch.manual_seed(seed)
    model = create_model("mmrdl", preset_config("mmrdl", "small", text_dim=encoder.dim, widths=(8, 16, 32, 64, 64),
                                                processor_widths=(8, 16, 32, 64), prompt_widths=(4, 8)))
    model.initialise_learnable_features(encoder.encode_cached(model.config.init_prompt),
                                        generator=torch.Generator().manual_seed(seed))
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "lung2_image.nrrd")))[20:44:3].astype(np.float32)
    x = torch.from_numpy(np.clip((volume + 1350.0) / 1500.0, 0.0, 1.0))[:, None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
    text = encoder.encode_cached(PROMPT)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()
        model(x, text, sample=False)
        model.eval()
        logits = model(x, text)
        model.head.bias -= torch.quantile(logits.flatten()[::7], 0.67)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    return model


@pytest.mark.slow
def test_textseg_segment_with_an_mmrdl_checkpoint_on_lung2(tmp_path, capsys, data_dir, clip_folder):
    model = make_small_mmrdl(clip_folder)
    checkpoint = tmp_path / "small-mmrdl.safetensors"
    save_checkpoint(checkpoint, model, architecture="mmrdl",
                    text_encoder={"source": f"open_clip:local-dir:{clip_folder}", "max_tokens": 77},
                    name="small MMRDL", description="random weights, for plumbing tests", example_prompts=[PROMPT])
    out = tmp_path / "out" / "lung2.seg.nrrd"
    code = main(["segment", str(data_dir / "lung2_image.nrrd"), "-p", PROMPT, "-m", str(checkpoint), "-o", str(out),
                 "--device", "cpu", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert f"Wrote {out}" in stdout
    assert_same_grid(out, data_dir / "lung2_image.nrrd")
    segmentation = slicerio.read_segmentation(str(out))
    [segment] = segmentation["segments"]
    assert segment["name"] == PROMPT
    assert decode_tag(segment["tags"][TAG_PROMPT]) == PROMPT
    assert segment["tags"][TAG_MODEL] == "small-mmrdl"
    assert segment["tags"][TAG_CHECKPOINT] == file_sha256(checkpoint)
    mask = slicerio.segment_mask(segmentation, segment) != 0
    assert 0 < mask.mean() < 0.9, "a calibrated random network gives neither an empty nor a full mask"


def test_what_the_catalogue_says_the_text_does_is_what_the_fusion_does():
    """joint: F_T is one of K + 2 equal members of the mean, so moving F_T by d moves F by d / (K + 2);
    learnable (the literal reading): F does not move at all. The catalogue's sentences say exactly that."""
    describe = get_spec("mmrdl").describe_text
    joint = preset_config("mmrdl", "paper")
    assert "weight 1/34" in describe(joint) and "does not pick its target from the prompt" in describe(joint)
    literal = preset_config("mmrdl", "paper", fused_statistics="learnable")
    assert "changes nothing at inference" in describe(literal)
    assert "ignored" in describe(preset_config("mmrdl", "paper", use_text=False))
    torch.manual_seed(0)
    text, vision, step = torch.randn(2, 9, 4), torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    for statistics, weight in (("joint", 1 / 8), ("learnable", 0.0)):
        fusion = DistributionFusion(6, 9, 4, statistics)
        fusion.initialise(torch.randn(9, 4))
        moved = fusion(text + step, vision, sample=False)[0] - fusion(text, vision, sample=False)[0]
        torch.testing.assert_close(moved, weight * step)
