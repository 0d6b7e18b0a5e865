"""The engine's CUDA path on a real GPU: agreement with the CPU, reduced precision, streaming memory, staged copies
with out-of-memory retries, compilation and cancel.

These run where PyTorch sees a GPU and are skipped elsewhere (CI has none); ``Benchmarks/benchmark.py`` prints the
same checks' figures on the GPU. They use the shipped demo checkpoint and the packaged real lung2 CT, so they need
nothing beside an installed TextSeg.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from TextSegLib.engine.inference import CancelToken, InferenceEngine
from TextSegLib.engine.loading import clear_model_cache, load_model
from TextSegLib.evaluation.demo import DEMO_DIR, DEMO_MODEL
from TextSegLib.evaluation.metrics import dice
from TextSegLib.io.volumes import Volume, read_volume

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT = "a large soft-tissue mass in the posterior left lower lung"


@pytest.fixture(scope="module")
def lung2() -> Volume:
    return read_volume(DEMO_DIR / "lung2_image.nrrd")


def _slab(volume: Volume, start: int, stop: int) -> Volume:
    return Volume.from_sitk(volume.to_sitk()[:, :, start:stop])


@pytest.fixture(scope="module")
def gpu_model():
    clear_model_cache()
    return load_model(DEMO_MODEL, "cuda")


def test_cuda_fp32_matches_the_cpu(lung2, gpu_model):
    slab = _slab(lung2, 24, 40)
    cpu = InferenceEngine(load_model(DEMO_MODEL, "cpu"), amp=False).segment(slab, PROMPT, probability=True)
    gpu = InferenceEngine(gpu_model, amp=False).segment(slab, PROMPT, probability=True)
    # amp=False is IEEE fp32 on both (the engine switches cuDNN's TF32 off): only summation order differs.
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=1e-3)
    assert dice(gpu.mask, cpu.mask) >= 0.99


def test_the_inverse_fft_of_a_filtered_spectrum_is_the_same_on_the_gpu():
    from TextSegLib.models.blocks.frequency import hermitian_irfft2

    generator = torch.Generator().manual_seed(0)
    half = torch.complex(torch.randn(2, 3, 64, 33, generator=generator), torch.randn(2, 3, 64, 33, generator=generator))
    torch.testing.assert_close(hermitian_irfft2(half.cuda(), (64, 64)).cpu(), hermitian_irfft2(half, (64, 64)),
                               atol=1e-5, rtol=1e-5)


def test_bf16_masks_agree_with_fp32_on_the_real_case(lung2, gpu_model):
    fp32 = InferenceEngine(gpu_model, amp=False).segment(lung2, PROMPT, probability=True)
    fast = InferenceEngine(gpu_model).segment(lung2, PROMPT, probability=True)
    assert dice(fast.mask, fp32.mask) >= 0.99
    assert np.abs(fast.probability - fp32.probability).max() < 0.1


def test_peak_gpu_memory_does_not_grow_with_the_number_of_slices(lung2, gpu_model):
    engine = InferenceEngine(gpu_model, batch_size=4)
    peaks = []
    for depth in (8, 48):
        slab = _slab(lung2, 0, depth)
        engine.segment(slab, PROMPT)  # warm-up: cuDNN autotuning, pinned buffers
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.segment(slab, PROMPT)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - baseline)
    assert peaks[1] <= 1.05 * peaks[0] + 2**20


def test_out_of_memory_halves_the_batch_and_keeps_the_staged_copies_right(lung2, gpu_model, monkeypatch):
    slab = _slab(lung2, 20, 37)
    reference = InferenceEngine(gpu_model, batch_size=1, amp=False).segment(slab, PROMPT, probability=True)
    original = InferenceEngine._probabilities
    sizes = []

    def flaky(self, model, slices, *args):
        sizes.append(slices.shape[0])
        if len(sizes) == 2:
            raise torch.OutOfMemoryError("simulated")
        return original(self, model, slices, *args)

    monkeypatch.setattr(InferenceEngine, "_probabilities", flaky)
    result = InferenceEngine(gpu_model, batch_size=8, amp=False).segment(slab, PROMPT, probability=True)
    assert sizes[:3] == [8, 8, 4]
    np.testing.assert_allclose(result.probability, reference.probability, atol=1e-4)


def test_the_automatic_batch_size_fits_the_free_memory(lung2, gpu_model):
    engine = InferenceEngine(gpu_model)
    text = gpu_model.text_encoder.encode_cached(PROMPT)
    batch = engine._initial_batch_size(gpu_model, 300, text)
    free, _ = torch.cuda.mem_get_info()
    assert 1 <= batch <= 300
    assert batch * engine._bytes_per_slice(gpu_model, text) <= free


def test_compiled_engine_matches_eager(lung2, gpu_model):
    slab = _slab(lung2, 24, 40)
    eager = InferenceEngine(gpu_model, batch_size=8).segment(slab, PROMPT, probability=True)
    compiled = InferenceEngine(gpu_model, batch_size=8, compile=True).segment(slab, PROMPT, probability=True)
    np.testing.assert_allclose(compiled.probability, eager.probability, atol=0.05)
    assert dice(compiled.mask, eager.mask) >= 0.99


def test_cancel_on_the_gpu_returns_nothing(lung2, gpu_model):
    token = CancelToken()

    def progress(done: int, total: int) -> None:
        if done >= 8:
            token.cancel()

    assert InferenceEngine(gpu_model, batch_size=4).segment(lung2, PROMPT, progress=progress, cancel=token) is None
