"""The slice-wise inference engine: volume + prompt -> mask (and probability) on the input grid.

Data path (``DESIGN.md``):

1. the volume's array is put in each model's canonical orientation (axis permutation and flips, a view);
2. the prompt is encoded once per (text encoder, prompt) through the LRU cache;
3. slices go to the device in batches and are normalised and resized there (``preprocessing.py``);
4. batched forward under ``torch.inference_mode()`` through a copy of the network with BatchNorm folded into the
   preceding convolutions; on CUDA with autocast (bf16, or fp16 where bf16 is missing), channels-last tensors,
   cuDNN autotuning and pinned-memory copies overlapped with compute, the batch size from the free GPU memory,
   and on out-of-memory the batch halved and retried; on the CPU the batch size timed on the first slices, and
   on CPUs with native bf16, bf16 and channels-last;
   ``torch.compile`` on request;
5. logits are resized to each slice's own size, passed through the sigmoid, mapped back to the input
   orientation, averaged over the models of an ensemble, and thresholded.

Progress is reported after every batch; a cancel token is checked before every batch and a cancelled run returns
``None`` (nothing half-done escapes). Loaded models and encoded prompts are cached for the life of the process,
so re-prompting the same volume only pays for the forward passes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import Catalogue, CheckpointError, CheckpointInfo, load_checkpoint
from .common import TextSegTypeError, TextSegValueError
from .preprocessing import IntensityMapping, Preprocessing
from .results import CancelToken, SegmentationResult
from .text import TextEncoder, TextFeatures, load_text_encoder, validate_prompt
from .volumes import CanonicalTransform, Volume, VolumeError, check_volume, guess_modality

__all__ = [
    "BatchTuner",
    "CancelToken",
    "InferenceEngine",
    "LoadedModel",
    "SegmentationResult",
    "check_threshold",
    "choose_device",
    "clear_model_cache",
    "cpu_has_native_bf16",
    "load_model",
    "loaded_model_ids",
    "resolve_device",
]

log = logging.getLogger("textseg")

ProgressCallback = Callable[[int, int], None]


# Largest batch the engine picks by itself on CUDA: on an H100 the benchmark's throughput is flat from 32 to 128
# slices, and smaller batches leave neighbouring batches whose copies overlap with the compute.
MAX_AUTO_BATCH = 64


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) through oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when a GPU is usable, else CPU; ``"cuda"`` without a GPU is a readable error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("No CUDA GPU is available here; use the device 'cpu' or 'auto'.")
    return device


MINIMUM_FREE_GPU_BYTES = 2 << 30
GPU_BYTES_PER_CHECKPOINT_BYTE = 4


def choose_device(device: str, model_paths: Sequence[str | Path]) -> tuple[str, list[str]]:
    """Device to run on (``"cpu"``, ``"cuda"`` or ``"cuda:N"``) and warnings for the user.

    ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``. A GPU with less free memory than the models need (an
    estimate from their file sizes, at least ``MINIMUM_FREE_GPU_BYTES``) is not used: the CPU is, with a warning;
    so is the CPU when ``"cuda"`` is asked for where there is no GPU.
    """
    if device == "cpu":
        return "cpu", []
    if not torch.cuda.is_available():
        return "cpu", ([] if device == "auto" else ["No usable GPU was found; TextSeg runs on the CPU."])
    target = torch.device("cuda" if device == "auto" else device)
    free, _total = torch.cuda.mem_get_info(target)
    needed = max(MINIMUM_FREE_GPU_BYTES,
                 GPU_BYTES_PER_CHECKPOINT_BYTE * sum(Path(path).stat().st_size for path in model_paths))
    if free < needed:
        message = (f"The GPU has {free / 2**30:.1f} GB free, TextSeg needs about {needed / 2**30:.1f} GB: it runs "
                   "on the CPU (slower).")
        log.warning("%s", message)
        return "cpu", [message]
    return str(target), []


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


def loaded_model_ids() -> list[str]:
    """Ids of the models held in memory (for a worker's health report)."""
    with _MODELS_LOCK:
        return [model.id for model in _MODELS.values()]


def clear_model_cache() -> None:
    """Forget loaded models (frees their memory)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def check_threshold(threshold: object) -> float:
    """Return ``threshold`` as a float if it lies strictly between 0 and 1; else raise ``TypeError``/``ValueError``
    (:class:`~TextSegLib.common.TextSegError` subclasses)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating | np.integer):
        raise TextSegTypeError(f"The threshold must be a number between 0 and 1, not {type(threshold).__name__}.")
    if not 0.0 < float(threshold) < 1.0:
        raise TextSegValueError(f"The threshold must lie between 0 and 1 (a probability), not {threshold}.")
    return float(threshold)


def _without_nonfinite(volume: Volume) -> tuple[Volume, np.ndarray | None, str | None]:
    """The volume with NaN and infinite voxels replaced by its lowest finite value, the mask of those voxels and a
    note saying how many there were (None, None when every voxel is finite). Raises :class:`VolumeError` when no
    voxel is finite."""
    array = volume.array
    if not np.issubdtype(array.dtype, np.floating):
        return volume, None, None
    finite = np.isfinite(array)
    count = array.size - int(np.count_nonzero(finite))
    if count == 0:
        return volume, None, None
    name = volume.source or "The volume"
    if count == array.size:
        raise VolumeError(f"{name} holds no finite value (every voxel is NaN or infinite); nothing to segment.")
    fill = array[finite].min()
    note = (f"{count} voxels of {name} are NaN or infinite; they were treated as missing (given the lowest finite "
            f"value, {float(fill):g}, for the network) and left outside the segment.")
    return volume.with_array(np.where(finite, array, fill)), ~finite, note


class InferenceEngine:
    """Segments volumes with one model or an ensemble (probabilities averaged).

    Args:
        models: one or more loaded models (all on the same device).
        batch_size: slices per forward pass; None chooses one. On the CPU it is timed on the first slices of the
            first volume (see :class:`BatchTuner`; the best size ranges from 1 to 8 with the network's width, as
            the cache holds more or fewer slices' feature maps) and kept on the loaded model for later runs. On
            CUDA it comes from the free memory and the measured peak memory of a two-slice forward pass, at most
            ``MAX_AUTO_BATCH``.
        amp: reduced precision where the hardware has it: autocast to bf16 on CUDA (fp16 where bf16 is missing),
            and to bf16 on CPUs with native bf16 instructions (AVX512-BF16 or AMX, through oneDNN). Masks agree
            with fp32 to a Dice above 0.99 (the benchmark checks it); ``amp=False`` computes in fp32.
        compile: run the networks through ``torch.compile`` (CUDA graphs on CUDA). Compiling takes tens of seconds
            once per model and batch size, so it pays off when the same engine segments many volumes or prompts
            (the Slicer module re-prompting); where compilation fails the engine falls back to eager mode with a
            warning.

    On CUDA the engine also uses channels-last tensors, cuDNN autotuning, and pinned host buffers whose copies to
    and from the GPU run on a side stream, overlapped with the forward passes of the neighbouring batches; on a
    bf16 CPU it uses channels-last tensors with bf16 (both measured faster there, neither helps fp32 on the CPU).
    """

    def __init__(self, models: LoadedModel | Sequence[LoadedModel], batch_size: int | None = None, amp: bool = True,
                 compile: bool = False):
        self.models = [models] if isinstance(models, LoadedModel) else list(models)
        if not self.models:
            raise ValueError("the engine needs at least one model")
        devices = {m.device for m in self.models}
        if len(devices) != 1:
            raise ValueError("all models of an ensemble must be on the same device")
        self.device = devices.pop()
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
            raise TextSegTypeError(f"The batch size must be a whole number, not {type(batch_size).__name__}.")
        if batch_size is not None and batch_size < 1:
            raise TextSegValueError(f"The batch size must be at least 1, not {batch_size}.")
        self.batch_size = batch_size
        self.amp = amp
        self.compile = compile
        self._per_slice_bytes: dict[str, int] = {}
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def _amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        if not self.amp:
            return None
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None

    @property
    def _channels_last(self) -> bool:
        return self.device.type == "cuda" or self._amp_dtype is not None

    def _network(self, model: LoadedModel) -> nn.Module:
        """The callable network for ``model``: a copy with every BatchNorm that follows a convolution folded into
        it, channels-last where that pays, compiled when asked. Kept on the loaded model, so every engine (every
        re-prompt in Slicer) reuses it."""
        key = (self.compile, self._channels_last)
        if key not in model.prepared:
            network = fold_batchnorm(copy.deepcopy(model.network).eval())
            if self._channels_last:
                network = network.to(memory_format=torch.channels_last)
            if self.compile:
                mode = "reduce-overhead" if self.device.type == "cuda" else None
                network = _CompiledOrEager(network, mode)
            model.prepared[key] = network
        return model.prepared[key]

    @contextlib.contextmanager
    def _precision(self):
        """Autocast to the reduced precision; without it, IEEE fp32 also on CUDA, where cuDNN would otherwise
        use TF32 tensor cores for convolutions (PyTorch's default, about 1e-3 relative error). The process's TF32
        settings are restored afterwards."""
        dtype = self._amp_dtype
        if dtype is not None:
            with torch.autocast(self.device.type, dtype=dtype):
                yield
            return
        if self.device.type != "cuda":
            with torch.autocast(self.device.type, enabled=False):
                yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.autocast("cuda", enabled=False):
                yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def _initial_batch_size(self, model: LoadedModel, depth: int, text) -> int:
        if self.batch_size is not None:
            return min(self.batch_size, depth)
        if self.device.type != "cuda":
            return min(self._tuner(model).size, depth)
        per_slice = self._bytes_per_slice(model, text)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(depth, MAX_AUTO_BATCH, (0.6 * free) // per_slice)))

    @property
    def _cpu_batch_key(self) -> tuple[str, bool]:
        return str(self._amp_dtype), self.compile

    def _tuner(self, model: LoadedModel) -> BatchTuner | None:
        """The model's CPU batch tuner for this engine's precision (shared by every engine of the model), or None
        when the batch size is given or the device is CUDA."""
        if self.device.type == "cuda" or self.batch_size is not None:
            return None
        return model.cpu_batch.setdefault(self._cpu_batch_key, BatchTuner())

    def chosen_batch_size(self, model: LoadedModel) -> int | None:
        """The batch size this engine runs ``model`` with once it is known: the given one, the timed one on the CPU
        after the search, None before (and on CUDA, where it is derived from the free memory at each run)."""
        if self.batch_size is not None:
            return self.batch_size
        tuner = self._tuner(model)
        return tuner.size if tuner is not None and tuner.finished else None

    def _bytes_per_slice(self, model: LoadedModel, text) -> int:
        """Peak CUDA memory of one slice's forward pass, measured once per model with a batch of two.

        The probe runs twice and only the second pass is measured: the first includes cuDNN's autotuning, whose
        trial workspaces (gigabytes for the paper-width networks) would otherwise pass for activations and shrink
        the batch to one or two slices."""
        if model.id not in self._per_slice_bytes:
            probe = torch.zeros((2, *model.preprocessing.size), device=self.device)
            identity = IntensityMapping(scale=1.0, offset=0.0, clip=None)
            self._probabilities(model, probe, identity, text, model.preprocessing.size)
            torch.cuda.synchronize(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._probabilities(model, probe, identity, text, model.preprocessing.size)
            torch.cuda.synchronize(self.device)
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
        """Segment ``volume`` for ``prompt``; None if cancelled. See the module docstring for the steps.

        Arguments are checked first (``TypeError``/``ValueError`` with a message, see
        :func:`~TextSegLib.volumes.check_volume`, :func:`~TextSegLib.text.validate_prompt`,
        :func:`check_threshold`). NaN and infinite voxels are treated as missing: the network sees the volume's
        lowest finite value there, the voxels are left outside the mask (probability 0), and a warning and a note
        in the result say how many there were; a volume without a finite voxel is refused.
        """
        volume = check_volume(volume)
        prompt = validate_prompt(prompt)
        if threshold is not None:
            threshold = check_threshold(threshold)
        if modality not in (None, "CT", "MR"):
            raise TextSegValueError(f"The modality must be 'CT', 'MR' or None (guess it), not {modality!r}.")
        volume, missing, note = _without_nonfinite(volume)
        if note:
            log.warning("%s", note)
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
        if missing is not None:
            mask[missing] = 0
            accumulated[missing] = 0.0
        return SegmentationResult(
            mask=mask,
            probability=accumulated if probability else None,
            prompt=prompt,
            models=[m.info for m in self.models],
            threshold=threshold,
            seconds=time.perf_counter() - started,
            modality=modality,
            notes=[note] if note else [],
            device=str(self.device),
            max_probability=float(accumulated.max()),
            voxel_ml=float(np.prod(volume.spacing)) / 1000.0,
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
        """Probability ``(K, J, I)`` float32 of one model on the input grid; None if cancelled.

        Batches are halved and retried on CUDA out-of-memory. On CUDA the slices of batch ``n + 1`` are staged and
        uploaded, and those of batch ``n - 1`` downloaded, while batch ``n`` runs.
        """
        transform = CanonicalTransform.create(volume.direction, model.info.orientation)
        canonical = transform.forward(volume.array)
        depth, height, width = canonical.shape
        mapping = model.preprocessing.intensity_for(modality).mapping(canonical)
        text = model.text_encoder.encode_cached(prompt)
        output = np.empty((depth, height, width), dtype=np.float32)
        batch_size = self._initial_batch_size(model, depth, text)
        tuner = self._tuner(model)
        pipeline = self._pipeline(canonical, output)
        start = 0
        while start < depth:
            if cancel is not None and cancel.cancelled:
                return None
            if tuner is not None:
                batch_size = tuner.size  # the next size to time, or the chosen one
            stop = min(start + batch_size, depth)
            try:
                if pipeline is None:
                    began = time.perf_counter()
                    batch = torch.from_numpy(np.ascontiguousarray(canonical[start:stop], dtype=np.float32))
                    probabilities = self._probabilities(model, batch, mapping, text, (height, width))
                    output[start:stop] = probabilities.numpy()
                    if tuner is not None and tuner.record(stop - start, time.perf_counter() - began):
                        log.info("CPU batch size for %s: %d slices", model.id, tuner.size)
                else:
                    pipeline.run(start, stop, batch_size, lambda batch: self._probabilities(
                        model, batch, mapping, text, (height, width)))
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                if pipeline is not None:
                    pipeline.reset()
                torch.cuda.empty_cache()
                log.info("Out of GPU memory; retrying with %d slices per batch", batch_size)
                continue
            start = stop
            if progress is not None:
                progress(done_before + start, total)
        if pipeline is not None:
            pipeline.finish()
        return transform.inverse(output)

    def _pipeline(self, canonical: np.ndarray, output: np.ndarray) -> _StagedPipeline | None:
        """Overlapped staging on CUDA; on the CPU batches are simply computed one after the other."""
        if self.device.type == "cuda":
            return _StagedPipeline(_CudaStreams(self.device), canonical, output)
        return None

    def _probabilities(self, model: LoadedModel, slices: torch.Tensor, mapping, text,
                       size: tuple[int, int]) -> torch.Tensor:
        """Raw slices ``(B, H0, W0)`` (on any device) -> probabilities ``(B, H0, W0)`` float32 on the model's device
        (on the CPU for CPU models)."""
        network = self._network(model)
        batch = slices.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._precision():
            x = model.preprocessing.prepare(batch, mapping)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = network(x, text.expand(x.shape[0]))
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            return torch.sigmoid(logits)[:, 0]


class BatchTuner:
    """Chooses the CPU batch size by timing real batches at the start of a run.

    Each candidate size (1, 2, 4, 8, in that order) computes two batches; the second is timed, because the first at
    a new shape also pays oneDNN's set-up for it. The first candidate that is slower per slice than the best so far
    ends the search (larger batches only add to the feature maps that no longer fit the cache), as does the last
    candidate. The slices are part of the volume, so nothing is computed twice; a volume too short to finish the
    search leaves it where it stopped, and the next run (the model keeps its tuner) goes on from there.
    """

    CANDIDATES = (1, 2, 4, 8)

    def __init__(self) -> None:
        self._index = 0
        self._timed = False
        self._best: tuple[float, int] | None = None  # (seconds per slice, size)
        self.finished = False

    @property
    def size(self) -> int:
        """The batch size to run next (the chosen one once :attr:`finished`)."""
        return self._best[1] if self.finished and self._best else self.CANDIDATES[self._index]

    def record(self, slices: int, seconds: float) -> bool:
        """Report that a batch of ``slices`` took ``seconds``; True when this report completed the choice."""
        if self.finished or slices != self.CANDIDATES[self._index]:
            return False  # done already, or a volume's last, shorter batch, which says nothing about the size
        if not self._timed:
            self._timed = True
            return False
        per_slice = seconds / slices
        slower = self._best is not None and per_slice >= self._best[0]
        if not slower:
            self._best = (per_slice, slices)
        self._index += 1
        self._timed = False
        self.finished = slower or self._index == len(self.CANDIDATES)
        return self.finished


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` into the
    convolution's weights (the BatchNorm becomes an identity). Same outputs up to rounding, one pass fewer over
    every such feature map. Modifies and returns ``network``, which must be in eval mode."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode")
    for module in network.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, first), (next_name, second) in pairwise(children):
            if type(first) is nn.Conv2d and type(second) is nn.BatchNorm2d and second.track_running_stats:
                setattr(module, name, fuse_conv_bn_eval(first, second))
                setattr(module, next_name, nn.Identity())
    return network


class _CompiledOrEager(nn.Module):
    """``torch.compile`` of a network that falls back to the eager network if compilation fails.

    Inputs are padded to the largest batch seen so the compiled graph (and, on CUDA, its captured CUDA graph) is
    reused for the last, shorter batch of a volume; the text must be one prompt for every row, as the engine
    passes it. Shapes: as the wrapped network.
    """

    def __init__(self, network: nn.Module, mode: str | None) -> None:
        super().__init__()
        self.network = network
        self.mode = mode
        self.compiled = None
        self.batch = 0
        self.failed = False

    def forward(self, image: torch.Tensor, text):
        if self.failed:
            return self.network(image, text)
        if self.compiled is None:
            self.compiled = torch.compile(self.network, mode=self.mode, dynamic=False)
        count = image.shape[0]
        self.batch = max(self.batch, count)
        padded = image
        if count < self.batch:
            padded = torch.cat([image, image[-1:].expand(self.batch - count, *image.shape[1:])])
        prompt = TextFeatures(text.tokens[:1], text.mask[:1], text.pooled[:1]).expand(self.batch)
        try:
            return self.compiled(padded, prompt)[:count]
        except Exception as error:  # compilation problems surface as many exception types
            log.warning("torch.compile failed (%s); running uncompiled", str(error).strip().splitlines()[0])
            self.failed = True
            return self.network(image, text)


class _CudaStreams:
    """The CUDA side of :class:`_StagedPipeline`: pinned host memory, a copy stream and events."""

    pinned = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def upload(self, host: torch.Tensor):
        with torch.cuda.stream(self.copy_stream):
            uploaded = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return uploaded, ready

    def wait(self, uploaded: torch.Tensor, ready) -> None:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        uploaded.record_stream(stream)

    def download(self, host: torch.Tensor, result: torch.Tensor):
        host.copy_(result, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done


class _SynchronousStreams:
    """Stand-in for :class:`_CudaStreams` where every copy is complete when it returns (CPU tests of the
    pipeline's bookkeeping)."""

    pinned = False

    class _Done:
        def synchronize(self) -> None:
            """Nothing to wait for."""

    def upload(self, host: torch.Tensor):
        return host.clone(), self._Done()

    def wait(self, uploaded: torch.Tensor, ready) -> None:
        """Nothing to wait for."""

    def download(self, host: torch.Tensor, result: torch.Tensor):
        host.copy_(result)
        return self._Done()


class _StagedPipeline:
    """Double-buffered host staging with uploads and downloads overlapped with compute, for one volume.

    ``run(start, stop, ...)`` computes batch ``[start, stop)`` (uploading it unless it was prefetched), then, while
    the device works, writes the previous batch's result into ``output`` once its download has finished and
    prefetches the next batch into the other staging buffer; the result's download is queued. ``finish()`` writes
    the last result. On CUDA the buffers are pinned and the copies run on a side stream.
    """

    def __init__(self, streams, canonical: np.ndarray, output: np.ndarray) -> None:
        self.streams, self.canonical, self.output = streams, canonical, output
        self.pending: tuple[int, int, torch.Tensor, object] | None = None
        self.host_in: list[torch.Tensor] = []
        self.host_out: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """Forget staged batches (after an out-of-memory error); a finished download is kept."""
        self._drain()
        self.prefetched: tuple[int, int, torch.Tensor, object] | None = None
        self.slot = 0

    def _buffers(self, batch_size: int) -> None:
        if not self.host_in or self.host_in[0].shape[0] < batch_size:
            shape = (batch_size, *self.canonical.shape[1:])
            pinned = self.streams.pinned
            self.host_in = [torch.empty(shape, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]
            self.host_out = [torch.empty(shape, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]

    def _upload(self, start: int, stop: int, slot: int):
        staging = self.host_in[slot][: stop - start]
        staging.copy_(torch.from_numpy(np.ascontiguousarray(self.canonical[start:stop], dtype=np.float32)))
        return (start, stop, *self.streams.upload(staging))

    def _drain(self) -> None:
        if self.pending is not None:
            start, stop, host, done = self.pending
            done.synchronize()
            self.output[start:stop] = host.numpy()
            self.pending = None

    def run(self, start: int, stop: int, batch_size: int, compute) -> None:
        self._buffers(batch_size)
        if self.prefetched is not None and self.prefetched[:2] == (start, stop):
            _, _, batch, ready = self.prefetched
        else:
            _, _, batch, ready = self._upload(start, stop, self.slot)
        self.prefetched = None
        self.streams.wait(batch, ready)
        probabilities = compute(batch)  # queued on the device; the host goes on
        self._drain()  # the previous batch's result, and its buffers become free
        following = min(stop + batch_size, self.canonical.shape[0])
        if stop < following:
            self.prefetched = self._upload(stop, following, 1 - self.slot)
        host = self.host_out[self.slot][: stop - start]
        self.pending = (start, stop, host, self.streams.download(host, probabilities))
        self.slot = 1 - self.slot

    def finish(self) -> None:
        self._drain()
