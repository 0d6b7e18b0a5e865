"""FreqMedCLIP: Haar DWT, blocks, the whole network, ablation switches, checkpoints, ensembles, `textseg segment`.

Backbones are built offline from configs: a 12-block, 32-wide open_clip ViT (224 x 224, 16-pixel patches, so the
grid is 14 x 14 as in the paper) saved as an open_clip ``local-dir`` folder with seeded weights, timm ViTs laid out
as BiomedCLIP's tower, and timm ConvNeXts with small or ConvNeXt-Tiny widths. Text comes from the conftest's tiny
BiomedCLIP-like open_clip folder (BERT tokens 32 wide, pooled 16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pywt
import SimpleITK as sitk
import slicerio
import torch
from testkit import (
    TINY_TEXT_CFG,
    assert_same_grid,
    calibrated_model,
    check_shape_and_gradients,
    open_clip_folder,
    small_config,
    small_model,
)
from torch import nn

from TextSegLib.app.cli import main
from TextSegLib.engine.checkpoints import load_checkpoint, save_checkpoint
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.io.segnrrd import TAG_CHECKPOINT, TAG_MODEL, TAG_PROMPT, decode_tag
from TextSegLib.io.volumes import Volume
from TextSegLib.models.blocks.backbones import (
    BackboneUnavailableError,
    ConvNeXtPyramid,
    ViTTokenEncoder,
    build_open_clip_vision_tower,
    load_open_clip_vision_tower,
    vit_token_encoder,
)
from TextSegLib.models.blocks.conditioning import (
    FFBI,
    BidirectionalCrossAttention,
    CrossAttention,
    FiLM,
    TextConditionedAdapter,
)
from TextSegLib.models.blocks.vit import plain_vit_config
from TextSegLib.models.blocks.wavelets import haar_dwt2, haar_idwt2
from TextSegLib.models.freqmedclip_config import BIOMEDCLIP, TABLE4_ABLATIONS, FreqMedCLIPConfig
from TextSegLib.models.freqmedclip_streams import ConcatFusion, DecoderStage, FPNAdapter, FusionHead, LFFIDecoder
from TextSegLib.models.registry import architectures, config_from_dict, create_model, get_spec, preset_config
from TextSegLib.text.features import TextFeatures
from TextSegLib.text.sources import load_text_encoder, open_clip_source_has_weights

PROMPT = "a large soft-tissue mass in the posterior left lower lung"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def timm_vit_folder(tmp_path_factory) -> Path:
    """A timm ViT wrapped the way BiomedCLIP's tower is (``TimmModel``), ViT-Tiny sized, seeded weights."""
    return open_clip_folder(tmp_path_factory.mktemp("timm-vit"), {
        "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
        "timm_proj": "linear", "image_size": 224}, TINY_TEXT_CFG)


@pytest.fixture(scope="module")
def vit_b16_folder(tmp_path_factory) -> Path:
    """BiomedCLIP's exact image-tower config (timm ``vit_base_patch16_224``) without weights: random ViT-B/16."""
    return open_clip_folder(tmp_path_factory.mktemp("vit-b16"), {
        "timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
        "timm_proj": "linear", "image_size": 224}, TINY_TEXT_CFG, weights=False)


def random_text(batch: int = 1, length: int = 9, dim: int = 32, pooled: int = 16, seed: int = 0) -> TextFeatures:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length - 2:] = False  # two padding tokens
    return TextFeatures(torch.randn(batch, length, dim, generator=generator), mask,
                        torch.randn(batch, pooled, generator=generator))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def trainable_gradients_ok(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters whose gradient is missing, non-finite or zero."""
    return [name for name, p in model.named_parameters() if p.requires_grad and (
        p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]


# --------------------------------------------------------------------------------------------------- Haar DWT


def real_slices(data_dir: Path) -> list[np.ndarray]:
    """Middle slices of three real cases (CT, MR brain, MR breast with an odd width of 45)."""
    slices = []
    for case in ("lung2", "brain1", "breast1"):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / f"{case}_image.nrrd"))).astype(np.float64)
        slices.append(array[array.shape[0] // 2])
    return slices


def pywt_bands(x: np.ndarray) -> np.ndarray:
    approximation, (horizontal, vertical, diagonal) = pywt.dwt2(x, "haar")
    return np.stack([approximation, horizontal, vertical, diagonal])


@pytest.mark.parametrize("shape", [(224, 224), (37, 50), (45, 120)])
def test_haar_dwt_equals_pywt_on_random_images(shape):
    x = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    ours = haar_dwt2(torch.from_numpy(x)[None])[0].numpy()
    expected = np.concatenate([pywt_bands(x[c]) for c in range(3)], axis=0)  # (c, band) order
    expected = expected.reshape(3, 4, *expected.shape[-2:]).transpose(1, 0, 2, 3).reshape(12, *expected.shape[-2:])
    assert ours.shape == (12, (shape[0] + 1) // 2, (shape[1] + 1) // 2)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_haar_dwt_equals_pywt_on_real_slices(data_dir):
    for raw in real_slices(data_dir):
        np.testing.assert_allclose(haar_dwt2(torch.from_numpy(raw)[None, None])[0].numpy(), pywt_bands(raw),
                                   atol=1e-5, rtol=0)  # float64, raw intensities (HU for CT)
        scaled = ((raw - raw.min()) / (raw.max() - raw.min())).astype(np.float32)  # what the network sees
        np.testing.assert_allclose(haar_dwt2(torch.from_numpy(scaled)[None, None])[0].numpy(), pywt_bands(scaled),
                                   atol=1e-5, rtol=0)


def test_haar_idwt_reconstructs_random_and_real_images(data_dir):
    x = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(haar_idwt2(haar_dwt2(x)), x, atol=1e-5, rtol=0)
    for raw in real_slices(data_dir):
        image = torch.from_numpy(raw)[None, None]
        height, width = image.shape[-2:]
        torch.testing.assert_close(haar_idwt2(haar_dwt2(image))[..., :height, :width], image, atol=1e-8, rtol=0)
    energy = haar_dwt2(x).square().sum() / x.square().sum()
    torch.testing.assert_close(energy, torch.tensor(1.0), atol=1e-5, rtol=0)  # orthonormal


def test_haar_dwt_is_batched_differentiable_and_checks_shapes():
    x = torch.randn(4, 2, 16, 18)
    batched = haar_dwt2(x)
    torch.testing.assert_close(batched, torch.cat([haar_dwt2(x[i : i + 1]) for i in range(4)]))
    assert torch.autograd.gradcheck(haar_dwt2, torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(haar_idwt2, torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        haar_dwt2(torch.randn(16, 16))
    with pytest.raises(ValueError, match="4C"):
        haar_idwt2(torch.randn(1, 6, 4, 4))


# ------------------------------------------------------------------------------------------------------ blocks


def test_film_on_maps_and_tokens_starts_near_identity():
    film = FiLM(16, 8, 32)
    check_shape_and_gradients(film, torch.randn(2, 8, 5, 6), torch.randn(2, 16), expected=(2, 8, 5, 6))
    film = FiLM(16, 8, 32)
    check_shape_and_gradients(film, torch.randn(2, 7, 8), torch.randn(2, 16), expected=(2, 7, 8))
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        gamma, beta = film.coefficients(torch.randn(2, 16))
        torch.testing.assert_close(film.modulate(x, gamma, beta), gamma[:, :, None, None] * x + beta[:, :, None, None])
        assert (gamma - 1).abs().max() < 0.1 and beta.abs().max() < 0.1
        assert not torch.equal(gamma[0], gamma[1])  # the condition reaches the output


def test_cross_attention_ignores_padding_tokens():
    torch.manual_seed(0)
    attention = CrossAttention(12, 10, 8, heads=2).eval()
    x, context = torch.randn(2, 5, 12), torch.randn(2, 6, 10)
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    changed = context.clone()
    changed[:, 4:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(attention(x, context, mask), attention(x, changed, mask))
        assert not torch.allclose(attention(x, context), attention(x, changed))
    check_shape_and_gradients(attention, x, context, mask, expected=(2, 5, 12))


def test_text_conditioned_adapter_shapes_gradients_and_equations():
    torch.manual_seed(0)
    adapter = TextConditionedAdapter(32, 24, attention_dim=8, heads=1, ffn_dim=16)
    x, tokens, mask = torch.randn(2, 197, 32), torch.randn(2, 9, 24), torch.ones(2, 9, dtype=torch.bool)
    check_shape_and_gradients(adapter, x, tokens, mask, expected=(2, 197, 32))
    with torch.no_grad():  # Eq. 5-6 written out
        x_ca = x + adapter.attention(x, tokens, mask)
        torch.testing.assert_close(adapter(x, tokens, mask), x_ca + adapter.ffn(adapter.norm(x_ca)))


def test_bidirectional_cross_attention_and_ffbi():
    torch.manual_seed(0)
    exchange = BidirectionalCrossAttention(16, heads=4)
    a, b = torch.randn(2, 196, 16, requires_grad=True), torch.randn(2, 196, 16, requires_grad=True)
    new_a, new_b = exchange(a, b)
    with torch.no_grad():  # Eq. 11: both updates read the inputs
        torch.testing.assert_close(new_a, a + exchange.a_from_b(a, b))
        torch.testing.assert_close(new_b, b + exchange.b_from_a(b, a))
    (new_a.square().mean() + new_b.square().mean()).backward()
    assert not trainable_gradients_ok(exchange) and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0

    for gate in (16, None):
        ffbi = FFBI(24, 40, 16, heads=4, pooled_dim=gate, gate_hidden=32)
        semantic = torch.randn(2, 24, 14, 14, requires_grad=True)
        frequency = torch.randn(2, 40, 14, 14, requires_grad=True)
        pooled = torch.randn(2, 16, requires_grad=True)
        start_s, start_f = ffbi(semantic, frequency, pooled)
        assert start_s.shape == start_f.shape == (2, 16, 28, 28)
        (start_s.square().mean() + start_f.square().mean()).backward()
        assert not trainable_gradients_ok(ffbi)
        assert semantic.grad.abs().sum() > 0 and frequency.grad.abs().sum() > 0
        assert (pooled.grad is not None) == (gate is not None)
    with pytest.raises(ValueError, match="pooled"):
        FFBI(24, 40, 16, heads=4, pooled_dim=16)(torch.randn(1, 24, 14, 14), torch.randn(1, 40, 14, 14))


def test_convnext_pyramid_with_a_stride_one_stem():
    encoder = ConvNeXtPyramid(12, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    assert encoder.stem[0].stride == (1, 1) and encoder.stem[0].in_channels == 12
    x = torch.randn(2, 12, 112, 112, requires_grad=True)
    features = encoder(x)
    assert [tuple(f.shape) for f in features] == [(2, 8, 112, 112), (2, 16, 56, 56), (2, 24, 28, 28),
                                                  (2, 32, 14, 14)]
    sum(f.square().mean() for f in features).backward()
    assert not trainable_gradients_ok(encoder) and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="odd"):
        ConvNeXtPyramid(12, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem_kernel=4)
    with pytest.raises(ValueError, match="v1"):
        ConvNeXtPyramid(12, "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def test_convnext_stages_built_without_timm_compute_exactly_as_timms():
    """TextSeg's own ConvNeXt stages (issue 25: no timm import to load a checkpoint) against timm's ConvNeXt with
    the same weights: the same parameter names, bit-identical features in float32, bf16 and channels-last, and
    the same initialisation statistics for training from scratch."""
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model("convnext_tiny", pretrained=False, num_classes=0, depths=(2, 1, 2, 1),
                               dims=(8, 16, 24, 32)).eval()
    ours = ConvNeXtPyramid(12, depths=(2, 1, 2, 1), dims=(8, 16, 24, 32)).eval()
    assert "timm" not in type(ours.stages[0]).__module__
    ours.stages.load_state_dict(nn.ModuleList(theirs.stages).state_dict(), strict=True)
    ours.stem[1].load_state_dict(theirs.stem[1].state_dict(), strict=True)
    with torch.no_grad():
        for gamma in (ours.stages, theirs.stages):  # layer scales of 1e-6 would hide the blocks' arithmetic
            for name, parameter in gamma.named_parameters():
                if name.endswith("gamma"):
                    parameter.fill_(0.5)
        x = torch.randn(2, 8, 32, 32)
        for cast in (lambda t: t, lambda t: t.contiguous(memory_format=torch.channels_last)):
            a, b = ours.stem[1](cast(x)), theirs.stem[1](cast(x))
            assert torch.equal(a, b)
            for stage_ours, stage_theirs in zip(ours.stages, theirs.stages, strict=True):
                a, b = stage_ours(a), stage_theirs(b)
                assert torch.equal(a, b)
        bf16 = x.bfloat16()
        assert torch.equal(ours.bfloat16().stages[0](bf16), theirs.bfloat16().stages[0](bf16))
    fresh = ConvNeXtPyramid(12, depths=(2, 1, 2, 1), dims=(96, 192, 384, 768))
    weights = fresh.stages[2].blocks[0].mlp.fc1.weight
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001  # N(0, 0.02)
    assert torch.all(fresh.stages[1].blocks[0].gamma == torch.tensor(1e-6)) and not fresh.stem[0].bias.any()


def test_vit_token_encoder_reproduces_open_clip_and_timm_towers(vit_folder, timm_vit_folder):
    x = images(2)
    tower, weighted, _ = load_open_clip_vision_tower(f"local-dir:{vit_folder}")
    assert weighted
    encoder = ViTTokenEncoder(tower.eval(), depth=12)
    assert encoder.grid_size == (14, 14) and encoder.width == 32 and len(encoder.blocks) == 12
    with torch.no_grad():
        reference = tower.forward_intermediates(x, indices=[2, 5, 8, 11], output_fmt="NLC",
                                                output_extra_tokens=True, intermediates_only=True)
        states = encoder(x)
    for index, block in enumerate([2, 5, 8, 11]):
        torch.testing.assert_close(states[block][:, 1:], reference["image_intermediates"][index])
        torch.testing.assert_close(states[block][:, :1], reference["image_intermediates_prefix"][index])

    tower, _, _ = load_open_clip_vision_tower(f"local-dir:{timm_vit_folder}")
    encoder = ViTTokenEncoder(tower.eval(), depth=12)
    with torch.no_grad():
        torch.testing.assert_close(tower.trunk.norm(encoder(x)[-1]), tower.trunk.forward_features(x))
    assert len(ViTTokenEncoder(tower, depth=6).blocks) == 6
    with pytest.raises(ValueError, match="224"):
        encoder.embed(torch.zeros(1, 3, 112, 112))


def test_a_plain_vit_built_without_open_clip_computes_exactly_as_open_clips(vit_folder, timm_vit_folder):
    """TextSeg's own plain ViT (what a checkpoint that stores its tower loads into, issue 25) against open_clip's
    tower with the same weights: the same parameter names, bit-identical tokens in float32 and under bf16
    autocast, with exact GELU (the recorded config) and QuickGELU (OpenAI's); configs it does not cover go to
    open_clip."""
    tower, _, tower_cfg = load_open_clip_vision_tower(f"local-dir:{vit_folder}")
    theirs = ViTTokenEncoder(tower.eval(), depth=12)
    ours = vit_token_encoder(tower_cfg, 12).eval()
    assert not isinstance(ours.blocks[0], type(theirs.blocks[0]))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = images(2)
    with torch.no_grad():
        fp32 = list(zip(theirs(x), ours(x), strict=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = list(zip(theirs(x), ours(x), strict=True))
        bf16 = list(zip(theirs.bfloat16()(x.bfloat16()), ours.bfloat16()(x.bfloat16()), strict=True))
    for states in (fp32, autocast, bf16):
        assert all(torch.equal(a, b) for a, b in states)
    assert not torch.equal(autocast[-1][0], fp32[-1][0]) and bf16[-1][0].dtype == torch.bfloat16

    quick_cfg = {**tower_cfg, "quick_gelu": True}
    theirs = ViTTokenEncoder(build_open_clip_vision_tower(quick_cfg).eval(), depth=3)
    ours = vit_token_encoder(quick_cfg, 3).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(theirs(x)[-1], ours(x)[-1])
    with pytest.raises(ValueError, match="12 blocks"):
        vit_token_encoder(tower_cfg, 13)

    _, _, timm_cfg = load_open_clip_vision_tower(f"local-dir:{timm_vit_folder}")
    assert plain_vit_config(timm_cfg) is None
    for departure in ({"ls_init_value": 0.1}, {"no_ln_pre": True}, {"block_type": "custom"}, {"qk_norm": True},
                      {"layers": [3, 4, 6, 3]}, {"a_setting_of_a_later_open_clip": 1}):
        assert plain_vit_config({**tower_cfg, "vision_cfg": {**tower_cfg["vision_cfg"], **departure}}) is None
    assert plain_vit_config({**tower_cfg, "vision_cfg": {**tower_cfg["vision_cfg"], "pool_type": "avg"}})


def test_the_shipped_models_load_and_segment_without_importing_open_clip():
    """Loading a shipped FreqMedCLIP (its tower stored in the checkpoint) imports neither open_clip nor what it
    pulls in (torchvision, transformers, torch's compiler): 3.5 s of a fresh run (issue 25)."""
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from TextSegLib.core.options import SegmentOptions\n"
        "from TextSegLib.engine.run import Segmenter\n"
        "from TextSegLib.io.volumes import read_volume\n"
        "from TextSegLib.evaluation.demo import demo_case\n"
        "volume = read_volume(demo_case('headneck')['image'])\n"
        "for model in ('abdomen-freqmedclip-small', 'headneck-freqmedclip-small'):\n"
        "    result = Segmenter([model], SegmentOptions()).segment(volume, 'the spinal cord')\n"
        "    print(model, int(np.count_nonzero(result.mask)))\n"
        "print(sorted(m for m in ('open_clip', 'torchvision', 'transformers', 'timm', 'torch._dynamo')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TEXTSEG_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "[]", done.stdout
    assert int(lines[-2].split()[1]) > 300, done.stdout  # the head-and-neck model finds the cord


def test_backbone_sources(vit_folder, tmp_path):
    assert open_clip_source_has_weights(BIOMEDCLIP) and open_clip_source_has_weights("ViT-B-16@openai")
    assert open_clip_source_has_weights(f"local-dir:{vit_folder}")
    assert not open_clip_source_has_weights("ViT-B-16")
    (tmp_path / "open_clip_config.json").write_text((vit_folder / "open_clip_config.json").read_text())
    assert not open_clip_source_has_weights(f"local-dir:{tmp_path}")
    with pytest.raises(BackboneUnavailableError, match="could not be loaded"):
        load_open_clip_vision_tower(f"local-dir:{tmp_path / 'missing'}")


def test_fpn_decoder_and_fusion_head_shapes_and_gradients():
    fpn = FPNAdapter(32, (24, 16, 12, 8))
    grids = [torch.randn(2, 32, 14, 14, requires_grad=True) for _ in range(4)]
    pyramid = fpn(grids)
    assert [tuple(s.shape) for s in pyramid] == [(2, 24, 14, 14), (2, 16, 28, 28), (2, 12, 56, 56),
                                                 (2, 8, 112, 112)]
    sum(s.square().mean() for s in pyramid).backward()
    assert not trainable_gradients_ok(fpn) and all(g.grad.abs().sum() > 0 for g in grids)

    stage = DecoderStage(16, 12, 8, pooled_dim=10, film_hidden=16)
    check_shape_and_gradients(stage, torch.randn(2, 16, 28, 28), torch.randn(2, 12, 28, 28), torch.randn(2, 10),
                              expected=(2, 8, 56, 56))
    assert DecoderStage(16, 12, 8, pooled_dim=None, film_hidden=16).film is None
    decoder = LFFIDecoder(16, (12, 10, 6), (12, 8, 4), pooled_dim=10, film_hidden=16)
    skips = [torch.randn(2, 12, 28, 28), torch.randn(2, 10, 56, 56), torch.randn(2, 6, 112, 112)]
    logits = decoder(torch.randn(2, 16, 28, 28), skips, torch.randn(2, 10))
    assert logits.shape == (2, 1, 224, 224)
    logits.square().mean().backward()
    assert not trainable_gradients_ok(decoder)
    check_shape_and_gradients(FusionHead(16), torch.randn(2, 2, 224, 224), expected=(2, 1, 224, 224))
    check_shape_and_gradients(ConcatFusion(24, 40, 16), torch.randn(2, 24, 14, 14), torch.randn(2, 40, 14, 14),
                              expected=(2, 32, 28, 28))


# ----------------------------------------------------------------------------------------------------- network


def test_registry_presets_and_config_checks():
    assert "freqmedclip" in architectures()
    spec = get_spec("freqmedclip")
    assert spec.title == "FreqMedCLIP" and spec.default_text_encoder == f"open_clip:{BIOMEDCLIP}"
    assert spec.default_preprocessing["size"] == [224, 224]
    paper = preset_config("freqmedclip", "paper")
    assert paper == FreqMedCLIPConfig()
    assert paper.vision_source == BIOMEDCLIP and paper.freeze_backbone and paper.vit_layers == (3, 6, 9, 12)
    assert paper.freq_model == "convnext_tiny" and paper.freq_dims == (96, 192, 384, 768)
    assert paper.freq_depths == (3, 3, 9, 3) and paper.text_dim == 768 and paper.pooled_dim == 512
    small = preset_config("freqmedclip", "small")
    assert small.freq_dims < paper.freq_dims and small.fpn_widths < paper.fpn_widths
    for bad, message in [({"tca_mode": "agent"}, "tca_mode"), ({"vit_layers": (3, 3, 9, 12)}, "vit_layers"),
                         ({"use_freq_encoder": False}, "use_ffbi"), ({"in_channels": 2}, "in_channels"),
                         ({"decoder_widths": (8, 4)}, "decoder_widths"), ({"freq_stem_kernel": 2}, "odd")]:
        with pytest.raises(ValueError, match=message):
            preset_config("freqmedclip", "small", **bad)
    config = preset_config("freqmedclip", "small", use_ffbi=False, tca_mode="film")
    assert config_from_dict("freqmedclip", json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_small_network_forward_backward_and_loss_at_224(vit_folder):
    model = small_model(vit_folder)
    config = model.config
    assert isinstance(model.semantic.backbone, ViTTokenEncoder)
    assert [type(a).__name__ for a in model.semantic.adapters] == ["TextConditionedAdapter"] * 4
    assert type(model.fusion).__name__ == "FFBI" and model.fusion.gate is not None
    assert all(stage.film is not None for stage in model.decoder_semantic.stages)
    image = images(2).requires_grad_(True)
    outputs = model.forward_train(image, random_text(1))  # one prompt broadcast to the batch
    assert set(outputs) == {"logits", "logits_semantic", "logits_frequency"}
    assert all(v.shape == (2, 1, 224, 224) for v in outputs.values())
    target = torch.zeros(2, 1, 224, 224)
    target[:, :, 90:150, 80:160] = 1
    losses = get_spec("freqmedclip").loss(config)(outputs, target)
    assert set(losses) == {"loss", "dice", "bce", "dice_semantic", "dice_frequency"}
    expected = losses["dice"] + losses["bce"] + 0.4 * losses["dice_semantic"] + 0.4 * losses["dice_frequency"]
    torch.testing.assert_close(losses["loss"], expected)
    torch.testing.assert_close(losses["bce"], torch.nn.functional.binary_cross_entropy_with_logits(
        outputs["logits"], target))
    losses["loss"].backward()
    assert not trainable_gradients_ok(model)
    assert image.grad.abs().sum() > 0
    backbone = list(model.semantic.backbone.parameters())
    assert backbone and all(not p.requires_grad and p.grad is None for p in backbone), "frozen ViT got gradients"
    assert model.training and model.semantic.fpn.training and not model.semantic.backbone.training


def test_the_frozen_vit_builds_no_graph_before_the_first_adapter(vit_folder):
    model = small_model(vit_folder)
    states = {}
    for number in (1, 3, 4):
        model.semantic.backbone.blocks[number - 1].register_forward_hook(
            lambda _m, _i, out, n=number: states.__setitem__(n, out.requires_grad))
    model(images(1), random_text(1))
    assert states == {1: False, 3: False, 4: True}  # block 4 reads TCA-3's output
    unfrozen = small_model(vit_folder, freeze_backbone=False)
    unfrozen.forward_train(images(1), random_text(1))["logits"].mean().backward()
    assert not trainable_gradients_ok(unfrozen.semantic.backbone)  # fine-tuning reaches every block


def test_tca_sits_inside_the_encoder_after_blocks_3_6_9_12(vit_folder):
    """The adapter output feeds the next ViT block: the input of block 4 depends on the prompt, that of block 3
    does not; without TCA neither does."""
    seen: dict[int, list[torch.Tensor]] = {3: [], 4: [], 12: []}
    model = small_model(vit_folder).eval()
    for number in seen:
        model.semantic.backbone.blocks[number - 1].register_forward_pre_hook(
            lambda _m, args, n=number: seen[n].append(args[0]))
    with torch.no_grad():
        for seed in (1, 2):
            model(images(1), random_text(1, seed=seed))
    assert torch.equal(seen[3][0], seen[3][1])
    assert not torch.allclose(seen[4][0], seen[4][1]) and not torch.allclose(seen[12][0], seen[12][1])


@pytest.mark.parametrize(("switches", "reads"), [
    ({}, True),
    ({"use_text_gate": False, "use_lffi": False}, True),  # TCA only
    ({"use_text_gate": False, "use_lffi": False, "tca_mode": "film"}, True),  # FiLM-on-tokens only
    ({"use_tca": False, "use_lffi": False}, True),  # FFBI text gate only
    ({"use_tca": False, "use_text_gate": False}, True),  # LFFI only
    ({"use_tca": False, "use_text_gate": False, "use_lffi": False}, False),
])
def test_the_prompt_reaches_the_output_only_through_tca_gate_and_lffi(vit_folder, switches, reads):
    model = small_model(vit_folder, **switches).eval()
    image = images(2)
    with torch.no_grad():
        a, b = model(image, random_text(1, seed=1)), model(image, random_text(1, seed=2))
    assert model.config.reads_text == reads
    described = get_spec("freqmedclip").describe_text(model.config)  # what the catalogue and the panel say
    assert ("changes the output" in described) == reads and ("ignored" in described) == (not reads)
    if reads:
        assert not torch.allclose(a, b, atol=1e-6)
    else:
        assert torch.equal(a, b)
        with torch.no_grad():
            assert torch.equal(model(image, None), a)


def test_text_and_input_checks(vit_folder):
    model = small_model(vit_folder).eval()
    with pytest.raises(ValueError, match="needs text"):
        model(images(1), None)
    with pytest.raises(ValueError, match="224"):
        model(torch.rand(1, 3, 112, 112), random_text(1))
    with pytest.raises(ValueError, match="224"):
        model(torch.rand(1, 1, 224, 224), random_text(1))
    gray = small_model(vit_folder, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.rand(2, 1, 224, 224), random_text(1)).shape == (2, 1, 224, 224)
    assert gray.frequency.encoder.stem[0].in_channels == 4  # one channel, four sub-bands


def test_eval_is_deterministic_and_batch_independent(vit_folder):
    model = small_model(vit_folder).eval()
    image, text = images(3), random_text(1)
    with torch.no_grad():
        batched = model(image, text.expand(3))
        single = torch.cat([model(image[i : i + 1], text) for i in range(3)])
        again = model(image, text)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert torch.equal(batched, again)


@pytest.mark.parametrize("column", list(TABLE4_ABLATIONS))
def test_table_4_ablations(vit_folder, column):
    model = small_model(vit_folder, **TABLE4_ABLATIONS[column])
    names = {type(m).__name__ for m in model.modules()}
    outputs = model.forward_train(images(1), random_text(1))
    assert outputs["logits"].shape == (1, 1, 224, 224)
    if column == "w/o FreqEnc":
        assert model.frequency is None and "ConvNeXtPyramid" not in names and "FFBI" not in names
    elif column == "w/o FFBI":
        assert "FFBI" not in names and type(model.fusion).__name__ == "ConcatFusion"
        assert model.decoder_semantic.stages[0].block[0][0].in_channels == 2 * 64 + 32  # [Z_s, Z_f] + S2
    elif column == "w/o LFFI":
        assert all(stage.film is None for stage in [*model.decoder_semantic.stages, *model.decoder_frequency.stages])
    elif column == "w/o Dual Dec":
        assert not hasattr(model, "decoder_semantic") and not hasattr(model, "fuse") and "FFBI" in names
    elif column == "w/o TCA":
        assert model.semantic.adapters is None and "TextConditionedAdapter" not in names
    dual = not column.startswith(("w/o FreqEnc", "w/o Dual"))
    assert set(outputs) == ({"logits", "logits_semantic", "logits_frequency"} if dual else {"logits"})
    losses = get_spec("freqmedclip").loss(model.config)(outputs, torch.ones(1, 1, 224, 224))
    assert ("dice_semantic" in losses) == dual
    if not dual:
        torch.testing.assert_close(losses["loss"], losses["dice"] + losses["bce"])
    losses["loss"].backward()
    assert not trainable_gradients_ok(model)


def test_frequency_encoder_switches_and_external_weights(vit_folder, tmp_path):
    model = small_model(vit_folder)
    assert model.external_weights == ("semantic.backbone.",)
    assert all(p.requires_grad for p in model.frequency.parameters())  # "learned frequency encoder"
    fine_tuned = small_model(vit_folder, freeze_backbone=False)
    assert fine_tuned.external_weights == ()
    assert all(p.requires_grad for p in fine_tuned.semantic.backbone.parameters())
    with pytest.raises(ValueError, match="frozen random weights learn nothing"):
        small_config(vit_folder, train_freq_encoder=False)  # would freeze random ConvNeXt stages
    assert small_config(vit_folder, train_freq_encoder=False, use_freq_encoder=False, use_ffbi=False,
                        use_dual_decoder=False)  # nothing to freeze without the frequency stream
    (tmp_path / "open_clip_config.json").write_text((vit_folder / "open_clip_config.json").read_text())
    unweighted = create_model("freqmedclip", small_config(vit_folder, vision_source=f"local-dir:{tmp_path}"))
    assert unweighted.external_weights == ()  # a random frozen tower must travel in the checkpoint


@pytest.mark.parametrize("freeze", [True, False])
def test_checkpoints_leave_out_only_the_frozen_pretrained_vit(vit_folder, biomedclip_like_folder, tmp_path, freeze):
    from safetensors.torch import load_file

    model = small_model(vit_folder, seed=3, freeze_backbone=freeze).eval()
    path = tmp_path / "freqmedclip.safetensors"
    info = save_checkpoint(path, model, architecture="freqmedclip",
                           text_encoder={"source": f"open_clip:local-dir:{biomedclip_like_folder}", "max_tokens": 40})
    stored = load_file(str(path))
    assert any(key.startswith("semantic.backbone.") for key in stored) != freeze
    assert info.external_weights == (["semantic.backbone."] if freeze else [])
    assert any(key.startswith("frequency.encoder.stages.") for key in stored)
    loaded, _ = load_checkpoint(path)
    image, text = images(2), random_text(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, text), model(image, text), atol=0, rtol=0)


def test_frozen_imagenet_convnext_is_left_out_of_checkpoints(vit_folder, biomedclip_like_folder, tmp_path,
                                                            monkeypatch):
    """``freq_pretrained`` with a frozen ConvNeXt: timm's ImageNet weights (stood in for by fixed seeded weights,
    nothing is fetched) are rebuilt at load time; the new stem is trained and stored."""
    import timm

    create, calls = timm.create_model, []

    def fixed_weights(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fixed_weights)
    model = small_model(vit_folder, train_freq_encoder=False, freq_pretrained=True).eval()
    assert calls == [True]
    assert not any(p.requires_grad for p in model.frequency.encoder.stages.parameters())
    assert all(p.requires_grad for p in model.frequency.encoder.stem.parameters())  # the new stem
    assert model.external_weights == ("semantic.backbone.", "frequency.encoder.stages.")
    path = tmp_path / "frozen-convnext.safetensors"
    save_checkpoint(path, model, architecture="freqmedclip",
                    text_encoder={"source": f"open_clip:local-dir:{biomedclip_like_folder}", "max_tokens": 40})
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert not any(key.startswith("frequency.encoder.stages.") for key in stored)
    assert "frequency.encoder.stem.0.weight" in stored
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(1), random_text(1)), model(images(1), random_text(1)), atol=0,
                                   rtol=0)


def test_trained_imagenet_convnext_starts_from_imagenet_only_in_training(vit_folder, biomedclip_like_folder,
                                                                        tmp_path, monkeypatch):
    """``freq_pretrained`` with a trained ConvNeXt: the ImageNet weights (stood in for by fixed seeded weights) are
    fetched by ``prepare_training``, stored in the checkpoint, and never fetched when the checkpoint is loaded."""
    import timm

    create, calls = timm.create_model, []

    def fixed_weights(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        with torch.random.fork_rng():
            torch.manual_seed(1234 if pretrained else 99)
            return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fixed_weights)
    model = small_model(vit_folder, train_freq_encoder=True, freq_pretrained=True).eval()
    assert calls == [] and model.external_weights == ("semantic.backbone.",)  # timm only for ImageNet weights
    model.prepare_training(lambda prompt: random_text(1))
    assert calls == [True]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        imagenet = create(model.config.freq_model, pretrained=False, num_classes=0,
                          depths=tuple(model.config.freq_depths), dims=tuple(model.config.freq_dims))
    torch.testing.assert_close(model.frequency.encoder.stages[0].state_dict(), imagenet.stages[0].state_dict())
    path = tmp_path / "trained-convnext.safetensors"
    save_checkpoint(path, model, architecture="freqmedclip",
                    text_encoder={"source": f"open_clip:local-dir:{biomedclip_like_folder}", "max_tokens": 40})
    calls.clear()
    loaded, _ = load_checkpoint(path)
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(1), random_text(1)), model(images(1), random_text(1)), atol=0,
                                   rtol=0)


def test_tiny_timm_tower_builds_like_biomedclip(timm_vit_folder):
    """BiomedCLIP's tower is a timm ViT inside open_clip's TimmModel; the network builds on that layout too."""
    torch.manual_seed(0)
    model = create_model("freqmedclip", small_config(timm_vit_folder))
    assert model.semantic.backbone.width == 192 and model.external_weights == ("semantic.backbone.",)
    model.forward_train(images(1), random_text(1))["logits"].mean().backward()
    assert not trainable_gradients_ok(model)
    assert all(p.grad is None for p in model.semantic.backbone.parameters())


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


@pytest.mark.slow
def test_paper_configuration_forward_and_backward_at_224(vit_b16_folder):
    """Real ViT-B/16 (BiomedCLIP's timm layout) and ConvNeXt-Tiny architectures with random weights."""
    torch.manual_seed(0)
    model = create_model("freqmedclip", preset_config("freqmedclip", "paper",
                                                      vision_source=f"local-dir:{vit_b16_folder}"))
    assert model.semantic.backbone.width == 768 and model.semantic.backbone.grid_size == (14, 14)
    assert model.frequency.encoder.dims == (96, 192, 384, 768)
    backbone = count(model.semantic.backbone.parameters())
    convnext = count(model.frequency.encoder.stages.parameters()) + count(model.frequency.encoder.stem.parameters())
    trainable = count(p for p in model.parameters() if p.requires_grad)
    adapters = count(model.semantic.adapters.parameters())
    assert 85e6 < backbone < 87e6 and 27e6 < convnext < 29e6
    listed = trainable - convnext  # FPN, TCA, FFBI, decoders, heads: the paper's "12 M trainable parameters"
    assert 11e6 < listed < 13e6 and adapters < 0.02 * listed
    image = torch.rand(1, 3, 224, 224, requires_grad=True)
    outputs = model.forward_train(image, random_text(1, length=12, dim=768, pooled=512))
    assert all(v.shape == (1, 1, 224, 224) for v in outputs.values())
    target = torch.zeros(1, 1, 224, 224)
    target[..., 80:140, 60:130] = 1
    get_spec("freqmedclip").loss(model.config)(outputs, target)["loss"].backward()
    assert not trainable_gradients_ok(model)
    assert all(p.grad is None for p in model.semantic.backbone.parameters())
    assert image.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- checkpoints, engine, CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, vit_folder, biomedclip_like_folder, data_dir) -> list[Path]:
    source = f"open_clip:local-dir:{biomedclip_like_folder}"
    encoder = load_text_encoder(source)
    folder = tmp_path_factory.mktemp("freqmedclip-checkpoints")
    paths = []
    for seed in (0, 1):
        path = folder / f"freqmedclip-{seed}.safetensors"
        save_checkpoint(path, calibrated_model(vit_folder, encoder, data_dir, seed), architecture="freqmedclip",
                        text_encoder={"source": source, "max_tokens": 40}, name=f"small FreqMedCLIP {seed}",
                        example_prompts=[PROMPT])
        paths.append(path)
    return paths


def test_an_ensemble_of_two_checkpoints_averages_their_probabilities(checkpoints, lung2):
    a, b = (load_model(path, "cpu") for path in checkpoints)
    assert a.preprocessing.size == (224, 224) and a.preprocessing.channels == 3
    slab = Volume.from_sitk(lung2.to_sitk()[:, :, 24:30], source="lung2 slab")
    pa = InferenceEngine(a, batch_size=3).segment(slab, PROMPT, probability=True).probability
    pb = InferenceEngine(b, batch_size=3).segment(slab, PROMPT, probability=True).probability
    both = InferenceEngine([a, b], batch_size=3).segment(slab, PROMPT, probability=True)
    assert not np.allclose(pa, pb, atol=1e-3)  # two different networks
    np.testing.assert_allclose(both.probability, (pa + pb) / 2, atol=1e-6)
    np.testing.assert_array_equal(both.mask, ((pa + pb) / 2 > 0.5).astype(np.uint8))
    assert 0 < both.voxel_count < both.mask.size


def test_textseg_segment_lung2_with_a_freqmedclip_ensemble(checkpoints, data_dir, tmp_path, capsys):
    source = data_dir / "lung2_image.nrrd"
    out = tmp_path / "lung2.seg.nrrd"
    arguments = ["segment", source, "-p", PROMPT, "--name", "mass", "-o", out, "-q", "--device", "cpu",
                 "--batch-size", "8"]
    for path in checkpoints:
        arguments += ["-m", path]
    assert main([str(a) for a in arguments]) == 0, capsys.readouterr().err
    assert_same_grid(out, source)
    (segment,) = slicerio.read_segmentation(str(out))["segments"]
    assert segment["name"] == "mass"
    assert decode_tag(segment["tags"][TAG_PROMPT]) == PROMPT
    assert segment["tags"][TAG_MODEL] == "freqmedclip-0+freqmedclip-1"
    from TextSegLib.engine.checkpoints import file_sha256

    assert segment["tags"][TAG_CHECKPOINT] == ",".join(file_sha256(p) for p in checkpoints)
    mask = slicerio.segment_mask(slicerio.read_segmentation(str(out)), segment)
    assert 0 < np.count_nonzero(mask) < mask.size
