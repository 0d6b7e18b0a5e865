"""The slice-wise inference engine: volume + prompt -> mask (and probability) on the input grid.

Data path (``DESIGN.md``):

1. the volume's array is put in each model's canonical orientation (axis permutation and flips, a view);
2. the prompt is encoded once per (text encoder, prompt) through the LRU cache;
3. slices go to the device in batches and are normalised and resized there (``preprocessing.py``);
4. batched forward under ``torch.inference_mode()``, autocast (bf16, or fp16 where bf16 is missing) on CUDA;
   on CUDA out-of-memory the batch is halved and retried;
5. logits are resized to each slice's own size, passed through the sigmoid, mapped back to the input
   orientation, averaged over the models of an ensemble, and thresholded.

Progress is reported after every batch; a cancel token is checked before every batch and a cancelled run returns
``None`` (nothing half-done escapes). Loaded models and encoded prompts are cached for the life of the process,
so re-prompting the same volume only pays for the forward passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import Catalogue, CheckpointError, CheckpointInfo, load_checkpoint
from .preprocessing import IntensityMapping, Preprocessing
from .text import TextEncoder, load_text_encoder, validate_prompt
from .volumes import CanonicalTransform, Volume, guess_modality

__all__ = [
    "CancelToken",
    "InferenceEngine",
    "LoadedModel",
    "SegmentationResult",
    "clear_model_cache",
    "load_model",
    "resolve_device",
]

log = logging.getLogger("textseg")

ProgressCallback = Callable[[int, int], None]


class CancelToken:
    """Set from any thread to stop a run between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when a GPU is usable, else CPU; ``"cuda"`` without a GPU is a readable error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("No CUDA GPU is available here; use the device 'cpu' or 'auto'.")
    return device


@dataclass
class LoadedModel:
    """A network ready for inference with everything its checkpoint says about it."""

    network: nn.Module
    info: CheckpointInfo
    text_encoder: TextEncoder
    preprocessing: Preprocessing
    device: torch.device

    @property
    def id(self) -> str:
        return self.info.id


_MODELS: dict[tuple[str, int, int, str], LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model(
    name_or_path: str | Path, device: str | torch.device = "auto", catalogue: Catalogue | None = None
) -> LoadedModel:
    """Load a checkpoint (file path or catalogue id) with its text encoder, on ``device``.

    Models are cached per (file, modification time, size, device): loading the same model again is free.
    """
    device = resolve_device(device)
    path = (catalogue or Catalogue()).resolve(name_or_path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, str(device))
    with _MODELS_LOCK:
        cached = _MODELS.get(key)
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
        _MODELS[key] = loaded
    return loaded


def clear_model_cache() -> None:
    """Forget loaded models (frees their memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()


@dataclass
class SegmentationResult:
    """What one prompt produced on one volume.

    Attributes:
        mask: ``(K, J, I)`` uint8, 1 inside, on the input volume's grid.
        probability: ``(K, J, I)`` float32 in ``[0, 1]`` (mean over the ensemble) or None if not asked for.
        prompt: the prompt as encoded (white space normalised).
        models: infos of the checkpoints used.
        threshold: probability above which a voxel is inside.
        seconds: wall time of the run.
    """

    mask: np.ndarray
    probability: np.ndarray | None
    prompt: str
    models: list[CheckpointInfo]
    threshold: float
    seconds: float
    modality: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def empty(self) -> bool:
        return self.voxel_count == 0


class InferenceEngine:
    """Segments volumes with one model or an ensemble (probabilities averaged).

    Args:
        models: one or more loaded models (all on the same device).
        batch_size: slices per forward pass; None chooses one: 4 on CPU (the fastest in the benchmark), on CUDA
            from the free memory and the measured peak memory of a two-slice forward pass.
        amp: autocast on CUDA (bf16 where supported, else fp16). Ignored on CPU.
    """

    def __init__(self, models: LoadedModel | Sequence[LoadedModel], batch_size: int | None = None, amp: bool = True):
        self.models = [models] if isinstance(models, LoadedModel) else list(models)
        if not self.models:
            raise ValueError("the engine needs at least one model")
        devices = {m.device for m in self.models}
        if len(devices) != 1:
            raise ValueError("all models of an ensemble must be on the same device")
        self.device = devices.pop()
        if batch_size is not None and batch_size < 1:
            raise ValueError("the batch size must be at least 1")
        self.batch_size = batch_size
        self.amp = amp
        self._per_slice_bytes: dict[str, int] = {}

    def _autocast(self):
        if self.device.type == "cuda" and self.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    def _initial_batch_size(self, model: LoadedModel, depth: int, text) -> int:
        if self.batch_size is not None:
            return min(self.batch_size, depth)
        if self.device.type != "cuda":
            return min(4, depth)
        per_slice = self._bytes_per_slice(model, text)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(depth, 512, (0.6 * free) // per_slice)))

    def _bytes_per_slice(self, model: LoadedModel, text) -> int:
        """Peak CUDA memory of one slice's forward pass, measured once per model with a batch of two."""
        if model.id not in self._per_slice_bytes:
            probe = torch.zeros((2, *model.preprocessing.size), device=self.device)
            identity = IntensityMapping(scale=1.0, offset=0.0, clip=None)
            torch.cuda.synchronize(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._forward(model, probe, identity, text, model.preprocessing.size)
            peak = torch.cuda.max_memory_allocated(self.device) - baseline
            self._per_slice_bytes[model.id] = max(1, peak // 2)
        return self._per_slice_bytes[model.id]

    def segment(
        self,
        volume: Volume,
        prompt: str,
        *,
        threshold: float | None = None,
        probability: bool = False,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        modality: str | None = None,
    ) -> SegmentationResult | None:
        """Segment ``volume`` for ``prompt``; None if cancelled. See the module docstring for the steps."""
        prompt = validate_prompt(prompt)
        started = time.perf_counter()
        modality = modality or volume.modality or guess_modality(volume.array)
        depth_total = sum(self._depth(volume, m) for m in self.models)
        done = 0
        accumulated: np.ndarray | None = None
        for model in self.models:
            result = self._run_model(model, volume, prompt, modality, cancel, progress, done, depth_total)
            if result is None:
                return None
            done += self._depth(volume, model)
            if accumulated is None:
                accumulated = result
            else:
                accumulated += result
        assert accumulated is not None
        accumulated /= len(self.models)
        threshold = float(self.models[0].info.threshold if threshold is None else threshold)
        mask = (accumulated > threshold).astype(np.uint8)
        return SegmentationResult(
            mask=mask,
            probability=accumulated if probability else None,
            prompt=prompt,
            models=[m.info for m in self.models],
            threshold=threshold,
            seconds=time.perf_counter() - started,
            modality=modality,
        )

    @staticmethod
    def _depth(volume: Volume, model: LoadedModel) -> int:
        transform = CanonicalTransform.create(volume.direction, model.info.orientation)
        return volume.array.shape[2 - transform.source_axes[2]]

    def _run_model(
        self,
        model: LoadedModel,
        volume: Volume,
        prompt: str,
        modality: str,
        cancel: CancelToken | None,
        progress: ProgressCallback | None,
        done_before: int,
        total: int,
    ) -> np.ndarray | None:
        """Probability ``(K, J, I)`` float32 of one model on the input grid; None if cancelled."""
        transform = CanonicalTransform.create(volume.direction, model.info.orientation)
        canonical = transform.forward(volume.array)
        depth, height, width = canonical.shape
        mapping = model.preprocessing.intensity_for(modality).mapping(canonical)
        text = model.text_encoder.encode_cached(prompt)
        output = np.empty((depth, height, width), dtype=np.float32)
        batch_size = self._initial_batch_size(model, depth, text)
        start = 0
        while start < depth:
            if cancel is not None and cancel.cancelled:
                return None
            stop = min(start + batch_size, depth)
            try:
                output[start:stop] = self._forward(model, canonical[start:stop], mapping, text, (height, width))
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                log.info("Out of GPU memory; retrying with %d slices per batch", batch_size)
                continue
            start = stop
            if progress is not None:
                progress(done_before + start, total)
        return transform.inverse(output)

    def _forward(self, model, slices: np.ndarray | torch.Tensor, mapping, text, size: tuple[int, int]) -> np.ndarray:
        if isinstance(slices, np.ndarray):
            slices = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
        batch = slices.to(self.device)
        with torch.inference_mode(), self._autocast():
            x = model.preprocessing.prepare(batch, mapping)
            logits = model.network(x, text.expand(x.shape[0]))
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0].cpu().numpy()
