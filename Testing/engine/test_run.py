"""The one run every front end uses (:class:`TextSegLib.engine.run.Segmenter`): options checked, models by
catalogue id or file (files refused where a server forbids them), the device chosen once with its notes, and the
out-of-memory fall-back to the CPU. Real checkpoints, real lung2 slices, the real engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import TextSegLib.engine.run as run_module
from TextSegLib.core.errors import TextSegError
from TextSegLib.core.options import SegmentOptions
from TextSegLib.engine.catalogue import Catalogue
from TextSegLib.engine.checkpoints import CheckpointError
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.engine.run import OUT_OF_MEMORY_NOTE, Segmenter
from TextSegLib.io.volumes import Volume

PROMPT = "a large soft-tissue mass in the posterior left lower lung"
CPU = SegmentOptions(device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def slab(lung2) -> Volume:
    """Six real lung2 slices through the mass."""
    return Volume.from_sitk(lung2.to_sitk()[:, :, 26:32], source="lung2 slab")


@pytest.fixture(scope="module")
def expected(slab, small_checkpoint):
    """The engine's own answer on the CPU, which every run here must give."""
    return InferenceEngine(load_model(small_checkpoint, "cpu"), batch_size=2).segment(slab, PROMPT)


def test_a_model_by_file_segments_as_the_engine_does(slab, small_checkpoint, expected):
    segmenter = Segmenter([small_checkpoint], CPU)
    seen = []
    result = segmenter.segment(slab, PROMPT, progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(result.mask, expected.mask)
    assert result.notes == [] and result.device == "cpu" and seen[-1] == (6, 6)
    assert segmenter.describe() == f"{small_checkpoint.name.removesuffix('.safetensors')} on cpu"


def test_a_model_by_catalogue_id_is_the_same_model(slab, small_checkpoint, expected):
    Catalogue().import_model(small_checkpoint, "imported-small")
    segmenter = Segmenter(["imported-small"], CPU, allow_paths=False)
    np.testing.assert_array_equal(segmenter.segment(slab, PROMPT).mask, expected.mask)
    assert segmenter.describe() == "imported-small on cpu"


def test_files_are_refused_where_paths_are_not_allowed(small_checkpoint):
    Catalogue().import_model(small_checkpoint, "imported-small")
    with pytest.raises(CheckpointError, match=rf"^No model named {str(small_checkpoint)!r} on this server; its "
                                              "catalogue has .*imported-small"):
        Segmenter([small_checkpoint], CPU, allow_paths=False)


def test_an_unknown_id_and_bad_options_are_refused_before_loading(small_checkpoint, monkeypatch):
    monkeypatch.setattr(run_module, "load_model", lambda *_: pytest.fail("nothing may load"))
    with pytest.raises(CheckpointError, match="No model named 'no-such-model'"):
        Segmenter(["no-such-model"], CPU)
    with pytest.raises(CheckpointError, match="No model chosen"):
        Segmenter([], CPU)
    for options, message in ((SegmentOptions(threshold=1.5), "threshold must lie between 0 and 1"),
                             (SegmentOptions(batch_size=0), "batch size must be at least 1"),
                             (SegmentOptions(device="gpu"), "Unknown device 'gpu'"),
                             (SegmentOptions(modality="PET"), "modality must be 'CT', 'MR'")):
        with pytest.raises(TextSegError, match=message):
            Segmenter([small_checkpoint], options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="here 'cuda' is a real GPU")
def test_cuda_without_a_gpu_runs_on_the_cpu_with_a_note(slab, small_checkpoint, expected):
    segmenter = Segmenter([small_checkpoint], SegmentOptions(device="cuda", batch_size=2))
    note = "No usable GPU was found; TextSeg runs on the CPU."
    assert (segmenter.device, segmenter.notes) == ("cpu", [note])
    first, second = segmenter.segment(slab, PROMPT), segmenter.segment(slab, PROMPT)
    assert first.notes == second.notes == [note] and first.device == "cpu"
    np.testing.assert_array_equal(first.mask, expected.mask)
    assert Segmenter([small_checkpoint], SegmentOptions(device="auto")).notes == []  # auto chose, nothing to say


def test_out_of_memory_on_the_gpu_runs_again_on_the_cpu(slab, small_checkpoint, expected, monkeypatch):
    """Stand-in for a GPU (this test runs where there is none): the device chooser answers "cuda:0", the loader
    loads on the CPU whatever device it is asked for (and records what it was asked), and the engine's first
    segmentation raises ``torch.OutOfMemoryError`` as CUDA does. The fall-back itself, the note and the rebuilt
    engine are the real ones."""
    asked, failures = [], [torch.OutOfMemoryError("CUDA out of memory (stand-in)")]
    monkeypatch.setattr(run_module, "choose_device", lambda device, paths: ("cuda:0", []))
    monkeypatch.setattr(run_module, "load_model",
                        lambda path, device, catalogue: asked.append(device) or load_model(path, "cpu", catalogue))
    segment = InferenceEngine.segment

    def out_of_memory_once(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(InferenceEngine, "segment", out_of_memory_once)
    segmenter = Segmenter([small_checkpoint], SegmentOptions(device="cuda", batch_size=2))
    result = segmenter.segment(slab, PROMPT)
    assert asked == ["cuda:0", "cpu"] and segmenter.device == "cpu"
    assert result.notes == [OUT_OF_MEMORY_NOTE]
    np.testing.assert_array_equal(result.mask, expected.mask)
    assert segmenter.segment(slab, PROMPT).notes == [OUT_OF_MEMORY_NOTE] and asked == ["cuda:0", "cpu"]


def test_out_of_memory_on_the_cpu_is_not_retried(slab, small_checkpoint, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (stand-in)")

    monkeypatch.setattr(InferenceEngine, "segment", out_of_memory)
    segmenter = Segmenter([small_checkpoint], CPU)
    with pytest.raises(torch.OutOfMemoryError):
        segmenter.segment(slab, PROMPT)
    assert segmenter.notes == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_out_of_memory_on_the_gpu_falls_back_to_the_cpu(slab, small_checkpoint, expected):
    """The GPU is capped at what the loaded model holds plus 1 MiB, so the first forward pass runs out of memory."""
    segmenter = Segmenter([small_checkpoint], SegmentOptions(device="cuda", batch_size=2))
    assert segmenter.describe().endswith("on cuda") and segmenter.notes == []
    torch.cuda.empty_cache()
    capped = (torch.cuda.memory_reserved() + 2**20) / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(capped)
    try:
        result = segmenter.segment(slab, PROMPT)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert result.device == "cpu" and result.notes == [OUT_OF_MEMORY_NOTE]
    np.testing.assert_array_equal(result.mask, expected.mask)
