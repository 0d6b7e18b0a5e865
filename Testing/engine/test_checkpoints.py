"""The single-file checkpoint format and the model catalogue."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit import make_small_texlivernet, rewrite_metadata, save_small_checkpoint
from torch import nn

from TextSegLib import __version__
from TextSegLib.core.errors import PretrainedUnavailableError
from TextSegLib.engine.catalogue import Catalogue
from TextSegLib.engine.checkpoints import (
    CheckpointError,
    file_sha256,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
    sign_checkpoint,
    weights_digest,
)
from TextSegLib.models.registry import ModelSpec, register
from TextSegLib.text.features import TextFeatures


@dataclass(frozen=True)
class TinyConfig:
    width: int = 4


class TinyNet(nn.Module):
    """A second architecture, registered only for these tests."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(1, config.width, 3, padding=1)
        self.head = nn.Conv2d(config.width, 1, 1)

    def forward(self, image, text):
        return self.head(self.conv(image))


@dataclass(frozen=True)
class BackboneConfig:
    seed: int = 7


class BackboneNet(nn.Module):
    """A network whose frozen backbone comes from its own source (here: a seed), not from the checkpoint."""

    external_weights = ("backbone.",)

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        if config.seed < 0:
            raise PretrainedUnavailableError("the backbone 'hf-hub:nowhere/backbone' is not in the local cache")
        generator = torch.Generator().manual_seed(config.seed)
        self.backbone = nn.Conv2d(1, 3, 3, padding=1)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.randn(self.backbone.weight.shape, generator=generator))
            self.backbone.bias.copy_(torch.randn(self.backbone.bias.shape, generator=generator))
        self.backbone.requires_grad_(False)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, image, text):
        return self.head(self.backbone(image))


register(ModelSpec(name="backbonenet-test", config_class=BackboneConfig, builder=BackboneNet,
                   default_preprocessing={"size": [32, 32], "intensity": {"CT": {"kind": "window", "low": 0,
                                                                                  "high": 1}}}))
register(ModelSpec(name="tinynet-test", config_class=TinyConfig, builder=TinyNet,
                   default_preprocessing={"size": [32, 32], "intensity": {"CT": {"kind": "window", "low": 0,
                                                                                  "high": 1}}}))


def test_round_trip_keeps_weights_metadata_and_outputs(tmp_path):
    model = make_small_texlivernet(seed=3)
    info = save_checkpoint(tmp_path / "m.safetensors", model, architecture="texlivernet",
                           text_encoder={"source": "minilm", "max_tokens": 128}, name="Small", description="d",
                           example_prompts=["a nodule"], training={"epochs": 2, "val_dice": 0.5})
    assert info.sha256 == file_sha256(tmp_path / "m.safetensors") and len(info.sha256) == 64
    loaded, loaded_info = load_checkpoint(tmp_path / "m.safetensors")
    assert not loaded.training
    assert loaded_info.architecture == "texlivernet" and loaded_info.textseg_version == __version__
    assert loaded_info.config["widths"] == [16, 32, 64, 128, 256]
    assert loaded_info.preprocessing["intensity"]["CT"] == {"kind": "window", "low": -200.0, "high": 200.0}
    assert loaded_info.preprocessing["size"] == [256, 256]
    assert loaded_info.orientation == "LPS" and loaded_info.threshold == 0.5
    assert loaded_info.training == {"epochs": 2, "val_dice": 0.5} and loaded_info.example_prompts == ["a nodule"]
    assert loaded_info.sha256 == info.sha256 and loaded_info.id == "m"
    text = TextFeatures(torch.randn(1, 6, 384), torch.ones(1, 6, dtype=torch.bool), torch.randn(1, 384))
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image, text.expand(2)), loaded(image, text.expand(2)))


def test_the_file_holds_no_pickle(small_checkpoint):
    header_length = struct.unpack("<Q", small_checkpoint.read_bytes()[:8])[0]
    header = json.loads(small_checkpoint.read_bytes()[8 : 8 + header_length])
    assert "textseg" in header["__metadata__"]
    assert all(entry["dtype"] in ("F32", "I64") for key, entry in header.items() if key != "__metadata__")


def test_saving_is_atomic_and_needs_the_config(tmp_path):
    with pytest.raises(TypeError, match="config"):
        save_checkpoint(tmp_path / "x.safetensors", nn.Linear(2, 2), architecture="texlivernet",
                        text_encoder={"source": "minilm"})
    assert list(tmp_path.iterdir()) == []


def test_missing_truncated_and_foreign_files(tmp_path, small_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    data = small_checkpoint.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="damaged or incomplete"):
            load_checkpoint(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a TextSeg checkpoint"):
        load_checkpoint(foreign)
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(CheckpointError, match="PyTorch pickle"):
        load_checkpoint(pickle)


def test_tampered_weights_are_detected(tmp_path, small_checkpoint):
    state = load_file(str(small_checkpoint))
    from safetensors import safe_open

    with safe_open(str(small_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    name = sorted(state)[7]
    state[name] = state[name] + 1e-3
    tampered = tmp_path / "tampered.safetensors"
    save_file(state, str(tampered), metadata=metadata)
    with pytest.raises(CheckpointError, match="modified or damaged"):
        load_checkpoint(tampered)
    # A flipped byte inside the tensor data (same size, valid header) is caught too.
    raw = bytearray(small_checkpoint.read_bytes())
    raw[-10] ^= 0xFF
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="modified or damaged"):
        load_checkpoint(flipped)


def test_architecture_errors(tmp_path, small_checkpoint):
    with pytest.raises(CheckpointError, match="holds a texlivernet model, but a tinynet-test model"):
        load_checkpoint(small_checkpoint, expected_architecture="tinynet-test")
    unknown = tmp_path / "unknown.safetensors"
    rewrite_metadata(small_checkpoint, unknown, architecture="swin-unetr")
    with pytest.raises(CheckpointError, match=r"needs the architecture 'swin-unetr'.*texlivernet"):
        load_checkpoint(unknown)
    # Weights of another architecture under a texlivernet label.
    tiny = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny, TinyNet(TinyConfig()), architecture="tinynet-test", text_encoder={"source": "minilm"})
    relabelled = tmp_path / "relabelled.safetensors"
    rewrite_metadata(tiny, relabelled, architecture="texlivernet", config={"text_dim": 384},
                     weights_sha256=weights_digest(load_file(str(tiny))))
    with pytest.raises(CheckpointError, match=r"does not fit the texlivernet architecture.*missing.*unexpected"):
        load_checkpoint(relabelled)
    # Same architecture, other widths: mis-shaped tensors are named.
    widths = tmp_path / "widths.safetensors"
    rewrite_metadata(small_checkpoint, widths, config={"widths": [8, 16, 32, 64, 128], "text_dim": 384,
                                                       "head_width": 16})
    with pytest.raises(CheckpointError, match="wrongly shaped"):
        load_checkpoint(widths)
    bad_config = tmp_path / "bad-config.safetensors"
    rewrite_metadata(small_checkpoint, bad_config, config={"wings": 2})
    with pytest.raises(CheckpointError, match="config this TextSeg cannot build"):
        load_checkpoint(bad_config)
    # A known key with a value the network refuses while it is built (signed, as a deliberate edit would be).
    rolled = tmp_path / "rolled.safetensors"
    rewrite_metadata(small_checkpoint, rolled, config={**read_checkpoint_info(small_checkpoint).config,
                                                       "width_first_roll": 2})
    with pytest.raises(CheckpointError, match=r"cannot build: width_first_roll is -1 or \+1, got 2"):
        load_checkpoint(rolled)
    future = tmp_path / "future.safetensors"
    rewrite_metadata(small_checkpoint, future, format_version=99)
    with pytest.raises(CheckpointError, match="update TextSeg"):
        load_checkpoint(future)


def test_external_weights_stay_out_of_the_checkpoint(tmp_path):
    model = BackboneNet(BackboneConfig())
    with torch.no_grad():
        model.head.weight.normal_()
    info = save_checkpoint(tmp_path / "b.safetensors", model, architecture="backbonenet-test",
                           text_encoder={"source": "minilm"})
    assert info.external_weights == ["backbone."]
    assert sorted(load_file(str(tmp_path / "b.safetensors"))) == ["head.bias", "head.weight"]
    loaded, _ = load_checkpoint(tmp_path / "b.safetensors")
    image = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(image, None), model(image, None))
    # A backbone that cannot be loaded is a readable checkpoint error.
    rewrite_metadata(tmp_path / "b.safetensors", tmp_path / "offline.safetensors", config={"seed": -1})
    with pytest.raises(CheckpointError, match=r"needs pretrained weights that cannot be loaded.*local cache"):
        load_checkpoint(tmp_path / "offline.safetensors")
    # Without the marker, a missing backbone is an error.
    rewrite_metadata(tmp_path / "b.safetensors", tmp_path / "c.safetensors", external_weights=[])
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_catalogue_lists_resolves_and_imports(tmp_path, small_checkpoint):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    save_small_checkpoint(shipped / "demo.safetensors", seed=5)
    (shipped / "broken.safetensors").write_bytes(b"garbage")
    catalogue = Catalogue(user_dir=user, shipped_dir=shipped)
    entries = catalogue.entries()
    assert [(e.id, e.shipped) for e in entries] == [("demo", True)]
    assert entries[0].architecture_title == "TexLiverNet"
    assert entries[0].info.example_prompts
    assert catalogue.resolve("demo") == shipped / "demo.safetensors"
    assert catalogue.resolve(small_checkpoint) == small_checkpoint
    with pytest.raises(CheckpointError, match=r"No model named 'other'.*demo"):
        catalogue.resolve("other")

    entry = catalogue.import_model(small_checkpoint, "mine")
    assert entry.path == user / "mine.safetensors" and file_sha256(entry.path) == file_sha256(small_checkpoint)
    assert [e.id for e in catalogue.entries()] == ["demo", "mine"]
    with pytest.raises(CheckpointError, match="already has a model 'demo'"):
        catalogue.import_model(small_checkpoint, "demo")
    with pytest.raises(CheckpointError, match="damaged"):
        catalogue.import_model(shipped / "broken.safetensors", "broken2")
    assert not (user / "broken2.safetensors").exists()


def test_header_only_reading_is_fast_and_complete(small_checkpoint):
    info = read_checkpoint_info(small_checkpoint, with_sha256=False)
    assert info.sha256 is None and info.text_encoder == {"source": "minilm", "max_tokens": 128}
    assert read_checkpoint_info(small_checkpoint).sha256 == file_sha256(small_checkpoint)


def test_settings_are_covered_by_the_digest_and_old_files_can_be_signed(tmp_path, small_checkpoint):
    """Edited settings are refused; a format-1 file (weights digest only) is refused until signed, and signing is
    reproducible (the same bytes twice) and refuses weights that do not match their recorded digest."""
    edited = tmp_path / "edited.safetensors"
    rewrite_metadata(small_checkpoint, edited, sign=False, threshold=0.1)
    with pytest.raises(CheckpointError, match="was modified after it was saved"):
        read_checkpoint_info(edited)
    old = tmp_path / "old.safetensors"
    rewrite_metadata(small_checkpoint, old, sign=False, format_version=1, digest=None)
    with pytest.raises(CheckpointError, match="if you trust the file, sign it: textseg sign"):
        load_checkpoint(old)
    first, second = sign_checkpoint(old, tmp_path / "a.safetensors"), sign_checkpoint(old, tmp_path / "b.safetensors")
    assert first.sha256 == second.sha256
    model, info = load_checkpoint(tmp_path / "a.safetensors")
    assert info.digest == read_checkpoint_info(small_checkpoint).digest  # the same settings, the same digest
    assert weights_digest(model.state_dict()) == info.weights_sha256
    broken = tmp_path / "broken.safetensors"
    rewrite_metadata(small_checkpoint, broken, sign=False, format_version=1, weights_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="do not match"):
        sign_checkpoint(broken)


def test_signing_refuses_what_it_cannot_vouch_for(tmp_path, small_checkpoint):
    """A format newer than this TextSeg (signing would make it an older one), settings holding NaN (no digest can
    be computed), a missing file and a pickle: one-line CheckpointErrors, and no file is written."""
    future = tmp_path / "future.safetensors"
    rewrite_metadata(small_checkpoint, future, sign=False, format_version=99)
    nan = tmp_path / "nan.safetensors"
    rewrite_metadata(small_checkpoint, nan, sign=False, format_version=1,
                     config={**read_checkpoint_info(small_checkpoint).config, "width_first_roll": float("nan")})
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    for path, message in ((future, r"format version 99, which this TextSeg \(.*\) cannot read; update TextSeg"),
                          (nan, "cannot be signed: its settings hold a value that is not a finite number"),
                          (tmp_path / "nope.safetensors", "Model file not found"),
                          (pickle, "is a PyTorch pickle")):
        with pytest.raises(CheckpointError, match=message):
            sign_checkpoint(path, tmp_path / "signed.safetensors")
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_the_shipped_checkpoint_is_signed():
    from TextSegLib.engine.catalogue import SHIPPED_MODELS_DIR
    from TextSegLib.evaluation.demo import DEMO_MODEL

    _, info = load_checkpoint(SHIPPED_MODELS_DIR / f"{DEMO_MODEL}.safetensors")
    assert info.digest and info.threshold == 0.5 and info.orientation == "LPS"
