"""Encoded prompts (:class:`TextFeatures`), the base class of the frozen text encoders and the prompt cache.

Every encoder is frozen (no gradients, eval mode) and returns :class:`TextFeatures`: per-token features (what
TexLiverNet's agent attention reads), a validity mask and a pooled embedding. Prompts are encoded once per
(encoder, prompt): :meth:`TextEncoder.encode_cached` keeps a process-wide LRU cache (:data:`PROMPT_CACHE`), so a
volume of many slices, or a re-prompt in Slicer, never encodes the same text twice.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from TextSegLib.core.errors import TextSegError
from TextSegLib.core.options import validate_prompt

__all__ = [
    "TextEncoder",
    "TextEncoderUnavailableError",
    "TextFeatures",
]

log = logging.getLogger("textseg")

MINILM = "minilm"


class TextEncoderUnavailableError(TextSegError, RuntimeError):
    """The named text encoder cannot be loaded (not installed, not downloaded, unknown source)."""


@dataclass(frozen=True)
class TextFeatures:
    """Encoded prompts.

    Attributes:
        tokens: ``(N, L, D)`` per-token features of the last layer.
        mask: ``(N, L)`` bool, True where a token is real (False = padding).
        pooled: ``(N, P)`` one embedding per prompt.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def expand(self, batch: int) -> TextFeatures:
        """Broadcast a single prompt to ``batch`` rows (a view, no copy)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} prompts to a batch of {batch}")
        return TextFeatures(
            self.tokens.expand(batch, -1, -1), self.mask.expand(batch, -1), self.pooled.expand(batch, -1)
        )

    @staticmethod
    def stack(items: Sequence[TextFeatures]) -> TextFeatures:
        """Concatenate encoded prompts, padding tokens to the longest (padding is masked out)."""
        length = max(item.tokens.shape[1] for item in items)
        tokens, masks = [], []
        for item in items:
            pad = length - item.tokens.shape[1]
            tokens.append(nn.functional.pad(item.tokens, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(item.mask, (0, pad), value=False))
        return TextFeatures(torch.cat(tokens), torch.cat(masks), torch.cat([item.pooled for item in items]))


class _PromptCache:
    """Thread-safe LRU cache of :class:`TextFeatures` keyed by (encoder key, prompt)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], TextFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> TextFeatures | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[str, str], value: TextFeatures) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.hits = self.misses = 0


PROMPT_CACHE = _PromptCache()


class TextEncoder(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the frozen text encoders.

    Subclasses set ``source`` (the string they were loaded from), ``dim`` (token feature width),
    ``pooled_dim`` and ``max_tokens`` (the most tokens one prompt keeps, special tokens included) and implement
    :meth:`_tokenize` and :meth:`_encode_ids`.
    """

    source: str
    dim: int
    pooled_dim: int
    max_tokens: int

    def freeze(self) -> TextEncoder:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> TextEncoder:
        """Text encoders stay in eval mode (frozen), whatever the surrounding training loop asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def cache_key(self) -> str:
        return f"{self.source}|{self.max_tokens}|{self.device}"

    @abc.abstractmethod
    def token_count(self, prompt: str) -> int:
        """Number of tokens the prompt needs, special tokens included, before truncation."""

    @abc.abstractmethod
    def _tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids (and attention mask where the encoder takes one), truncated to ``max_tokens``."""

    @abc.abstractmethod
    def _encode_ids(self, batch: dict[str, torch.Tensor]) -> TextFeatures:
        """Run the frozen network on tokenized prompts."""

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Encode prompts (validated, truncated with a warning when too long) without the cache.

        Returns features on the encoder's device; ``tokens`` is ``(N, L, dim)`` with ``L`` the longest prompt.
        """
        prompts = [validate_prompt(p) for p in prompts]
        for prompt in prompts:
            count = self.token_count(prompt)
            if count > self.max_tokens:
                words = prompt.split()
                start = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
                log.warning(
                    "The prompt %r is %d tokens long but the text encoder %s reads at most %d; the end of the "
                    "prompt is ignored.", start, count, self.source, self.max_tokens,
                )
        batch = {k: v.to(self.device) for k, v in self._tokenize(prompts).items()}
        with torch.inference_mode():
            features = self._encode_ids(batch)
        return TextFeatures(features.tokens.float(), features.mask.bool(), features.pooled.float())

    def encode_cached(self, prompt: str) -> TextFeatures:
        """Encode one prompt through the process-wide LRU cache. Returns ``(1, L, dim)`` features."""
        key = (self.cache_key, validate_prompt(prompt))
        cached = PROMPT_CACHE.get(key)
        if cached is None:
            cached = self.encode([key[1]])
            PROMPT_CACHE.put(key, cached)
        return cached


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``(N, L, D)`` token features over the real tokens of an ``(N, L)`` bool mask: ``(N, D)``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
