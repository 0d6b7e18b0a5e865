"""TexLiverNet: the whole network, its configurations, ablation switches, loss and the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from TextSegLib.core.errors import TextSegError
from TextSegLib.models.registry import architectures, config_from_dict, create_model, get_spec, preset_config
from TextSegLib.models.texlivernet import TexLiverNet, TexLiverNetConfig
from TextSegLib.text.features import TextFeatures


def random_text(batch: int, length: int = 9, dim: int = 384, seed: int = 0) -> TextFeatures:
    generator = torch.Generator().manual_seed(seed)
    return TextFeatures(torch.randn(batch, length, dim, generator=generator),
                        torch.ones(batch, length, dtype=torch.bool), torch.randn(batch, dim, generator=generator))


def test_registry_knows_texlivernet_and_explains_unknown_names():
    assert "texlivernet" in architectures()
    with pytest.raises(KeyError, match=r"^unknown architecture 'no-such-net'; this TextSeg knows: ") as unknown:
        get_spec("no-such-net")
    assert "texlivernet" in str(unknown.value)
    assert isinstance(unknown.value, TextSegError)  # a user's misspelt name, said in one unquoted line
    with pytest.raises(ValueError, match="unknown texlivernet config keys: bogus"):
        config_from_dict("texlivernet", {"bogus": 1})
    with pytest.raises(KeyError, match=r"^texlivernet has no preset 'huge'; presets: ") as preset:
        preset_config("texlivernet", "huge")
    assert isinstance(preset.value, TextSegError)


def test_paper_widths_are_the_default_and_small_is_smaller():
    paper = preset_config("texlivernet", "paper")
    small = preset_config("texlivernet", "small")
    assert paper == TexLiverNetConfig()
    assert paper.widths == (64, 128, 256, 512, 1024) and paper.text_dim == 768  # PubMedBERT width
    assert small.widths == (16, 32, 64, 128, 256)
    def count(config) -> int:
        return sum(p.numel() for p in create_model("texlivernet", config).parameters())

    assert count(small) * 10 < count(paper)


@pytest.mark.slow
def test_paper_configuration_forward_and_backward_at_256():
    torch.manual_seed(0)
    model = create_model("texlivernet", preset_config("texlivernet", "paper"))
    image = torch.randn(2, 1, 256, 256, requires_grad=True)
    logits = model(image, random_text(2, dim=768))
    assert logits.shape == (2, 1, 256, 256)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.rand_like(logits).round()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [name for name, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters without gradient signal: {zero}"
    assert image.grad.abs().sum() > 0


def test_small_configuration_forward_backward_and_loss():
    torch.manual_seed(0)
    config = preset_config("texlivernet", "small", text_dim=384)
    model = create_model("texlivernet", config)
    spec = get_spec("texlivernet")
    loss_fn = spec.loss(config)
    target = torch.zeros(2, 1, 256, 256)
    target[:, :, 100:140, 90:160] = 1
    outputs = model.forward_train(torch.randn(2, 1, 256, 256), random_text(2))
    losses = loss_fn(outputs, target)
    assert set(losses) == {"loss", "bce", "dice"}
    torch.testing.assert_close(losses["loss"], 0.8 * losses["bce"] + 0.2 * losses["dice"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_module_switches_build_the_table_2_ablation():
    def modules(**switches):
        model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384, **switches))
        names = {type(m).__name__ for m in model.modules()}
        return model, names

    base, names = modules(use_tia=False, use_sfpm_s=False, use_sfpm_f=False)
    assert not names & {"TextImageAgentAttention", "SpatialFrequencyPerceptionS", "SpatialFrequencyPerceptionF"}
    assert "DORMLPBlock" in names  # the RollingUnet base keeps its DOR-MLP stages
    _, names = modules(use_tia=True, use_sfpm_s=False, use_sfpm_f=False)
    assert "TextImageAgentAttention" in names and "SpatialFrequencyPerceptionF" not in names
    _, names = modules(use_tia=False, use_sfpm_s=True, use_sfpm_f=True)
    assert {"SpatialFrequencyPerceptionS", "SpatialFrequencyPerceptionF"} <= names
    assert "TextImageAgentAttention" not in names
    for model in (base,):
        assert model(torch.randn(1, 1, 64, 64), None).shape == (1, 1, 64, 64)


def test_sfpm_sits_on_all_four_skips_and_beside_both_rolling_stages():
    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384))
    assert all(type(skip).__name__ == "SpatialFrequencyPerceptionF" for skip in model.skips)
    assert model.stage4.spatial is not None and model.bottleneck.spatial is not None


def test_prompt_reaches_the_output_only_through_tia():
    torch.manual_seed(0)
    image = torch.randn(2, 1, 64, 64)
    a, b = random_text(1, seed=1), random_text(1, seed=2)
    with_tia = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384)).eval()
    with torch.no_grad():
        assert not torch.allclose(with_tia(image, a.expand(2)), with_tia(image, b.expand(2)), atol=1e-6)
    without = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384, use_tia=False)).eval()
    with torch.no_grad():
        assert torch.equal(without(image, a.expand(2)), without(image, b.expand(2)))


def test_tia_needs_text_and_sizes_must_divide_by_16():
    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384)).eval()
    with pytest.raises(ValueError, match="needs text"):
        model(torch.randn(1, 1, 64, 64), None)
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 1, 72, 64), random_text(1))


def test_eval_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384)).eval()
    image, text = torch.randn(3, 1, 64, 64), random_text(1)
    with torch.no_grad():
        batched = model(image, text.expand(3))
        single = torch.cat([model(image[i : i + 1], text) for i in range(3)])
        again = model(image, text.expand(3))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert torch.equal(batched, again)


def test_head_bias_sets_the_initial_foreground_prior():
    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384, head_bias=-4.6)).eval()
    assert torch.all(model.head.bias == -4.6)
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 64, 64), random_text(1))
    assert float(torch.sigmoid(logits).mean()) < 0.1  # starts near the prior, not at 0.5


def test_config_round_trips_through_a_dict():
    config = preset_config("texlivernet", "small", text_dim=384, use_tia=False)
    assert config_from_dict("texlivernet", dataclasses.asdict(config)) == config
    assert isinstance(create_model("texlivernet", dataclasses.asdict(config)), TexLiverNet)


def test_authors_preset_is_the_public_image_branch_layout():
    """One dense SFPM-s in series after the bottleneck, none beside the DOR-MLP stages; positional SFPM-f on the
    three shallow skips only, each added as x + s f(x) with s from 0.01; decoder convolutions in -> in -> out."""
    from TextSegLib.models.blocks import DenseSpatialPerception, PositionalFrequencyBranch, ScaledResidual

    config = preset_config("texlivernet", "authors", widths=(8, 16, 32, 64, 128), head_width=8, text_dim=384)
    model = create_model("texlivernet", config)
    assert model.stage4.spatial is None and model.bottleneck.spatial is None
    assert isinstance(model.series, ScaledResidual) and isinstance(model.series.branch, DenseSpatialPerception)
    assert [type(skip.branch).__name__ if isinstance(skip, ScaledResidual) else type(skip).__name__
            for skip in model.skips] == ["PositionalFrequencyBranch"] * 3 + ["Identity"]
    assert all(float(m.scale.detach()) == pytest.approx(0.01) for m in model.modules() if isinstance(m, ScaledResidual))
    assert sum(isinstance(m, PositionalFrequencyBranch) for m in model.modules()) == 3
    assert [model.dec3[0][0].out_channels, model.dec2[0][0].out_channels] == [32, 16]  # widen first: in -> in
    # Each frequency filter lives on its skip's half spectrum: 64 x 33 at full resolution of a 64 x 64 input.
    assert model.skips[0].branch.filter.weights.shape[1:3] == (config.image_size, config.image_size // 2 + 1)
    image = torch.randn(2, 1, 64, 64)
    logits = model(image, random_text(2))
    assert logits.shape == (2, 1, 64, 64)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_authors_preset_image_branch_has_the_authors_parameter_count():
    """The image branch (TIA off) of the paper-width ``authors`` preset has the parameter count of the authors'
    released model (40.42 M measured with their code; the 0.01 M left are biases before BatchNorm, which this
    package leaves out). The ``paper`` preset keeps the paper's reading and is larger."""
    def millions(preset: str) -> float:
        model = create_model("texlivernet", preset_config("texlivernet", preset, use_tia=False))
        return sum(p.numel() for p in model.parameters()) / 1e6

    assert millions("authors") == pytest.approx(40.42, abs=0.015)
    assert millions("paper") > millions("authors") + 5


def test_unknown_layout_names_are_refused():
    for key, value in (("sfpm_s_layout", "diagonal"), ("sfpm_s_block", "sparse"), ("sfpm_f_kind", "wavelet"),
                       ("sfpm_f_levels", (0, 1)), ("width_first_roll", 2)):
        with pytest.raises(ValueError, match=key.split("_levels")[0]):
            create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384, **{key: value}))


def test_the_catalogue_says_what_the_text_does():
    describe = get_spec("texlivernet").describe_text
    assert "changes the output" in describe(preset_config("texlivernet", "paper"))
    assert "ignored" in describe(preset_config("texlivernet", "paper", use_tia=False))


def test_checkpoints_from_before_the_roll_fix_keep_their_function(tmp_path):
    """A checkpoint saved now stores width_first_roll = -1 (RollingUnet's direction); one saved before the key
    existed was trained with +1, and loads so once signed in the current format."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from TextSegLib.engine.checkpoints import load_checkpoint, save_checkpoint, sign_checkpoint

    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384))
    path = tmp_path / "new.safetensors"
    save_checkpoint(path, model, architecture="texlivernet", text_encoder={"source": "minilm"})
    assert load_checkpoint(path)[0].config.width_first_roll == -1
    with safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()["textseg"])
    tensors = load_file(str(path))
    del header["config"]["width_first_roll"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"textseg": json.dumps(header)})
    sign_checkpoint(old)  # as an older file is upgraded to the current format (textseg sign)
    loaded = load_checkpoint(old)[0]
    assert loaded.config.width_first_roll == 1
    assert loaded.bottleneck.mlp.long_range.width_first.signs == (1, 1)
