"""The slice-wise inference engine: volume + prompt -> mask (and probability) on the input grid.

The steps from a volume to a mask:

1. the volume's array is put in each model's canonical orientation (axis permutation and flips, a view);
2. the prompt is encoded once per (text encoder, prompt) through the LRU cache;
3. slices go to the device in batches and are normalised and resized there (:mod:`TextSegLib.engine.preprocessing`);
4. batched forward under ``torch.inference_mode()`` through a copy of the network with BatchNorm folded into the
   preceding convolutions; on CUDA with autocast (bf16, or fp16 where bf16 is missing), channels-last tensors,
   cuDNN autotuning and pinned-memory copies overlapped with compute, the batch size from the free GPU memory,
   and on out-of-memory the batch halved and retried; on the CPU the batch size timed on the first slices, and
   on CPUs with native bf16, bf16 and channels-last;
   ``torch.compile`` on request;
5. logits are resized to each slice's own size, passed through the sigmoid, mapped back to the input
   orientation, averaged over the models of an ensemble, and thresholded.

Progress is reported after every batch; a cancel token is checked before every batch and a cancelled run returns
``None`` (nothing half-done escapes). A device that runs out of memory for good (CUDA with one slice per batch, the
CPU at once) raises :class:`~TextSegLib.engine.devices.DeviceMemoryError`, which says what to do. Loaded models and
encoded prompts are cached for the life of the process, so re-prompting the same volume only pays for the forward
passes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.core.errors import TextSegValueError
from TextSegLib.core.options import (
    check_batch_size,
    check_components,
    check_modality,
    check_threshold,
    validate_prompt,
)
from TextSegLib.core.results import CancelToken, SegmentationResult
from TextSegLib.engine.acceleration import _CompiledOrEager, _CudaStreams, _StagedPipeline, fold_batchnorm
from TextSegLib.engine.batching import BatchSizeCache, BatchTuner
from TextSegLib.engine.devices import cpu_has_native_bf16, memory_error
from TextSegLib.engine.loading import LoadedModel
from TextSegLib.engine.preprocessing import IntensityMapping
from TextSegLib.io.volumes import CanonicalTransform, Volume, VolumeError, check_volume, guess_modality

__all__ = [
    "InferenceEngine",
    "largest_component",
]

log = logging.getLogger("textseg")

ProgressCallback = Callable[[int, int], None]


# Largest batch the engine picks by itself on CUDA: on an H100 the benchmark's throughput is flat from 32 to 128
# slices, and smaller batches leave neighbouring batches whose copies overlap with the compute.
MAX_AUTO_BATCH = 64


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


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected part of a binary mask ``(K, J, I)`` uint8 (ties: the first in scan order); an
    empty mask is returned as it is."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == int(sizes.argmax())).astype(np.uint8)


def _memory_errors_for_users(segment: Callable) -> Callable:
    """``InferenceEngine.segment`` raising :class:`~TextSegLib.engine.devices.DeviceMemoryError` (a TextSeg error
    that says what to do) where the device runs out of memory: on CUDA once batches of one slice do not fit, on
    the CPU at once."""

    @functools.wraps(segment)
    def checked(engine: InferenceEngine, *args, **kwargs):
        try:
            return segment(engine, *args, **kwargs)
        except (RuntimeError, MemoryError) as error:
            replacement = memory_error(error, engine.device)
            if replacement is None:
                raise
            log.info("Out of memory on %s: %s", engine.device, error)
            raise replacement from error

    return checked


class InferenceEngine:
    """Segments volumes with one model or an ensemble (probabilities averaged).

    Args:
        models: one or more loaded models (all on the same device).
        batch_size: slices per forward pass; None chooses one. On the CPU it is timed on the first slices of the
            first volume (see :class:`BatchTuner`; the best size ranges from 1 to 8 with the network's width, as
            the cache holds more or fewer slices' feature maps) and kept on the loaded model for later runs, and
            in :class:`BatchSizeCache` for later processes (per model, precision, thread count and slice size). On
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
        self.batch_size = check_batch_size(batch_size)
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

    def _remembered_key(self, model: LoadedModel, height: int, width: int) -> str:
        """The key of ``model``'s CPU batch size in :class:`BatchSizeCache` for slices of ``height`` x ``width``."""
        dtype, compiled = self._cpu_batch_key
        return (f"{model.id} weights={model.info.weights_sha256[:16]} cpu {dtype.removeprefix('torch.')} "
                f"compile={compiled} threads={torch.get_num_threads()} slice={height}x{width}")

    def _recall_batch_size(self, model: LoadedModel, height: int, width: int) -> None:
        """Before the model's first CPU run in this process: take the batch size an earlier process chose for these
        slices, if one did."""
        if self.device.type == "cuda" or self.batch_size is not None or self._cpu_batch_key in model.cpu_batch:
            return
        remembered = BatchSizeCache().get(self._remembered_key(model, height, width))
        if remembered is not None:
            model.cpu_batch[self._cpu_batch_key] = BatchTuner.remembered(remembered)
            log.info("CPU batch size for %s: %d slices (remembered)", model.id, remembered)

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

    @_memory_errors_for_users
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
        components: str | None = None,
    ) -> SegmentationResult | None:
        """Segment ``volume`` for ``prompt``; None if cancelled. See the module docstring for the steps.

        Arguments are checked first (``TypeError``/``ValueError`` with a message, see
        :func:`~TextSegLib.io.volumes.check_volume`, :func:`~TextSegLib.core.options.validate_prompt`,
        :func:`check_threshold`); a model trained on 2D pictures only (no CT or MR normalisation, see
        :attr:`~TextSegLib.engine.preprocessing.Preprocessing.takes_volumes`) is refused volumes. NaN and infinite
        voxels are treated as missing: the network sees the volume's lowest finite value there, the voxels are left
        outside the mask (probability 0), and a warning and a note in the result say how many there were; a volume
        without a finite voxel is refused. ``components``
        (:func:`~TextSegLib.core.options.check_components`; None: the first model's) "largest" keeps only the
        largest connected part of the mask (26-connected); the probability volume is left as computed.
        """
        volume = check_volume(volume)
        for model in self.models:
            if not model.preprocessing.takes_volumes:
                raise TextSegValueError(
                    f"The model {model.id} was trained on 2D pictures ({', '.join(model.preprocessing.intensity)}), "
                    "not CT or MR volumes: give it a PNG or TIFF picture, or pick a CT or MR model (textseg models "
                    "says what each was trained on).")
        prompt = validate_prompt(prompt)
        if threshold is not None:
            threshold = check_threshold(threshold)
        modality = check_modality(modality)
        components = self.models[0].info.components if components is None else check_components(components)
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
        if components == "largest":
            mask = largest_component(mask)
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

    @_memory_errors_for_users
    def segment_image(self, image: np.ndarray, prompt: str, *, threshold: float | None = None,
                      probability: bool = False, modality: str | None = None) -> SegmentationResult:
        """Segment a 2D picture for ``prompt``: ``(C, H, W)`` with ``C = 1`` (grey) or 3 (RGB), as
        :func:`TextSegLib.io.images.read_image_2d` reads it.

        Each model normalises it with its preprocessing's entry for ``modality`` (default: its first, the one a
        model trained on LViT's 2D layout has) and takes it as a batch of one: an RGB model sees the three colours.
        The result is a one-slice result on the picture's grid: ``mask`` ``(1, H, W)``, no voxel size.
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] not in (1, 3) \
                or 0 in image.shape:
            shape = getattr(image, "shape", None)
            raise VolumeError(f"A 2D image is a (C, H, W) array with C = 1 or 3, got shape {shape}; read pictures "
                              "with TextSegLib.io.images.read_image_2d.")
        if not np.issubdtype(image.dtype, np.number) or not np.all(np.isfinite(image)):
            raise VolumeError("The 2D image holds values that are not finite numbers; give a PNG, TIFF or JPEG "
                              "picture.")
        prompt = validate_prompt(prompt)
        if threshold is not None:
            threshold = check_threshold(threshold)
        modality = check_modality(modality)
        started = time.perf_counter()
        height, width = image.shape[1:]
        batch = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        accumulated = np.zeros((1, height, width), dtype=np.float32)
        for model in self.models:
            mapping = model.preprocessing.intensity_for(modality).mapping(image)
            text = model.text_encoder.encode_cached(prompt)
            accumulated += self._probabilities(model, batch, mapping, text, (height, width)).cpu().numpy()
        accumulated /= len(self.models)
        threshold = float(self.models[0].info.threshold if threshold is None else threshold)
        return SegmentationResult(
            mask=(accumulated > threshold).astype(np.uint8),
            probability=accumulated if probability else None,
            prompt=prompt,
            models=[m.info for m in self.models],
            threshold=threshold,
            seconds=time.perf_counter() - started,
            modality=modality or next(iter(self.models[0].preprocessing.intensity)),
            device=str(self.device),
            max_probability=float(accumulated.max()),
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
        self._recall_batch_size(model, height, width)
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
                        BatchSizeCache().put(self._remembered_key(model, height, width), tuner.size)
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
        """Raw slices ``(B, H0, W0)`` or pictures ``(B, C, H0, W0)`` (on any device) -> probabilities
        ``(B, H0, W0)`` float32 on the model's device (on the CPU for CPU models)."""
        network = self._network(model)
        batch = slices.to(self.device, non_blocking=True)
        with torch.inference_mode(), self._precision():
            x = model.preprocessing.prepare(batch, mapping)
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = network(x, text.expand(x.shape[0]))
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            return torch.sigmoid(logits)[:, 0]


