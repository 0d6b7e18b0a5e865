"""Intensity normalisation and resizing, as stored in checkpoints and shared by training and inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from TextSegLib.engine.preprocessing import IntensitySpec, Preprocessing


def test_window_clips_and_scales_hounsfield_units(lung2):
    mapping = IntensitySpec("window", -200.0, 200.0).mapping(lung2.array)
    values = torch.tensor([-1000.0, -200.0, 0.0, 100.0, 200.0, 3000.0])
    torch.testing.assert_close(mapping.apply(values), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_minmax_uses_the_whole_volume(lung2):
    mapping = IntensitySpec("minmax").mapping(lung2.array)
    low, high = float(lung2.array.min()), float(lung2.array.max())
    torch.testing.assert_close(mapping.apply(torch.tensor([low, (low + high) / 2, high])),
                               torch.tensor([0.0, 0.5, 1.0]))


def test_percentile_window_of_a_real_mr(data_dir):
    from TextSegLib.io.volumes import read_volume

    brain = read_volume(data_dir / "brain1_image.nrrd").array
    mapping = IntensitySpec("percentile", 1.0, 99.0).mapping(brain)
    low, high = np.percentile(brain.astype(np.float64), [1.0, 99.0])
    out = mapping.apply(torch.tensor([low, high, high * 10], dtype=torch.float32))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 1.0]), atol=1e-5, rtol=0)


def test_zscore_standardises_without_clipping():
    array = np.random.default_rng(0).normal(50.0, 4.0, size=(8, 32, 32)).astype(np.float32)
    out = IntensitySpec("zscore").mapping(array).apply(torch.from_numpy(array))
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-3
    assert float(out.max()) > 3.0  # not clipped


def test_constant_volumes_do_not_divide_by_zero():
    constant = np.full((2, 4, 4), 7.0, dtype=np.float32)
    for spec in (IntensitySpec("minmax"), IntensitySpec("percentile", 1, 99), IntensitySpec("zscore")):
        assert torch.isfinite(spec.mapping(constant).apply(torch.from_numpy(constant))).all()


def test_invalid_specs():
    with pytest.raises(ValueError, match="unknown intensity"):
        IntensitySpec("hist-eq")
    with pytest.raises(ValueError, match="low < high"):
        IntensitySpec("window", 200, -200)


def test_prepare_resizes_repeats_channels_and_picks_the_modality():
    preprocessing = Preprocessing.from_metadata({"size": [64, 48], "intensity": {
        "CT": {"kind": "window", "low": -200, "high": 200}, "MR": {"kind": "zscore"}}}, channels=3)
    assert preprocessing.intensity_for("ct").kind == "window" and preprocessing.intensity_for("MR").kind == "zscore"
    assert preprocessing.intensity_for("PET").kind == "window"  # unknown: the first listed
    assert preprocessing.intensity_for(None).kind == "window"
    slices = torch.linspace(-400, 400, 2 * 128 * 96).reshape(2, 128, 96)
    mapping = preprocessing.intensity_for("CT").mapping(slices.numpy())
    out = preprocessing.prepare(slices, mapping)
    assert out.shape == (2, 3, 64, 48) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 2])
    expected = F.interpolate(mapping.apply(slices)[:, None], size=(64, 48), mode="bilinear", align_corners=False,
                             antialias=True)[:, 0]
    torch.testing.assert_close(out[:, 1], expected)


def test_prepare_keeps_slices_of_the_right_size_untouched():
    preprocessing = Preprocessing.from_metadata({"size": [32, 32], "intensity": {"CT": {"kind": "window",
                                                                                         "low": 0, "high": 10}}})
    slices = torch.rand(3, 32, 32) * 10
    out = preprocessing.prepare(slices, preprocessing.intensity_for("CT").mapping(slices.numpy()))
    torch.testing.assert_close(out[:, 0], slices / 10)
