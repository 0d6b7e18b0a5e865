"""The Slicer module's own logic (``TextSeg/TextSeg.py``) on slicer-core's real MRML classes and a real worker.

``TextSeg.py`` is imported as Slicer imports it, with the Qt-only parts of Slicer's Python package stood in
(``Testing/textseg_module.py``): slicer-core ships the MRML classes, ``slicer.util`` and Slicer's volume and
segmentation storage, not the application. Everything the logic does to the scene runs on the real MRML classes, and
every run, every model list and every import goes through a real worker process (``textseg serve`` on 127.0.0.1, and
``textseg import`` in its Python) as in Slicer, whose own process never loads torch.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import slicer
from testkit import add_user_segment, assert_same_mask, segment_array, snapshot
from textseg_module import textseg_module

from TextSegLib.app.mrml import segment_tag, show_closed_surface, volume_from_node
from TextSegLib.core.messages import first_line
from TextSegLib.engine.catalogue import Catalogue
from TextSegLib.engine.checkpoints import CheckpointError
from TextSegLib.evaluation.demo import DEMO_MODEL, demo_case
from TextSegLib.io.segnrrd import TAG_FOUND, TAG_MODEL, TAG_PROMPT
from TextSegLib.service.protocol import ModelChoice, WorkerError

REPO = Path(__file__).resolve().parents[2]
CASE = demo_case("lung2")
# A chest CT holds a spinal cord, which the shipped model was trained to name (it does not find lung2's lesion, see
# the README): a prompt with a non-empty answer on lung2 and on the slab through slices 28-30.
PROMPT = "the spinal cord"


@pytest.fixture(scope="module")
def textseg():
    """TextSeg.py imported on slicer-core, with ``slicer.mrmlScene`` a real scene; its worker stopped at the end."""
    with textseg_module() as module:
        try:
            yield module
        finally:
            module.TextSegLogic.worker().stop()


@pytest.fixture
def scene(textseg):
    slicer.mrmlScene.Clear(0)
    return slicer.mrmlScene


def load_volume(scene, path: Path, name: str):
    """A volume node read by Slicer's own volume storage node, as Slicer loads a file."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def slab_file(tmp_path: Path, slices: slice) -> Path:
    import SimpleITK as sitk

    path = tmp_path / "lung2_slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(CASE["image"]))[:, :, slices], str(path))
    return path


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def wait_for_progress(run, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while run.progress[0] == 0:
        assert not run.poll() or run.progress[0] > 0, f"the run ended before it was interrupted: {run.job.status()}"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_process_segments_lung2_and_a_rerun_replaces_only_its_own_segment(textseg, scene):
    """``process()`` on the real lung2 CT with the shipped model, into a real segmentation node."""
    from TextSegLib.engine.inference import InferenceEngine
    from TextSegLib.engine.loading import load_model

    volume = load_volume(scene, CASE["image"], "lung2")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "results")
    label = load_volume(scene, CASE["label"], "label")
    user_mask = (volume_from_node(label).array > 0).astype(np.uint8)
    scene.RemoveNode(label)
    user_id = add_user_segment(segmentation, volume, user_mask)
    before_user = [item for item in snapshot(segmentation, volume) if item[0] == user_id]

    logic = textseg.TextSegLogic()
    segment_id = logic.process(volume, segmentation, PROMPT, DEMO_MODEL, device="CPU", batchSize=4)
    engine = InferenceEngine(load_model(DEMO_MODEL, "cpu"), batch_size=4)
    reference = engine.segment(volume_from_node(volume), PROMPT, probability=True)
    expected = reference.mask
    assert 0 < expected.sum() < expected.size
    # The worker process computes in bf16 like this engine, with its own threads: a voxel may only flip where the
    # probability lies at the threshold (measured: 8 of 16 million voxels in one CI run, none in others).
    assert_same_mask(segment_array(segmentation, segment_id, volume), expected, reference.probability,
                     reference.threshold)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == PROMPT and segment_tag(segment, TAG_PROMPT) == PROMPT
    assert segment_tag(segment, TAG_MODEL) == DEMO_MODEL
    assert segmentation.GetDisplayNode() is not None

    probability = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "probability")
    again = logic.process(volume, segmentation, PROMPT, DEMO_MODEL, device="CPU", threshold=0.7,
                          probabilityVolume=probability)
    assert again == segment_id and segmentation.GetSegmentation().GetNumberOfSegments() == 2
    np.testing.assert_array_equal(segment_array(segmentation, segment_id, volume),
                                  volume_from_node(probability).array > 0.7)
    assert [item for item in snapshot(segmentation, volume) if item[0] == user_id] == before_user


def test_the_panel_says_not_found_with_its_evidence(textseg, scene, tmp_path):
    """A run whose threshold nothing reaches: the status line and the segment's tag say "not found" and why."""
    volume = load_volume(scene, slab_file(tmp_path, slice(28, 31)), "slab")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "results")
    logic = textseg.TextSegLogic()
    highest = float(np.nextafter(1.0, 0.0))
    run = logic.startProcessing(volume, PROMPT, DEMO_MODEL, device="CPU", threshold=highest)
    run.wait()
    node, segment_id = logic.finishProcessing(run, segmentation, showResult=False)
    text, warned = logic.describeResult(run, node, segment_id)
    evidence = f"maximum probability {run.result.max_probability:.2f}, threshold 1.00"
    assert warned and text.startswith(f"{PROMPT}: 0 voxels (0.00 mL) in ")
    assert text.endswith(f" on CPU; not found ({evidence}).")
    segment = node.GetSegmentation().GetSegment(segment_id)
    assert segment_tag(segment, TAG_FOUND) == f"not found ({evidence})"


@pytest.fixture
def running(textseg, scene):
    """A run on lung2 (one slice per batch) that has started segmenting, with the scene's node IDs before it."""
    volume = load_volume(scene, CASE["image"], "lung2")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "results")
    before = node_ids(scene)
    logic = textseg.TextSegLogic()
    run = logic.startProcessing(volume, PROMPT, DEMO_MODEL, device="CPU", batchSize=1)
    wait_for_progress(run)
    return logic, run, segmentation, before


def test_cancel_returns_at_once_and_leaves_the_scene_as_it_was(scene, running):
    logic, run, segmentation, before = running
    started = time.monotonic()
    run.cancel()
    assert run.poll() and run.cancelled
    assert logic.finishProcessing(run, segmentation) is None
    assert time.monotonic() - started < 2.0
    assert node_ids(scene) == before and segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert run.progress[0] < run.progress[1]


def test_a_killed_worker_is_reported_and_the_next_run_uses_a_fresh_one(scene, running, tmp_path):
    logic, run, segmentation, before = running
    worker = logic.worker()
    killed = worker.pid
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"stopped by signal 9.*next run starts a fresh worker"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run.poll()
            time.sleep(0.05)
    assert node_ids(scene) == before

    small = load_volume(scene, slab_file(tmp_path, slice(28, 31)), "slab")
    segment_id = logic.process(small, segmentation, PROMPT, DEMO_MODEL, device="CPU")
    assert worker.pid not in (None, killed)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == PROMPT


def test_bad_input_is_refused_with_a_value_error_and_changes_nothing(textseg, scene, tmp_path):
    volume = load_volume(scene, slab_file(tmp_path, slice(28, 31)), "slab")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    before = node_ids(scene)
    logic = textseg.TextSegLogic()
    for arguments, message in (
        ((None, segmentation, PROMPT, DEMO_MODEL), "No input volume"),
        ((volume, None, PROMPT, DEMO_MODEL), "No segmentation node"),
        ((volume, segmentation, "  ", DEMO_MODEL), "The prompt is empty"),
        ((volume, segmentation, "?! ...", DEMO_MODEL), "has no words, only punctuation"),
        ((volume, segmentation, PROMPT, "no-such-model"), "No model named"),
        ((volume, segmentation, PROMPT, ""), "No model chosen"),
    ):
        with pytest.raises(ValueError, match=message):
            logic.process(*arguments)
    with pytest.raises(ValueError, match="threshold"):
        logic.process(volume, segmentation, PROMPT, DEMO_MODEL, threshold=1.5)
    with pytest.raises(TypeError, match="The prompt must be text"):
        logic.process(volume, segmentation, ["the liver"], DEMO_MODEL)
    # The prompt is checked before any worker is asked: an address where nothing listens is never reached.
    with pytest.raises(ValueError, match="The prompt is empty"):
        logic.startProcessing(volume, "", DEMO_MODEL, server="http://127.0.0.1:9")
    assert node_ids(scene) == before and segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_the_panels_device_names_and_threshold_range_are_the_librarys(textseg):
    """TextSeg.py cannot import TextSegLib where it declares the parameter node (before its version check), so it
    writes these literally: they must agree with ``TextSegLib.core.options``."""
    from TextSegLib.core.options import DEVICES, THRESHOLD_STEP

    hints = typing.get_type_hints(textseg.TextSegParameterNode, include_extras=True)
    (within,) = hints["threshold"].__metadata__
    assert (within.minimum, within.maximum) == pytest.approx((THRESHOLD_STEP, 1.0 - THRESHOLD_STEP))
    (choice,) = hints["device"].__metadata__
    assert choice.choices == list(textseg.DEVICES) and tuple(textseg.DEVICES.values()) == DEVICES


def test_the_model_list_comes_from_the_worker_and_follows_its_models_folder(textseg, small_checkpoint):
    """The panel's model list is the worker's ``/v1/models``: the shipped model, and a checkpoint put into the
    worker's models folder (``$TEXTSEG_MODELS_DIR``, this test's own) while it runs, as the catalogue lists it."""
    logic = textseg.TextSegLogic()
    worker = logic.worker()
    worker.stop()  # the next call starts a worker in this test's environment
    assert DEMO_MODEL in [choice.id for choice in logic.modelChoices()]
    started = worker.pid
    folder = Path(os.environ["TEXTSEG_MODELS_DIR"])
    shutil.copyfile(small_checkpoint, folder / "dropped-in.safetensors")
    listed = {choice.id: choice for choice in logic.modelChoices()}
    assert worker.pid == started is not None
    (entry,) = [entry for entry in Catalogue(folder).entries() if entry.id == "dropped-in"]
    assert listed["dropped-in"] == ModelChoice.from_entry(entry)


def test_importing_a_model_goes_through_the_worker(textseg, small_checkpoint, tmp_path):
    """``importModel`` runs ``textseg import`` in the worker's Python and environment: the running worker lists
    the model at once; a damaged file and a taken id are refused with the command's one line, and nothing is
    copied."""
    logic = textseg.TextSegLogic()
    imported = logic.importModel(str(small_checkpoint))
    assert imported.choice.id == "small-texlivernet" and imported.choice in logic.modelChoices()
    assert imported.path.name == "small-texlivernet.safetensors"
    assert imported.path.read_bytes() == small_checkpoint.read_bytes()
    folder = sorted(imported.path.parent.iterdir())

    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(small_checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as direct:
        Catalogue(tmp_path / "elsewhere").import_model(damaged)
    with pytest.raises(WorkerError) as refused:
        logic.importModel(str(damaged))
    assert str(refused.value) == first_line(direct.value) and "damaged" in str(refused.value)
    with pytest.raises(WorkerError, match=r"^The catalogue already has a model 'small-texlivernet'; import it"):
        logic.importModel(str(small_checkpoint))
    assert sorted(imported.path.parent.iterdir()) == folder


def test_a_server_cannot_be_sent_a_model_and_is_told_to_import_it_there(textseg, small_checkpoint):
    logic = textseg.TextSegLogic()
    with pytest.raises(WorkerError, match=r"^Models cannot be imported into the TextSeg server at "
                       r"http://127\.0\.0\.1:9 from here: .* run `textseg import small-texlivernet\.safetensors` "
                       r"there, then pick the model\.$"):
        logic.importModel(str(small_checkpoint), "http://127.0.0.1:9", "a-token")


# Run in a fresh interpreter, as 3D Slicer's GUI process: list, import and segment through the logic. Testing/ goes
# on sys.path only after slicer-core's package is imported, as in Slicer, where `slicer` is there first.
_SLICER_PROCESS = """
import json, sys
import slicer
checkpoint, slab, prompt, model, testing = sys.argv[1:]
sys.path.insert(0, testing)
from textseg_module import textseg_module

with textseg_module() as textseg:
    logic = textseg.TextSegLogic()
    try:
        listed = [choice.id for choice in logic.modelChoices()]
        imported = logic.importModel(checkpoint).choice.id
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "slab")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        slicer.mrmlScene.AddNode(storage)
        storage.SetFileName(slab)
        assert storage.ReadData(volume)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentId = logic.process(volume, segmentation, prompt, model, device="CPU")
        name = segmentation.GetSegmentation().GetSegment(segmentId).GetName()
    finally:
        logic.worker().stop()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "open_clip")
                or m.startswith(("TextSegLib.engine", "TextSegLib.models", "TextSegLib.text")))
print(json.dumps({"listed": listed, "imported": imported, "segment": name, "loaded": loaded}))
"""


def test_slicers_process_lists_imports_and_segments_without_torch(small_checkpoint, tmp_path):
    """The logic the panel calls (model list, import, a run) in a fresh interpreter: everything goes through the
    worker, and Slicer's process never imports torch, the engine or the networks."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _SLICER_PROCESS, str(small_checkpoint),
                           str(slab_file(tmp_path, slice(28, 31))), PROMPT, DEMO_MODEL, str(REPO / "Testing")],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert DEMO_MODEL in outcome["listed"] and outcome["imported"] == "small-texlivernet"
    assert outcome["segment"] == PROMPT and outcome["loaded"] == []


def test_requirements_are_compared_as_pip_compares_them(textseg):
    """PEP 440 through ``packaging``: local versions (``2.15.0+cpu``), pre-releases, any number of parts."""
    import importlib.metadata

    logic = textseg.TextSegLogic
    torch_version = importlib.metadata.version("torch")
    assert logic._satisfied(f"torch>={torch_version}") and not logic._satisfied(f"torch>{torch_version}")
    assert logic._satisfied("numpy>=1.26,<3") and not logic._satisfied("numpy>=99")
    assert not logic._satisfied("a-package-nobody-installed>=1")
    assert logic().missingDependencies() == []  # this environment has everything requirements.txt asks for


def test_an_older_slicer_is_refused_with_one_message(textseg, scene):
    slicer.app.minorVersion = 8
    try:
        reason = textseg.unsupportedReason()
        assert "TextSeg needs 3D Slicer 5.10 or later" in reason and "this is Slicer 5.8" in reason
        with pytest.raises(RuntimeError, match=r"needs 3D Slicer 5\.10"):
            textseg.TextSegLogic().ensureDependencies(askConfirmation=False)
    finally:
        slicer.app.minorVersion = 10
    assert textseg.unsupportedReason() == ""


def test_the_3d_view_warning_follows_slicers_converter_rules(textseg, scene, tmp_path):
    """Without a labelmap-to-surface rule (slicer-core registers none) the user is told; with Slicer's rule
    (registered by the Segmentations module in the application) the surface is made and nothing is said."""
    volume = load_volume(scene, slab_file(tmp_path, slice(28, 31)), "slab")
    mask = np.zeros(volume_from_node(volume).array.shape, np.uint8)
    mask[:, 200:300, 300:400] = 1
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in list(factory.GetConverterRules()):  # an earlier test in this process may have registered Slicer's
        if rule.GetTargetRepresentationName() == "Closed surface":
            factory.UnregisterConverterRule(rule)
    assert not any(rule.GetTargetRepresentationName() == "Closed surface" for rule in factory.GetConverterRules())
    without = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    add_user_segment(without, volume, mask)
    (warning,) = show_closed_surface(without)
    assert "cannot be shown in 3D" in warning
    # A segmentation takes the factory's rules when it is made, as every segmentation in Slicer does after the
    # Segmentations module registered them at start-up.
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    user_id = add_user_segment(segmentation, volume, mask)
    assert show_closed_surface(segmentation) == []
    surface = segmentation.GetSegmentation().GetSegment(user_id).GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 0


def _hold_the_gil_for(seconds: float) -> None:
    """Block this thread in C without releasing the GIL, as Slicer's main thread does in the Qt event loop."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


def _panel_path(logic, scene, wait) -> float:
    """Seconds for the panel's path on lung2 from a cold worker (the volume sent, the job followed and the result
    fetched on a background thread, the main thread calling ``wait`` between 100 ms polls; the result stored)."""
    logic.worker().stop()
    volume = load_volume(scene, CASE["image"], "lung2")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    started = time.perf_counter()
    run = logic.prepareProcessing(volume, PROMPT, DEMO_MODEL, device="CPU")
    run.startInBackground()
    while True:
        wait(0.1)
        if run.poll():
            break
    logic.finishProcessing(run, segmentation, showResult=False)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    return time.perf_counter() - started


def test_the_panels_run_path_is_not_starved_by_a_main_thread_holding_the_gil(textseg, scene):
    """The panel's path with a main thread that holds the GIL between its 100 ms polls, as Slicer's does in the Qt
    event loop, against the same path with a main thread that releases it (``time.sleep``), both from a cold
    worker: at most four times as long. A starved path took 15 times as long (the earlier thread-based panel: 24 of
    lung2's 61 slices in 90 s); how the path compares with ``textseg segment`` is a benchmark's figure
    (``Benchmarks/worker.py``), not this test's. Holding the GIL costs the path about 5 s whatever its length (each
    blocking call of the background thread, starting the worker, sending the volume, fetching the result, waits
    for the main thread's next poll to get the GIL back), so the ratio moves with the machine: 1.6 to 2.5 over ten
    runs on a two-core machine (held 9.0 to 11.2 s, released 4.1 to 6.8 s), where a bound of 2 failed one run in
    three."""
    logic = textseg.TextSegLogic()
    released = _panel_path(logic, scene, time.sleep)
    held = _panel_path(logic, scene, _hold_the_gil_for)
    assert held <= 4 * released, f"holding the GIL {held:.1f} s, releasing it {released:.1f} s"
