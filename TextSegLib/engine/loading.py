"""Loaded models: a checkpoint's network with its text encoder and preprocessing on a device, kept in memory for the
next run (the worker keeps them between runs): the :data:`MODEL_CACHE_SIZE` most recently used, and only the newest
version of a file."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from TextSegLib.engine.batching import BatchTuner
from TextSegLib.engine.catalogue import Catalogue
from TextSegLib.engine.checkpoints import CheckpointError, CheckpointInfo, load_checkpoint
from TextSegLib.engine.devices import resolve_device
from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.text.features import TextEncoder
from TextSegLib.text.sources import load_text_encoder

__all__ = [
    "MODEL_CACHE_SIZE",
    "LoadedModel",
    "clear_model_cache",
    "load_model",
    "loaded_model_ids",
]


@dataclass
class LoadedModel:
    """A network ready for inference with everything its checkpoint says about it."""

    network: nn.Module
    info: CheckpointInfo
    text_encoder: TextEncoder
    preprocessing: Preprocessing
    device: torch.device
    prepared: dict[tuple[bool, bool], nn.Module] = field(default_factory=dict, repr=False)  # engine networks
    cpu_batch: dict[tuple[str, bool], BatchTuner] = field(default_factory=dict, repr=False)  # CPU batch timing

    @property
    def id(self) -> str:
        return self.info.id


#: Models kept loaded at most. Loading a shipped model takes about 0.1 s, so a user who alternates between more
#: models pays little; an unbounded cache grew a long-lived worker (and the test suite) by every checkpoint it had
#: ever loaded, including every earlier version of a checkpoint rewritten in place.
MODEL_CACHE_SIZE = 4

_MODELS: OrderedDict[tuple[str, int, int, str], LoadedModel] = OrderedDict()  # least recently used first
_MODELS_LOCK = threading.Lock()


def load_model(
    name_or_path: str | Path, device: str | torch.device = "auto", catalogue: Catalogue | None = None
) -> LoadedModel:
    """Load a checkpoint (file path or catalogue id) with its text encoder, on ``device``.

    Models are cached per (file, modification time, size, device): loading the same model again is free. The
    cache holds the :data:`MODEL_CACHE_SIZE` most recently used models; a file rewritten since it was loaded
    replaces its older version there.
    """
    device = resolve_device(device)
    path = (catalogue or Catalogue()).resolve(name_or_path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, str(device))
    with _MODELS_LOCK:
        cached = _MODELS.get(key)
        if cached is not None:
            _MODELS.move_to_end(key)
    if cached is not None:
        return cached
    network, info = load_checkpoint(path, device=device)
    encoder = load_text_encoder(info.text_encoder, device=device)
    for field_name, actual, what in (("text_dim", encoder.dim, "token features"),
                                     ("pooled_dim", encoder.pooled_dim, "pooled embeddings")):
        expected = info.config.get(field_name)
        if expected is not None and int(expected) != actual:
            raise CheckpointError(
                f"The model {info.id!r} expects text {what} of width {expected}, but its text encoder "
                f"{encoder.source!r} gives {actual}; the checkpoint names the wrong encoder."
            )
    preprocessing = Preprocessing.from_metadata(info.preprocessing, channels=int(info.config.get("in_channels", 1)))
    loaded = LoadedModel(network, info, encoder, preprocessing, device)
    with _MODELS_LOCK:
        for stale in [k for k in _MODELS if (k[0], k[3]) == (key[0], key[3]) and k != key]:
            del _MODELS[stale]  # an earlier version of the same file on the same device
        _MODELS[key] = loaded
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
    return loaded


def loaded_model_ids() -> list[str]:
    """Ids of the models held in memory (for a worker's health report)."""
    with _MODELS_LOCK:
        return [model.id for model in _MODELS.values()]


def clear_model_cache() -> None:
    """Forget loaded models (frees their memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()
