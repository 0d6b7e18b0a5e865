"""Shapes, gradients and defining properties of every network block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testkit import check_shape_and_gradients

from TextSegLib.models.blocks import (
    DORMLP,
    ORMLP,
    AdaptiveFrequencyFilter,
    ConvNormAct,
    DenseSpatialPerception,
    DORMLPBlock,
    DoubleConv,
    LayerNorm2d,
    PartialConv,
    PositionalFrequencyBranch,
    PositionalFrequencyFilter,
    ScaledResidual,
    SpatialFrequencyPerceptionF,
    SpatialFrequencyPerceptionS,
    StarReLU,
    TextImageAgentAttention,
    channel_roll,
)
from TextSegLib.models.blocks.frequency import hermitian_irfft2, max_filter3x3


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("sign", [1, -1])
def test_channel_roll_equals_per_channel_torch_roll(dim, sign):
    x = torch.randn(2, 7, 5, 6)
    expected = torch.stack([torch.roll(x[:, c], sign * c, dims=dim - 1) for c in range(x.shape[1])], dim=1)
    assert torch.equal(channel_roll(x, dim, sign), expected)


def test_channel_roll_rejects_channel_dim():
    with pytest.raises(ValueError):
        channel_roll(torch.randn(1, 2, 3, 3), 1)


def test_channel_roll_has_no_python_loop_over_channels():
    """The roll is one gather: its cost in autograd nodes does not grow with the channel count."""
    def node_count(channels: int) -> int:
        x = torch.randn(1, channels, 8, 8, requires_grad=True)
        y = channel_roll(x, 2)
        seen, stack = set(), [y.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
        return len(seen)

    assert node_count(4) == node_count(64)


def test_layernorm2d_matches_layernorm_over_channels():
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 4, 5)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)
    check_shape_and_gradients(norm, x, expected=(2, 6, 4, 5))


def test_conv_blocks():
    check_shape_and_gradients(ConvNormAct(3, 8, dilation=2), torch.randn(2, 3, 16, 16), expected=(2, 8, 16, 16))
    check_shape_and_gradients(DoubleConv(3, 8), torch.randn(2, 3, 16, 16), expected=(2, 8, 16, 16))


def test_ormlp_and_dormlp_shapes_and_gradients():
    x = torch.randn(2, 8, 12, 10)
    check_shape_and_gradients(ORMLP(8, first_dim=2), x, expected=(2, 8, 12, 10))
    check_shape_and_gradients(DORMLP(8), torch.randn(2, 8, 12, 10), expected=(2, 8, 12, 10))
    check_shape_and_gradients(DORMLPBlock(8), torch.randn(2, 8, 12, 10), expected=(2, 8, 12, 10))


def identity_mixes(branch: ORMLP) -> ORMLP:
    """An OR-MLP whose two channel mixes are the identity (no bias): only the rolls and GELU remain."""
    with torch.no_grad():
        for mix in (branch.mix1, branch.mix2):
            mix.weight.copy_(torch.eye(mix.weight.shape[0]).reshape(mix.weight.shape))
            mix.bias.zero_()
    return branch.eval()


def test_dormlp_rolls_in_rollingunets_directions():
    """A unit impulse in channel 1 at (row 2, column 2) of a 5 x 5 map, through each OR-MLP of a DOR-MLP with
    identity mixes. RollingUnet's Lo2 rolls channel c by +c along the height then +c along the width in one branch,
    and by -c along the width then +c along the height in the other, so the impulse lands at (3, 3) and at (3, 1);
    channel 0 never moves. Between the rolls GELU maps the 1 to GELU(1) = 0.8413447."""
    x = torch.zeros(1, 2, 5, 5)
    x[0, 1, 2, 2] = 1.0
    dormlp = DORMLP(2)
    with torch.no_grad():
        height_first = identity_mixes(dormlp.height_first)(x)
        width_first = identity_mixes(dormlp.width_first)(x)
    expected_height_first = torch.zeros(1, 2, 5, 5)
    expected_height_first[0, 1, 3, 3] = 0.8413447
    expected_width_first = torch.zeros(1, 2, 5, 5)
    expected_width_first[0, 1, 3, 1] = 0.8413447
    torch.testing.assert_close(height_first, expected_height_first)
    torch.testing.assert_close(width_first, expected_width_first)


def test_ormlp_rejects_bad_axes_and_directions():
    with pytest.raises(ValueError, match="dim 2 or 3"):
        ORMLP(2, first_dim=1)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        ORMLP(2, first_dim=2, signs=(2, 1))


def test_ormlp_reaches_far_pixels():
    """An OR-MLP's output at one pixel depends on pixels far away along both axes (long-range mixing),
    unlike a 3x3 convolution."""
    torch.manual_seed(0)
    block = ORMLP(16, first_dim=2).eval()
    x = torch.zeros(1, 16, 16, 16, requires_grad=True)
    block(x)[0, :, 0, 0].sum().backward()
    influence = x.grad.abs().sum(dim=1)[0]
    assert influence[8:, 8:].sum() > 0, "no influence from the far quadrant"


def test_star_relu():
    act = StarReLU(scale=2.0, bias=-1.0)
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    torch.testing.assert_close(act(x), torch.tensor([-1.0, -1.0, -0.5, 7.0]))
    check_shape_and_gradients(act, torch.randn(3, 4) + 1.0, expected=(3, 4))


def test_adaptive_frequency_filter():
    module = AdaptiveFrequencyFilter(4)
    spectrum = torch.fft.rfft2(torch.randn(2, 4, 8, 8))
    out = module(spectrum)
    assert out.shape == spectrum.shape and out.is_complex()
    (out.abs() ** 2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_adaptive_frequency_filter_equals_its_formula():
    """G reads the 2C real inputs [Re X_1..Re X_C, Im X_1..Im X_C] at each frequency, whatever its memory layout."""
    torch.manual_seed(0)
    module = AdaptiveFrequencyFilter(3).eval()
    torch.nn.init.normal_(module.fc2.weight, std=0.3)
    torch.nn.init.normal_(module.norm.weight, mean=1.0, std=0.3)
    spectrum = torch.fft.rfft2(torch.randn(2, 3, 6, 10))
    stacked = torch.cat([spectrum.real, spectrum.imag], dim=1).permute(0, 2, 3, 1)  # (B, H, W_f, 2C)
    normed = F.layer_norm(stacked, (6,), module.norm.weight, module.norm.bias, module.norm.eps)
    hidden = normed @ module.fc1.weight[:, :, 0, 0].T + module.fc1.bias
    hidden = module.act.scale * F.relu(hidden) ** 2 + module.act.bias
    out = (hidden @ module.fc2.weight[:, :, 0, 0].T + module.fc2.bias).permute(0, 3, 1, 2)
    expected = torch.complex(out[:, :3], out[:, 3:])
    with torch.no_grad():
        torch.testing.assert_close(module(spectrum), expected, atol=1e-5, rtol=1e-5)


def test_sfpm_f_is_identity_when_the_filter_is_one():
    module = SpatialFrequencyPerceptionF(4).eval()
    with torch.no_grad():
        module.filter.fc2.weight.zero_()
    x = torch.randn(2, 4, 16, 12)
    torch.testing.assert_close(module(x), x, atol=1e-5, rtol=1e-5)


def test_sfpm_f_filters_the_high_frequencies():
    """A filter G = 0 removes the coarse high-frequency part: the output is the smoothed skip I_s."""
    module = SpatialFrequencyPerceptionF(4).eval()
    with torch.no_grad():
        module.filter.fc2.weight.zero_()
        module.filter.fc2.bias.zero_()
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(module(x), module.project(F.max_pool2d(x, 3, stride=1, padding=1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(8, 10), (7, 9)])
def test_hermitian_irfft2_keeps_the_real_part_of_each_row_transform(size):
    """A non-Hermitian half spectrum is read as sum_k Re(Z_k e^(2 pi i k w / W)) with Z the inverse transform along
    H and the edge columns counted once: written out in float64 here, independently of any FFT library."""
    height, width = size
    generator = torch.Generator().manual_seed(3)
    half = torch.complex(torch.randn(2, height, width // 2 + 1, generator=generator, dtype=torch.float64),
                         torch.randn(2, height, width // 2 + 1, generator=generator, dtype=torch.float64))
    rows = np.fft.ifft(half.numpy(), axis=-2, norm="ortho")
    k = np.arange(width // 2 + 1)
    weight = np.where((k == 0) | ((width % 2 == 0) & (k == width // 2)), 1.0, 2.0)
    phase = np.exp(2j * np.pi * np.outer(k, np.arange(width)) / width)
    reference = np.einsum("bhk,kw->bhw", rows * weight, phase).real / np.sqrt(width)
    original = half.clone()
    np.testing.assert_allclose(hermitian_irfft2(half, size).numpy(), reference, atol=1e-12)
    assert torch.equal(half, original)  # a copy was projected
    np.testing.assert_allclose(torch.fft.irfft2(half, s=size, norm="ortho").numpy(), reference, atol=1e-12)
    np.testing.assert_allclose(hermitian_irfft2(half, size, overwrite=True).numpy(), reference, atol=1e-12)
    assert not torch.equal(half, original)  # the edge columns themselves were projected


def test_max_filter_equals_max_pooling():
    x = torch.randn(2, 3, 9, 7)
    assert torch.equal(max_filter3x3(x), F.max_pool2d(x, 3, stride=1, padding=1))


def test_sfpm_f_shapes_and_gradients():
    check_shape_and_gradients(SpatialFrequencyPerceptionF(6), torch.randn(2, 6, 16, 12), expected=(2, 6, 16, 12))


def test_sfpm_s_shapes_gradients_and_dilations():
    module = SpatialFrequencyPerceptionS(16)
    assert [layer[0].dilation for layer in module.dilated] == [(2, 2), (4, 4), (2, 2)]
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5  # two standard, three dilated
    check_shape_and_gradients(module, torch.randn(2, 16, 16, 16), expected=(2, 16, 16, 16))


def test_partial_conv_touches_only_a_quarter_of_the_channels():
    module = PartialConv(8)
    x = torch.randn(2, 8, 6, 6)
    out = module(x)
    assert torch.equal(out[:, 2:], x[:, 2:])
    assert not torch.allclose(out[:, :2], x[:, :2])
    check_shape_and_gradients(module, torch.randn(2, 8, 6, 6), expected=(2, 8, 6, 6))


def make_tia(heads: int = 1) -> TextImageAgentAttention:
    torch.manual_seed(0)
    return TextImageAgentAttention(channels=16, text_dim=12, grid_size=(8, 8), max_text_tokens=10,
                                   agent_grid=3, heads=heads).eval()


@pytest.mark.parametrize("heads", [1, 4])
def test_tia_shapes_and_gradients(heads):
    tia = make_tia(heads)
    image, tokens = torch.randn(2, 16, 8, 8), torch.randn(2, 5, 12)
    mask = torch.ones(2, 5, dtype=torch.bool)
    check_shape_and_gradients(tia, image, tokens, mask, expected=(2, 16, 8, 8))


def test_tia_matches_equations_1_to_3():
    """Recompute Eq. 1-3 step by step for one head."""
    tia = make_tia()
    image, tokens = torch.randn(1, 16, 8, 8), torch.randn(1, 5, 12)
    mask = torch.ones(1, 5, dtype=torch.bool)
    q = (tia.query(image) + tia.pos_image).flatten(2)[0].T  # (HW, C)
    agents = F.adaptive_avg_pool2d((tia.query(image) + tia.pos_image), 3).flatten(2)[0].T  # (n, C)
    k = tia.key(tokens)[0] + tia.pos_text[0, :5]
    v = tia.value(tokens)[0] + tia.pos_text[0, :5]
    d = 16 ** 0.5
    o = torch.softmax(q @ agents.T / d, -1) @ torch.softmax(agents @ k.T / d, -1) @ v  # (HW, C)
    expected = o.T.reshape(1, 16, 8, 8) + tia.recover[1](tia.recover[0](image))
    torch.testing.assert_close(tia(image, tokens, mask), expected, atol=1e-5, rtol=1e-5)


def test_tia_ignores_padding_tokens():
    tia = make_tia()
    image, tokens = torch.randn(1, 16, 8, 8), torch.randn(1, 4, 12)
    padded = torch.cat([tokens, torch.randn(1, 3, 12)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    torch.testing.assert_close(tia(image, padded, mask), tia(image, tokens, torch.ones(1, 4, dtype=torch.bool)))


def test_tia_depends_on_the_text_and_broadcasts_one_prompt():
    tia = make_tia()
    image = torch.randn(3, 16, 8, 8)
    a, b = torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert not torch.allclose(tia(image, a, mask), tia(image, b, mask))
    torch.testing.assert_close(tia(image, a, mask), tia(image, a.expand(3, -1, -1), mask.expand(3, -1)))


def test_tia_resizes_its_image_position_encoding_and_limits_tokens():
    tia = make_tia()
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert tia(torch.randn(1, 16, 12, 10), torch.randn(1, 5, 12), mask).shape == (1, 16, 12, 10)
    with pytest.raises(ValueError, match="at most 10"):
        tia(torch.randn(1, 16, 8, 8), torch.randn(1, 11, 12), torch.ones(1, 11, dtype=torch.bool))


def test_scaled_residual_adds_a_scaled_branch():
    branch = torch.nn.Conv2d(3, 3, 1)
    module = ScaledResidual(branch, 0.01)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(module(x), x + 0.01 * branch(x))
    check_shape_and_gradients(module, x, expected=(2, 3, 5, 5))


def test_dense_spatial_perception_shapes_and_gradients():
    check_shape_and_gradients(DenseSpatialPerception(8), torch.randn(2, 8, 12, 12), expected=(2, 8, 12, 12))
    with pytest.raises(ValueError, match="even"):
        DenseSpatialPerception(7)


def test_positional_frequency_filter_equals_its_formula_and_ignores_the_spectrums_values():
    """G[b, m] = sum_k softmax_k(route(mean x))[b, k, m] W_k: it depends on the frequency position and on the
    global mean of the features, never on the spectrum's values."""
    torch.manual_seed(0)
    module = PositionalFrequencyFilter(channels=4, spectrum_channels=6, size=8, filters=3)
    x = torch.randn(2, 4, 8, 8)
    spectrum = torch.fft.rfft2(torch.randn(2, 6, 8, 8), norm="ortho")
    out = module(x, spectrum)
    routing = module.route(x.mean(dim=(2, 3))).view(2, 3, 6).softmax(dim=1)
    weights = torch.view_as_complex(module.weights.detach())  # (K, 8, 5)
    expected = torch.zeros(2, 6, 8, 5, dtype=torch.complex64)
    for k in range(3):
        expected += routing[:, k, :, None, None] * weights[k]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(module(x, 10 * spectrum + 3), out)
    assert not torch.allclose(out[..., 0, 1], out[..., 1, 0])  # two frequencies, two responses


def test_positional_frequency_filter_is_resized_to_another_grid():
    module = PositionalFrequencyFilter(channels=4, spectrum_channels=4, size=8)
    spectrum = torch.fft.rfft2(torch.randn(1, 4, 16, 16), norm="ortho")
    assert module(torch.randn(1, 4, 16, 16), spectrum).shape == spectrum.shape


def test_positional_frequency_branch_with_a_unit_filter_is_its_pointwise_layers():
    """With every W_k = 1 the filter is 1 (the mixing weights sum to one) and FFT + inverse FFT give the input
    back: the branch reduces to W_2 StarReLU(W_1 x)."""
    torch.manual_seed(0)
    module = PositionalFrequencyBranch(4, size=8)
    with torch.no_grad():
        module.filter.weights.zero_()
        module.filter.weights[..., 0] = 1.0
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(module(x), module.project(module.act(module.expand(x))), atol=1e-5, rtol=1e-5)
    check_shape_and_gradients(PositionalFrequencyBranch(4, size=8), torch.randn(2, 4, 8, 8), expected=(2, 4, 8, 8))
