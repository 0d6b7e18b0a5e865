"""The one segmentation run that every front end uses: ``textseg segment`` in this process, ``textseg demo``,
``textseg evaluate --manifest`` and the worker service (``textseg serve``) behind the Slicer module, the web page
and ``textseg segment --server``.

A :class:`Segmenter` takes the models (catalogue ids or checkpoint files) and the user's
:class:`~TextSegLib.core.options.SegmentOptions`, and then:

1. checks the options (:meth:`~TextSegLib.core.options.SegmentOptions.checked`);
2. resolves the models in the catalogue (a file path is refused where paths are not allowed: a worker serving
   other computers names models by catalogue id only);
3. sizes torch's thread pools as the front end decided (:mod:`TextSegLib.core.threads`) and chooses the device
   once (:func:`~TextSegLib.engine.devices.choose_device`): a GPU that is missing or has too little free memory
   means the CPU, with a note for the user;
4. loads the models (cached for the life of the process) and builds the
   :class:`~TextSegLib.engine.inference.InferenceEngine` when first needed;
5. segments; when the GPU runs out of memory (after the engine's own halving of the batch), it frees the cached
   memory, notes it, and runs again on the CPU, where it stays for later runs.

The notes of steps 3 and 5 come first in every result's ``notes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from TextSegLib.core.options import SegmentOptions
from TextSegLib.core.results import CancelToken, SegmentationResult
from TextSegLib.engine.catalogue import Catalogue
from TextSegLib.engine.checkpoints import CheckpointError
from TextSegLib.engine.devices import choose_device, use_configured_threads
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import LoadedModel, load_model
from TextSegLib.io.volumes import Volume

__all__ = [
    "OUT_OF_MEMORY_NOTE",
    "Segmenter",
]

log = logging.getLogger("textseg")

OUT_OF_MEMORY_NOTE = "The GPU ran out of memory; TextSeg used the CPU instead."

_Done = TypeVar("_Done")


class Segmenter:
    """Segments volumes from prompts with one model or an ensemble, as every front end does.

    Args:
        models: catalogue ids or checkpoint files (several: an ensemble whose probabilities are averaged).
        options: device, batch size, threshold, probability, modality, precision and compilation; checked here.
        catalogue: where ids are looked up (default: the shipped models and the user's models folder).
        allow_paths: accept checkpoint files; False (a worker serving other computers) accepts catalogue ids only.

    Raises a :class:`~TextSegLib.core.errors.TextSegError` for a bad option and
    :class:`~TextSegLib.engine.checkpoints.CheckpointError` for a model that is not there (or a path where paths
    are not allowed). Nothing is loaded until :meth:`segment` or :meth:`describe` needs it.
    """

    def __init__(self, models: Sequence[str | os.PathLike[str]], options: SegmentOptions | None = None,
                 catalogue: Catalogue | None = None, allow_paths: bool = True) -> None:
        self.options = (options or SegmentOptions()).checked()
        use_configured_threads()
        if not models:
            raise CheckpointError("No model chosen: pick one from the catalogue or give a checkpoint file.")
        self.catalogue = catalogue or Catalogue()
        self.paths = self._resolve([str(model) for model in models], allow_paths)
        self.device, self.notes = choose_device(self.options.device, self.paths)
        self._engine: InferenceEngine | None = None

    def _resolve(self, names: list[str], allow_paths: bool) -> list[Path]:
        if not allow_paths:
            known = {entry.id for entry in self.catalogue.entries()}
            for name in names:
                if name not in known:
                    raise CheckpointError(f"No model named {name!r} on this server; its catalogue has "
                                          f"{', '.join(sorted(known)) or 'no models'}.")
        return [self.catalogue.resolve(name) for name in names]

    def _built(self) -> InferenceEngine:
        """The engine on the current device, its models loaded (once)."""
        if self._engine is None:
            models = [load_model(path, self.device, self.catalogue) for path in self.paths]
            self._engine = InferenceEngine(models, batch_size=self.options.batch_size, amp=not self.options.fp32,
                                           compile=self.options.compile)
        return self._engine

    def _on_device(self, work: Callable[[InferenceEngine], _Done]) -> _Done:
        """``work(engine)``; after the GPU ran out of memory (loading or segmenting), again on the CPU."""
        try:
            return work(self._built())
        except torch.OutOfMemoryError:
            if self.device == "cpu":
                raise
            self._engine = None
            torch.cuda.empty_cache()
            log.warning("%s", OUT_OF_MEMORY_NOTE)
            self.notes.append(OUT_OF_MEMORY_NOTE)
            self.device = "cpu"
            return work(self._built())

    @property
    def loaded(self) -> list[LoadedModel]:
        """The models, loaded on the device the run uses (loads them)."""
        return self._on_device(lambda engine: engine.models)

    def describe(self) -> str:
        """``"<model ids joined by +> on <device>"`` (loads the models)."""
        return f"{'+'.join(model.id for model in self.loaded)} on {self.device}"

    def segment(self, volume: Volume, prompt: str, progress: Callable[[int, int], None] | None = None,
                cancel: CancelToken | None = None) -> SegmentationResult | None:
        """Segment ``volume`` for ``prompt`` with the options given; None if ``cancel`` stopped it. The notes on the
        device come first in the result's ``notes``."""
        options = self.options
        result = self._on_device(lambda engine: engine.segment(
            volume, prompt, threshold=options.threshold, probability=options.probability, progress=progress,
            cancel=cancel, modality=options.modality, components=options.components))
        if result is not None:
            result.notes[:0] = self.notes
        return result

    def segment_image(self, image: np.ndarray, prompt: str) -> SegmentationResult:
        """Segment a 2D picture ``(C, H, W)`` (grey or RGB; see
        :meth:`~TextSegLib.engine.inference.InferenceEngine.segment_image`) with the options given."""
        options = self.options
        result = self._on_device(lambda engine: engine.segment_image(
            image, prompt, threshold=options.threshold, probability=options.probability, modality=options.modality))
        result.notes[:0] = self.notes
        return result
