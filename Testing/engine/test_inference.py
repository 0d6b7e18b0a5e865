"""The inference engine on the real lung2 CT: geometry, orientation, batching, cancel, progress, ensembles."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from testkit import save_small_checkpoint

from TextSegLib.core.errors import TextSegError
from TextSegLib.core.results import MIN_FOUND_ML
from TextSegLib.engine.batching import BatchTuner
from TextSegLib.engine.checkpoints import save_checkpoint
from TextSegLib.engine.devices import memory_error, resolve_device
from TextSegLib.engine.inference import CancelToken, InferenceEngine, largest_component
from TextSegLib.engine.loading import MODEL_CACHE_SIZE, clear_model_cache, load_model, loaded_model_ids
from TextSegLib.evaluation.demo import DEMO_MODEL
from TextSegLib.io.segnrrd import TAG_CHECKPOINT, TAG_MODEL, TAG_PROMPT, segment_for_result, write_seg_nrrd
from TextSegLib.io.volumes import Volume
from TextSegLib.text.features import PROMPT_CACHE

PROMPT = "a large soft-tissue mass in the posterior left lower lung"


@pytest.fixture(scope="module")
def model(small_checkpoint):
    return load_model(small_checkpoint, "cpu")


@pytest.fixture(scope="module")
def lung2_slab(lung2) -> Volume:
    """Twelve real slices of lung2 through the lesion (keeps the slower tests short)."""
    image = lung2.to_sitk()[:, :, 24:36]
    return Volume.from_sitk(image, source="lung2 slab")


def geometry(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)


def read_seg(path) -> tuple[sitk.Image, dict]:
    """A .seg.nrrd as SimpleITK sees it (geometry) and as slicerio sees it (segments)."""
    return sitk.ReadImage(str(path)), slicerio.read_segmentation(str(path))


def test_lung2_output_keeps_the_input_grid_and_writes_a_correct_seg_nrrd(lung2, model, tmp_path, data_dir):
    result = InferenceEngine(model).segment(lung2, PROMPT, probability=True)
    assert result.mask.shape == lung2.array.shape == (61, 512, 512) and result.mask.dtype == np.uint8
    assert result.probability.shape == lung2.array.shape and result.probability.dtype == np.float32
    assert result.probability.min() >= 0.0 and result.probability.max() <= 1.0
    np.testing.assert_array_equal(result.mask, (result.probability > 0.5).astype(np.uint8))
    assert result.modality == "CT" and result.prompt == PROMPT
    assert 0 < result.voxel_count < result.mask.size, "a random-weight model still gives a non-trivial mask"

    path = tmp_path / "lung2.seg.nrrd"
    write_seg_nrrd(path, [segment_for_result(result, "lesion")], lung2)
    image, segmentation = read_seg(path)
    assert_same_geometry(image, sitk.ReadImage(str(data_dir / "lung2_image.nrrd")))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "lesion"
    assert segment["tags"][TAG_PROMPT] == PROMPT
    assert segment["tags"][TAG_MODEL] == model.id
    assert segment["tags"][TAG_CHECKPOINT] == model.info.sha256
    mask = slicerio.segment_mask(segmentation, segment)
    np.testing.assert_array_equal(np.transpose(mask, (2, 1, 0)).astype(bool), result.mask.astype(bool))


def run_tuner(seconds_per_slice: dict[int, float]) -> tuple[list[int], int]:
    """The sizes a tuner asks for when a batch of ``b`` slices takes ``b * seconds_per_slice[b]``, and its choice."""
    tuner, asked = BatchTuner(), []
    while not tuner.finished:
        asked.append(tuner.size)
        tuner.record(tuner.size, tuner.size * seconds_per_slice[tuner.size])
    return asked, tuner.size


def test_batch_tuner_times_the_second_batch_of_each_size_and_stops_at_the_first_slower_one():
    asked, chosen = run_tuner({1: 1.0, 2: 0.5, 4: 0.6, 8: 0.1})
    assert asked == [1, 1, 2, 2, 4, 4] and chosen == 2  # 8 is never tried once 4 was slower than 2
    asked, chosen = run_tuner({1: 1.0, 2: 0.9, 4: 0.8, 8: 0.7})
    assert asked == [1, 1, 2, 2, 4, 4, 8, 8] and chosen == 8
    asked, chosen = run_tuner({1: 0.3, 2: 0.4, 4: 0.1, 8: 0.1})
    assert asked == [1, 1, 2, 2] and chosen == 1


def test_batch_tuner_ignores_the_first_batch_of_a_size_and_short_batches():
    tuner = BatchTuner()
    assert not tuner.record(1, 100.0)  # oneDNN set-up: not counted
    assert not tuner.record(1, 1.0)
    assert tuner.size == 2
    assert not tuner.record(1, 0.001)  # a volume's last, shorter batch
    assert tuner.size == 2
    assert not tuner.record(2, 100.0)
    assert tuner.record(2, 4.0) and tuner.size == 1  # 2 s per slice against 1 s
    assert not tuner.record(1, 1.0) and tuner.size == 1  # the choice stands


def test_cpu_engine_times_its_batch_size_once_per_model(lung2, small_checkpoint):
    """32 slices are enough for the whole search (at most 1+1+2+2+4+4+8+8 = 30)."""
    volume = Volume.from_sitk(lung2.to_sitk()[:, :, 14:46])
    model = load_model(small_checkpoint, "cpu")
    model.cpu_batch.clear()
    sizes = []
    original = InferenceEngine._probabilities

    def recording(self, loaded, slices, *args):
        sizes.append(slices.shape[0])
        return original(self, loaded, slices, *args)

    engine = InferenceEngine(model, amp=False)
    assert engine.chosen_batch_size(model) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InferenceEngine, "_probabilities", recording)
        tuned = engine.segment(volume, PROMPT, probability=True)
        assert sizes[:4] == [1, 1, 2, 2] and sum(sizes) == 32
        chosen = engine.chosen_batch_size(model)
        assert chosen in BatchTuner.CANDIDATES
        sizes.clear()
        InferenceEngine(model, amp=False).segment(volume, PROMPT)  # a re-prompt: no timing again
        assert sizes == [chosen] * (32 // chosen)
    single = InferenceEngine(model, batch_size=1, amp=False).segment(volume, PROMPT, probability=True)
    np.testing.assert_allclose(tuned.probability, single.probability, atol=1e-5, rtol=0)


def test_batched_equals_one_slice_at_a_time(lung2_slab, model):
    batched = InferenceEngine(model, batch_size=5, amp=False).segment(lung2_slab, PROMPT, probability=True)
    single = InferenceEngine(model, batch_size=1, amp=False).segment(lung2_slab, PROMPT, probability=True)
    np.testing.assert_allclose(batched.probability, single.probability, atol=1e-5, rtol=0)
    disagreeing = np.count_nonzero(batched.mask != single.mask)
    assert disagreeing <= 1e-5 * batched.mask.size


def resampled_oblique(volume: Volume) -> Volume:
    """lung2 resampled (linear) onto a grid rotated by 20 degrees about S and 10 about L, 1.2 mm in-plane."""
    image = volume.to_sitk()
    rotation = sitk.VersorRigid3DTransform()
    rotation.SetRotation((0, 0, 1), np.deg2rad(20))
    rz = np.asarray(rotation.GetMatrix()).reshape(3, 3)
    rotation.SetRotation((1, 0, 0), np.deg2rad(10))
    rx = np.asarray(rotation.GetMatrix()).reshape(3, 3)
    direction = rz @ rx
    spacing = (1.2, 1.2, 5.0)
    size = (240, 240, 40)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()]))
    origin = centre - direction @ (np.asarray(spacing) * np.asarray(size) / 2)
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), spacing,
                        tuple(direction.reshape(-1)), -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, source="lung2 oblique")


def test_oblique_copy_keeps_its_own_grid(lung2, model, tmp_path):
    oblique = resampled_oblique(lung2)
    assert abs(oblique.direction[0, 1]) > 0.3  # truly oblique
    result = InferenceEngine(model, batch_size=8).segment(oblique, PROMPT)
    assert result.mask.shape == oblique.array.shape
    path = tmp_path / "oblique.seg.nrrd"
    write_seg_nrrd(path, [segment_for_result(result)], oblique)
    image, segmentation = read_seg(path)
    assert_same_geometry(image, oblique.to_sitk())
    np.testing.assert_allclose(np.asarray(segmentation["ijkToLPS"]), oblique.ijk_to_lps(), atol=1e-5)


def same_image_other_layout(volume: Volume, flip_i: bool, swap_ij: bool) -> Volume:
    """The same physical image stored with its i axis reversed and/or i and j swapped."""
    array, direction = volume.array, np.asarray(volume.direction, dtype=float).copy()
    spacing, origin = list(volume.spacing), np.asarray(volume.origin, dtype=float)
    if flip_i:
        origin = origin + direction[:, 0] * spacing[0] * (array.shape[2] - 1)
        direction[:, 0] *= -1
        array = array[:, :, ::-1]
    if swap_ij:
        direction = direction[:, [1, 0, 2]]
        spacing = [spacing[1], spacing[0], spacing[2]]
        array = np.transpose(array, (0, 2, 1))
    return Volume(np.ascontiguousarray(array), tuple(spacing), tuple(origin), direction, source="relayout")


@pytest.mark.parametrize(("flip_i", "swap_ij"), [(True, False), (False, True), (True, True)])
def test_orientation_does_not_change_the_answer(lung2_slab, model, flip_i, swap_ij):
    """A file storing the same patient in another axis order gets the same segmentation, voxel for voxel in
    physical space: the engine reorients to the model's canonical orientation and back."""
    other = same_image_other_layout(lung2_slab, flip_i, swap_ij)
    here = lung2_slab.to_sitk()
    there = other.to_sitk()
    for index in [(0, 0, 0), (511, 3, 11), (100, 400, 5)]:
        point = here.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(point, there.TransformIndexToPhysicalPoint(there.TransformPhysicalPointToIndex(
            point)), atol=1e-4)
    engine = InferenceEngine(model, batch_size=6, amp=False)
    reference = engine.segment(lung2_slab, PROMPT, probability=True)
    moved = engine.segment(other, PROMPT, probability=True)
    back = moved.probability
    if swap_ij:
        back = np.transpose(back, (0, 2, 1))
    if flip_i:
        back = back[:, :, ::-1]
    np.testing.assert_allclose(back, reference.probability, atol=1e-6)


def test_cancel_returns_nothing_and_stops_between_batches(lung2_slab, model):
    token = CancelToken()
    token.cancel()
    assert InferenceEngine(model, batch_size=4).segment(lung2_slab, PROMPT, cancel=token) is None

    token, calls = CancelToken(), []

    def progress(done, total):
        calls.append((done, total))
        token.cancel()

    assert InferenceEngine(model, batch_size=4).segment(lung2_slab, PROMPT, cancel=token, progress=progress) is None
    assert calls == [(4, 12)]


def test_progress_reaches_the_total(lung2_slab, model):
    calls = []
    InferenceEngine(model, batch_size=5).segment(lung2_slab, PROMPT, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(5, 12), (10, 12), (12, 12)]


def test_the_prompt_is_encoded_once_per_volume(lung2_slab, model, monkeypatch):
    PROMPT_CACHE.clear()
    calls = []
    encoder_type = type(model.text_encoder)
    original = encoder_type.encode
    monkeypatch.setattr(encoder_type, "encode", lambda self, prompts: calls.append(prompts) or original(self, prompts))
    engine = InferenceEngine(model, batch_size=2)
    engine.segment(lung2_slab, PROMPT)
    engine.segment(lung2_slab, PROMPT)
    assert calls == [[PROMPT]]


def test_different_prompts_give_different_probabilities(lung2_slab, model):
    engine = InferenceEngine(model, batch_size=6)
    a = engine.segment(lung2_slab, PROMPT, probability=True).probability
    b = engine.segment(lung2_slab, "a small calcified nodule in the right upper lung", probability=True).probability
    assert np.abs(a - b).max() > 1e-4


def test_ensemble_averages_probabilities(lung2_slab, small_checkpoint, second_checkpoint):
    a, b = load_model(small_checkpoint, "cpu"), load_model(second_checkpoint, "cpu")
    pa = InferenceEngine(a, batch_size=6).segment(lung2_slab, PROMPT, probability=True).probability
    pb = InferenceEngine(b, batch_size=6).segment(lung2_slab, PROMPT, probability=True).probability
    calls = []
    both = InferenceEngine([a, b], batch_size=6).segment(lung2_slab, PROMPT, probability=True,
                                                          progress=lambda d, t: calls.append((d, t)))
    np.testing.assert_allclose(both.probability, (pa + pb) / 2, atol=1e-6)
    np.testing.assert_array_equal(both.mask, ((pa + pb) / 2 > 0.5).astype(np.uint8))
    assert [m.id for m in both.models] == [a.id, b.id] and calls[-1] == (24, 24)


def test_threshold_and_empty_results(lung2_slab, model):
    engine = InferenceEngine(model, batch_size=6)
    highest = float(np.nextafter(1.0, 0.0))
    result = engine.segment(lung2_slab, PROMPT, threshold=highest, probability=True)
    assert result.probability.max() < 1.0  # no probability above the highest threshold below 1
    assert result.empty and result.voxel_count == 0 and result.threshold == highest
    assert not result.found and result.max_probability == float(result.probability.max())
    assert result.presence == f"not found (maximum probability {result.max_probability:.2f}, threshold 1.00)"
    found = engine.segment(lung2_slab, PROMPT, threshold=0.5, probability=True)
    assert found.voxel_ml == pytest.approx(np.prod(lung2_slab.spacing) / 1000)
    assert found.found == (found.volume_ml >= MIN_FOUND_ML) and found.presence.startswith(
        "found" if found.found else "not found")
    speck = int(np.ceil(MIN_FOUND_ML / found.voxel_ml)) - 1  # voxels above the threshold, under a finding's volume
    threshold = float(np.sort(found.probability, axis=None)[-speck - 1])
    few = engine.segment(lung2_slab, PROMPT, threshold=threshold)
    assert few.voxel_count == speck and not few.found and "under the 0.05 mL of a finding" in few.presence
    for threshold in (0.0, 1.0, 5):  # a probability threshold lies strictly between 0 and 1
        with pytest.raises(ValueError, match="between 0 and 1"):
            engine.segment(lung2_slab, PROMPT, threshold=threshold)


def test_models_are_cached_and_devices_checked(small_checkpoint, monkeypatch):
    assert load_model(small_checkpoint, "cpu") is load_model(str(small_checkpoint), "cpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="No CUDA GPU") as missing:
        resolve_device("cuda")
    assert isinstance(missing.value, TextSegError)
    with pytest.raises(TextSegError, match="Unknown device 'gpu0': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    # A computer with one GPU, as torch reports it (a stand-in: this one may have none).
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(TextSegError, match=r"There is no GPU cuda:3 here: this computer has 1 \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:3")


def test_the_model_cache_keeps_the_newest_version_of_the_most_recently_used_models(tmp_path):
    """A long-lived worker keeps at most MODEL_CACHE_SIZE models, each file in its newest version; the rest are
    freed (before, every checkpoint it had loaded, and every earlier version of one rewritten in place, stayed)."""
    clear_model_cache()
    path = tmp_path / "retrained.safetensors"
    save_small_checkpoint(path)
    first = load_model(path, "cpu")
    earlier = weakref.ref(first.network)
    save_small_checkpoint(path, seed=1)
    stamp = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))  # a second later, whatever the file system's clock resolution
    second = load_model(path, "cpu")
    assert second is not first and loaded_model_ids() == [second.id]
    del first
    gc.collect()
    assert earlier() is None  # the earlier version's network is freed
    others = [tmp_path / f"model{i}.safetensors" for i in range(MODEL_CACHE_SIZE)]
    for seed, other in enumerate(others, start=2):
        save_small_checkpoint(other, seed=seed)
    loaded = [load_model(other, "cpu") for other in others]
    assert len(loaded_model_ids()) == MODEL_CACHE_SIZE
    assert load_model(others[0], "cpu") is loaded[0]  # used again: now the most recent
    assert load_model(path, "cpu") is not second  # the least recently used was dropped, so it loads again
    assert load_model(others[1], "cpu") is not loaded[1]  # and it pushed out the next least recently used
    clear_model_cache()


def test_running_out_of_memory_says_what_to_do():
    """The errors a device gives when it runs out of memory become a TextSeg error that says what to do; on CUDA it
    is still a ``torch.OutOfMemoryError``, which the worker catches to retry on the CPU. Other errors stay faults.
    (A real CPU run out of memory is in Testing/app/test_bad_input.py.)"""
    cuda = memory_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                        torch.device("cuda:0"))
    assert isinstance(cuda, TextSegError) and isinstance(cuda, torch.OutOfMemoryError)
    assert str(cuda) == ("The GPU (cuda:0) ran out of memory while segmenting; close other programs that use it, or "
                         "segment on the CPU.")
    for error in (MemoryError("Unable to allocate 9.09 TiB"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 10000000000000 bytes.")):
        cpu = memory_error(error, torch.device("cpu"))
        assert isinstance(cpu, TextSegError) and isinstance(cpu, MemoryError)
        assert "smaller batch size" in str(cpu)
    assert memory_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), torch.device("cpu")) is None


def test_engine_rejects_bad_settings(model):
    with pytest.raises(ValueError, match="batch size"):
        InferenceEngine(model, batch_size=0)
    with pytest.raises(ValueError, match="at least one model"):
        InferenceEngine([])


def test_a_checkpoint_naming_an_encoder_of_the_wrong_width_is_refused(small_checkpoint, bert_folder, tmp_path):
    from testkit import rewrite_metadata

    from TextSegLib.engine.checkpoints import CheckpointError

    wrong = tmp_path / "wrong-encoder.safetensors"
    rewrite_metadata(small_checkpoint, wrong, text_encoder={"source": f"hf:{bert_folder}", "max_tokens": 40})
    with pytest.raises(CheckpointError, match=r"expects text token features of width 384.*gives 32"):
        load_model(wrong, "cpu")


def test_staged_pipeline_bookkeeping_on_the_cpu(lung2_slab, model, monkeypatch):
    """The CUDA path's staging (prefetch, double buffers, delayed downloads, out-of-memory restart) run with
    synchronous stand-ins for the CUDA streams: the engine's result must not change."""
    from TextSegLib.engine import acceleration

    exact = InferenceEngine(model, batch_size=5, amp=False)
    reference = exact.segment(lung2_slab, PROMPT, probability=True).probability
    monkeypatch.setattr(InferenceEngine, "_pipeline", lambda self, canonical, output: acceleration._StagedPipeline(
        acceleration._SynchronousStreams(), canonical, output))
    original = InferenceEngine._probabilities
    calls = []

    def flaky(self, model, slices, *args):
        calls.append(slices.shape[0])
        if len(calls) == 2:  # the second batch runs out of memory once
            raise torch.OutOfMemoryError("simulated")
        return original(self, model, slices, *args)

    monkeypatch.setattr(InferenceEngine, "_probabilities", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    staged = InferenceEngine(model, batch_size=5, amp=False).segment(lung2_slab, PROMPT,
                                                                     probability=True).probability
    assert calls == [5, 5, 2, 2, 2, 1]  # 5, then out of memory at 5, then halved to 2 for the remaining 7
    np.testing.assert_allclose(staged, reference, atol=1e-6)


def test_compiled_networks_match_eager_and_fall_back(monkeypatch):
    """``compile=True`` wraps networks in torch.compile, padding short batches; a failing compiler leaves the
    eager network in charge with a warning."""
    from TextSegLib.engine.acceleration import _CompiledOrEager
    from TextSegLib.text.features import TextFeatures

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.head = torch.nn.Conv2d(4, 1, 1)

        def forward(self, image, text):
            return self.head(torch.relu(self.conv(image))) + text.pooled[:, :1, None, None]

    torch.manual_seed(0)
    network = Tiny().eval()
    text = TextFeatures(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 8))
    images = torch.rand(4, 1, 16, 16)

    def broken(*args, **kwargs):
        def fail(*inner, **options):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    wrapped = _CompiledOrEager(network, None)
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(images, text.expand(4)), network(images, text.expand(4)))
    assert wrapped.failed
    monkeypatch.undo()
    wrapped = _CompiledOrEager(network, None)
    with torch.inference_mode():
        full = wrapped(images, text.expand(4))
        short = wrapped(images[:3], text.expand(3))  # padded to the compiled batch of 4
    assert not wrapped.failed and short.shape == (3, 1, 16, 16)
    torch.testing.assert_close(full, network(images, text.expand(4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, full[:3], atol=1e-5, rtol=1e-5)


def test_batchnorm_folding_keeps_the_outputs(model):
    import copy

    from TextSegLib.engine.acceleration import fold_batchnorm
    from TextSegLib.text.features import TextFeatures

    network = copy.deepcopy(model.network).eval()
    folded = fold_batchnorm(copy.deepcopy(network))
    def count(net: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())

    assert count(folded) < count(network) // 2
    text = TextFeatures(torch.randn(1, 6, 384), torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 384)).expand(2)
    images = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(images, text), network(images, text), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(network.train())
    engine = InferenceEngine(model)
    assert engine._network(model) is InferenceEngine(model)._network(model)  # prepared once per model
    assert count(engine._network(model)) == count(folded) and count(model.network) == count(network)


def test_reduced_precision_masks_agree_with_fp32_on_the_real_case(lung2):
    """The engine's default reduced precision (bf16 on a CPU that has it) against fp32, with the trained demo
    model on lung2: masks agree to a Dice of at least 0.99."""
    from TextSegLib.engine.devices import cpu_has_native_bf16
    from TextSegLib.evaluation.metrics import dice

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16: the engine computes in fp32 here")
    demo = load_model(DEMO_MODEL, "cpu")
    prompt = "the right autochthonous back muscle"  # a structure the shipped model finds in a chest CT
    fast = InferenceEngine(demo).segment(lung2, prompt, probability=True)
    exact = InferenceEngine(demo, amp=False).segment(lung2, prompt, probability=True)
    difference = float(np.abs(fast.probability - exact.probability).max())
    assert 0.0 < difference < 0.5  # really computed differently, never wildly
    assert exact.voxel_count > 10_000 and dice(fast.mask, exact.mask) >= 0.99


def test_largest_component_keeps_the_biggest_26_connected_part():
    mask = np.zeros((6, 8, 8), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[3, 3, 3] = 1  # touches the block only at a corner: 26-connected to it
    mask[4:6, 5:8, 5:8] = 1  # 18 voxels, apart
    kept = largest_component(mask)
    assert kept.dtype == np.uint8 and kept.sum() == 18 and kept[4:6, 5:8, 5:8].all()
    mask[4:6, 5:8, 5:8] = 0
    mask[5, 7, 7] = 1
    assert largest_component(mask).sum() == 9  # the block with its corner voxel
    empty = np.zeros((2, 3, 3), dtype=np.uint8)
    assert largest_component(empty).sum() == 0


def test_components_option_and_the_model_s_default(lung2_slab, model, tmp_path):
    """"largest" leaves one connected part of the thresholded mask, "all" every part; the checkpoint's
    ``components`` is the default, an explicit option wins, and a bad value is one line naming both choices."""
    from scipy import ndimage

    engine = InferenceEngine(model, batch_size=6)
    every = engine.segment(lung2_slab, PROMPT, threshold=0.3, probability=True)
    _, parts = ndimage.label(every.mask, structure=np.ones((3, 3, 3)))
    assert parts > 1  # the random network marks scattered voxels: something to choose from
    largest = engine.segment(lung2_slab, PROMPT, threshold=0.3, components="largest")
    _, kept = ndimage.label(largest.mask, structure=np.ones((3, 3, 3)))
    assert kept == 1 and np.array_equal(largest.mask, largest_component(every.mask))
    assert 0 < largest.voxel_count < every.voxel_count
    path = tmp_path / "organs.safetensors"
    saved = save_small_checkpoint(path, seed=0)
    assert saved.components == "all"
    organ = load_model(save_checkpoint(path, model.network, architecture="texlivernet",
                                       text_encoder=model.info.text_encoder, preprocessing=model.info.preprocessing,
                                       components="largest").path, "cpu")
    assert organ.info.components == "largest"
    by_default = InferenceEngine(organ, batch_size=6).segment(lung2_slab, PROMPT, threshold=0.3)
    assert np.array_equal(by_default.mask, largest.mask)
    asked = InferenceEngine(organ, batch_size=6).segment(lung2_slab, PROMPT, threshold=0.3, components="all")
    assert np.array_equal(asked.mask, every.mask)
    with pytest.raises(ValueError, match="is not one of all, largest") as bad:
        engine.segment(lung2_slab, PROMPT, components="biggest")
    assert "\n" not in str(bad.value)
    with pytest.raises(ValueError, match="components"):
        save_checkpoint(tmp_path / "bad.safetensors", model.network, architecture="texlivernet",
                        text_encoder=model.info.text_encoder, components="biggest")
