"""Masks as segments in Slicer nodes, on the real MRML classes of the ``slicer-core`` package.

A scalar volume node is made from twelve real lung2 CT slices with an oblique IJK-to-RAS matrix; the engine runs
on it through ``volume_from_node`` with a small checkpoint, and ``store_result`` puts the result into segmentation
nodes, as the Slicer module does. Also: the storage round trip (slicer-core and slicerio), the user's segments,
re-running a prompt, cancelling, transforms, and the prompt-to-terminology table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import slicer
import slicerio
import vtk
from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string
from testkit import add_user_segment, from_vtk_matrix, ijk_to_ras, read_label, segment_array, snapshot, to_vtk_matrix
from vtkmodules.util import numpy_support

from TextSegLib import __version__
from TextSegLib.app.mrml import (
    describe_result,
    find_segment_by_prompt,
    put_segment,
    segment_tag,
    store_in_new_or_existing_node,
    store_result,
    update_volume_node,
    volume_from_node,
)
from TextSegLib.engine.checkpoints import file_sha256
from TextSegLib.engine.inference import CancelToken, InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.io.segnrrd import (
    PALETTE,
    TAG_CHECKPOINT,
    TAG_MODEL,
    TAG_PROMPT,
    TAG_VERSION,
    SegmentSpec,
    decode_tag,
    segment_for_result,
    write_seg_nrrd,
)
from TextSegLib.io.terminology import FINDINGS, terminology_for_prompt
from TextSegLib.io.volumes import VolumeError

PROMPT = "a large soft-tissue mass in the posterior left lower lung"
SLICES = slice(24, 36)  # twelve real slices through the lung2 lesion
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(axis: int, degrees: float) -> np.ndarray:
    """4 x 4 rotation about world axis ``axis``."""
    a, b = [i for i in range(3) if i != axis]
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    matrix = np.eye(4)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def labelmap_geometry(segmentation_node, segment_id: str) -> np.ndarray:
    """IJK-to-RAS matrix of a segment's labelmap, in the segmentation node's coordinates."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    return from_vtk_matrix(matrix)


@pytest.fixture(scope="module")
def slab(lung2) -> tuple[np.ndarray, np.ndarray]:
    """Real lung2 voxels (twelve slices) and an oblique IJK-to-RAS matrix for them."""
    array = np.ascontiguousarray(lung2.array[SLICES])
    ijk_to_lps = lung2.ijk_to_lps()
    ijk_to_lps[:3, 3] += ijk_to_lps[:3, 2] * SLICES.start
    return array, rotation(2, 25.0) @ rotation(0, 12.0) @ LPS_TO_RAS @ ijk_to_lps


def add_volume_node(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "lung2"):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(to_vtk_matrix(ijk_to_ras))
    return node


def add_segmentation_node(scene, name: str = "Segmentation"):
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    return node


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def volume_node(scene, slab):
    return add_volume_node(scene, *slab)


@pytest.fixture(scope="module")
def engine(small_checkpoint) -> InferenceEngine:
    return InferenceEngine(load_model(small_checkpoint, "cpu"), batch_size=4)


@pytest.fixture(scope="module")
def result(engine, slab):
    scene = slicer.vtkMRMLScene()
    segmented = engine.segment(volume_from_node(add_volume_node(scene, *slab)), PROMPT)
    assert 0 < segmented.voxel_count < segmented.mask.size
    return segmented


def write_and_read(scene, segmentation_node, path):
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation_node)
    loaded = add_segmentation_node(scene, "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    return loaded


# ------------------------------------------------------------------------------------------------ volume nodes


def test_volume_from_node_copies_voxels_and_converts_the_oblique_geometry_to_lps(volume_node, slab):
    array, ijk_to_ras = slab
    volume = volume_from_node(volume_node, modality="CT")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.array.dtype == array.dtype and volume.modality == "CT" and volume.source == "lung2"
    np.testing.assert_allclose(volume.ijk_to_lps(), LPS_TO_RAS @ ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-9)
    assert abs(volume.direction[0, 1]) > 0.1, "the test volume must really be oblique"
    volume.array[0, 0, 0] += 1  # a copy: the node's voxels stay as they were
    assert numpy_support.vtk_to_numpy(volume_node.GetImageData().GetPointData().GetScalars())[0] == array[0, 0, 0]


def test_volume_from_node_rejects_what_cannot_be_segmented(scene, slab):
    with pytest.raises(VolumeError, match="No input volume"):
        volume_from_node(None)
    empty = slicer.vtkMRMLScalarVolumeNode()
    empty.SetName("empty")
    scene.AddNode(empty)
    with pytest.raises(VolumeError, match="'empty' holds no voxels"):
        volume_from_node(empty)
    vector = slicer.vtkMRMLVectorVolumeNode()
    vector.SetName("rgb")
    scene.AddNode(vector)
    image = vtk.vtkImageData()
    image.SetDimensions(4, 3, 2)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(image)
    with pytest.raises(VolumeError, match="3 values per voxel"):
        volume_from_node(vector)


# ------------------------------------------------------------------------------------------------- segments


def test_segment_matches_the_engine_mask_and_keeps_everything_through_storage(
        scene, volume_node, result, tmp_path, small_checkpoint):
    segmentation_node = add_segmentation_node(scene)
    segment_id = store_result(segmentation_node, volume_node, result)

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    np.testing.assert_array_equal(segment_array(segmentation_node, segment_id, volume_node), result.mask)
    np.testing.assert_allclose(labelmap_geometry(segmentation_node, segment_id), ijk_to_ras(volume_node), atol=1e-9)
    assert segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole()) \
        is volume_node

    expected_terminology = terminology_for_prompt(PROMPT).to_slicer()
    assert "SCT^4147007^Mass" in expected_terminology and "SCT^39607008^Lung~SCT^7771000^Left" in expected_terminology
    sha256 = file_sha256(small_checkpoint)
    model_id = small_checkpoint.name.removesuffix(".safetensors")
    expected_tags = {TAG_PROMPT: PROMPT, TAG_MODEL: model_id, TAG_CHECKPOINT: sha256, TAG_VERSION: __version__}
    expected_color = PALETTE[0]  # a finding: no organ colour, the first palette colour

    def check(node, segment_id):
        segment = node.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == PROMPT
        np.testing.assert_allclose(segment.GetColor(), expected_color, atol=1e-6)
        assert segment.GetTerminology() == expected_terminology
        assert {key: segment_tag(segment, key) for key in expected_tags} == expected_tags
        np.testing.assert_array_equal(segment_array(node, segment_id, volume_node), result.mask)

    check(segmentation_node, segment_id)
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()

    path = tmp_path / "lung2.seg.nrrd"
    loaded = write_and_read(scene, segmentation_node, path)
    assert loaded.GetSegmentation().GetSegmentIDs() == (segment_id,)
    check(loaded, segment_id)

    written = slicerio.read_segmentation(str(path))
    (item,) = written["segments"]
    assert item["id"] == segment_id and item["name"] == PROMPT
    np.testing.assert_allclose(item["color"], expected_color, atol=1e-6)
    assert item["terminology"] == terminology_entry_from_string(expected_terminology)
    assert {key: decode_tag(item["tags"][key]) for key in expected_tags} == expected_tags
    np.testing.assert_allclose(written["ijkToLPS"], LPS_TO_RAS @ ijk_to_ras(volume_node), atol=1e-5)
    mask = np.transpose(slicerio.segment_mask(written, item), (2, 1, 0)) != 0
    np.testing.assert_array_equal(mask, result.mask.astype(bool))


def test_the_users_segment_is_untouched_and_a_prompt_replaces_only_its_own_segment(
        scene, volume_node, engine, result, data_dir, tmp_path):
    segmentation_node = add_segmentation_node(scene)
    user_mask = read_label(data_dir, "lung2")[0][SLICES]
    assert user_mask.any()
    user_id = add_user_segment(segmentation_node, volume_node, user_mask)
    user_before = snapshot(segmentation_node, volume_node)

    first_id = store_result(segmentation_node, volume_node, result)
    # Another prompt's result (only the prompt matters for its metadata; its voxels are the first run's).
    liver_id = store_result(segmentation_node, volume_node, dataclasses.replace(result, prompt="the liver"),
                            name="liver")
    rerun = engine.segment(volume_from_node(volume_node), PROMPT, threshold=0.7)
    assert not np.array_equal(rerun.mask, result.mask), "the re-run must differ to show the replacement"
    second_id = store_result(segmentation_node, volume_node, rerun)

    segmentation = segmentation_node.GetSegmentation()
    assert second_id == first_id
    assert segmentation.GetSegmentIDs() == (user_id, first_id, liver_id)
    assert snapshot(segmentation_node, volume_node)[:1] == user_before
    np.testing.assert_array_equal(segment_array(segmentation_node, first_id, volume_node), rerun.mask)
    liver = segmentation.GetSegment(liver_id)
    assert liver.GetName() == "liver" and "SCT^123037004^Anatomical Structure~SCT^10200004^Liver" in \
        liver.GetTerminology()
    np.testing.assert_allclose(liver.GetColor(), np.array([221, 130, 101]) / 255.0, atol=1e-6)

    # The same after a save and load, where Slicer may share one labelmap layer between segments.
    loaded = write_and_read(scene, segmentation_node, tmp_path / "three.seg.nrrd")
    loaded_user = snapshot(loaded, volume_node)[:1]
    assert loaded_user == user_before
    loaded.GetSegmentation().GetSegment(first_id).SetColor(0.2, 0.3, 0.4)  # the user recolours the result
    assert store_result(loaded, volume_node, result) == first_id
    assert loaded.GetSegmentation().GetSegmentIDs() == (user_id, first_id, liver_id)
    assert snapshot(loaded, volume_node)[:1] == user_before
    np.testing.assert_array_equal(segment_array(loaded, first_id, volume_node), result.mask)
    np.testing.assert_allclose(loaded.GetSegmentation().GetSegment(first_id).GetColor(), (0.2, 0.3, 0.4))
    assert find_segment_by_prompt(loaded, "the liver") == liver_id


def test_a_cancelled_run_adds_nothing_to_the_scene(scene, volume_node, engine, data_dir):
    segmentation_node = add_segmentation_node(scene)
    add_user_segment(segmentation_node, volume_node, read_label(data_dir, "lung2")[0][SLICES])
    nodes_before = [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]
    segments_before = snapshot(segmentation_node, volume_node)

    token = CancelToken()
    batches = []

    def progress(done: int, total: int) -> None:
        batches.append(done)
        token.cancel()  # the user presses Cancel while the first batch is shown

    outcome = engine.segment(volume_from_node(volume_node), PROMPT, progress=progress, cancel=token)
    assert outcome is None and batches == [4]
    assert [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())] == nodes_before
    assert snapshot(segmentation_node, volume_node) == segments_before


def test_a_seg_nrrd_written_outside_slicer_loads_into_a_node_with_its_metadata(scene, volume_node, result, tmp_path):
    """What ``textseg segment`` writes (slicerio) reads back in Slicer's storage node the same way."""
    volume = volume_from_node(volume_node)
    path = tmp_path / "cli.seg.nrrd"
    write_seg_nrrd(path, [segment_for_result(result, "mass"),
                          segment_for_result(dataclasses.replace(result, prompt="the liver"), index=1)], volume)
    loaded = add_segmentation_node(scene, "from file")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    mass, liver = (loaded.GetSegmentation().GetNthSegment(n) for n in range(2))
    assert mass.GetName() == "mass" and liver.GetName() == "the liver"
    assert not mass.GetNameAutoGenerated() and not mass.GetColorAutoGenerated()
    assert mass.GetTerminology() == terminology_for_prompt(PROMPT).to_slicer()
    assert segment_tag(mass, TAG_PROMPT) == PROMPT and segment_tag(liver, TAG_PROMPT) == "the liver"
    np.testing.assert_allclose(mass.GetColor(), PALETTE[0], atol=1e-6)
    np.testing.assert_allclose(liver.GetColor(), np.array([221, 130, 101]) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(
        segment_array(loaded, loaded.GetSegmentation().GetNthSegmentID(0), volume_node), result.mask)


# --------------------------------------------------------------------------------------- transforms, errors


def test_segments_follow_the_volume_through_linear_transforms(scene, volume_node, result):
    def linear_transform(matrix: np.ndarray):
        node = slicer.vtkMRMLLinearTransformNode()
        scene.AddNode(node)
        node.SetMatrixTransformToParent(to_vtk_matrix(matrix))
        return node

    shift = np.eye(4)
    shift[:3, 3] = (15.0, -4.0, 30.0)
    volume_transform = linear_transform(rotation(1, 8.0) @ shift)
    volume_node.SetAndObserveTransformNodeID(volume_transform.GetID())
    spec = SegmentSpec(result.mask, "mass", (1.0, 0.0, 0.0), {TAG_PROMPT: PROMPT})

    empty = add_segmentation_node(scene, "new")
    put_segment(empty, volume_node, spec)
    assert empty.GetTransformNodeID() == volume_transform.GetID()

    elsewhere = add_segmentation_node(scene, "elsewhere")
    put_segment(elsewhere, volume_node, SegmentSpec(result.mask, "first", (0.0, 1.0, 0.0)))
    segmentation_transform = linear_transform(rotation(2, -20.0))
    elsewhere.SetAndObserveTransformNodeID(segmentation_transform.GetID())
    segment_id = put_segment(elsewhere, volume_node, spec)
    expected = np.linalg.inv(rotation(2, -20.0)) @ rotation(1, 8.0) @ shift @ ijk_to_ras(volume_node)
    np.testing.assert_allclose(labelmap_geometry(elsewhere, segment_id), expected, atol=1e-6)

    bent = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(bent)
    bent.SetAndObserveTransformNodeID(segmentation_transform.GetID())
    elsewhere.SetAndObserveTransformNodeID(bent.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        put_segment(elsewhere, volume_node, spec)


def test_put_segment_refuses_masks_and_segmentations_it_cannot_use(scene, volume_node, result):
    segmentation_node = add_segmentation_node(scene)
    with pytest.raises(ValueError, match=r"has shape \(3, 4, 5\)"):
        put_segment(segmentation_node, volume_node, SegmentSpec(np.zeros((3, 4, 5), np.uint8), "x", (1, 0, 0)))
    surfaces = add_segmentation_node(scene, "models")
    surfaces.SetSourceRepresentationToClosedSurface()
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    surfaces.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="closed surfaces, not labelmaps"):
        store_result(surfaces, volume_node, result)
    assert surfaces.GetSegmentation().GetNumberOfSegments() == 1


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def test_a_result_goes_into_a_new_segmentation_named_after_the_volume_or_into_the_given_one(
        scene, volume_node, result):
    """What the Slicer panel and the web page both do with a finished run."""
    node, segment_id = store_in_new_or_existing_node(scene, volume_node, None, result, "mass")
    assert node.GetName() == "lung2 TextSeg" and scene.IsNodePresent(node) and node.GetDisplayNode() is not None
    assert node.GetSegmentation().GetSegment(segment_id).GetName() == "mass"
    np.testing.assert_array_equal(segment_array(node, segment_id, volume_node), result.mask)
    second, _ = store_in_new_or_existing_node(scene, volume_node, None, result)
    assert second.GetName() == "lung2 TextSeg_1"

    given = add_segmentation_node(scene, "mine")
    before = node_ids(scene)
    same, given_id = store_in_new_or_existing_node(scene, volume_node, given, result)
    assert same is given and given.GetDisplayNode() is not None
    assert given.GetSegmentation().GetSegment(given_id).GetName() == PROMPT
    assert node_ids(scene) == [*before, given.GetDisplayNodeID()]


def test_a_result_that_cannot_be_stored_leaves_the_scene_as_it_was(scene, volume_node, result):
    wrong = dataclasses.replace(result, mask=result.mask[1:])
    given = add_segmentation_node(scene, "mine")
    before = node_ids(scene)
    for segmentation_node in (None, given):
        with pytest.raises(ValueError, match="the segment must be made on that volume"):
            store_in_new_or_existing_node(scene, volume_node, segmentation_node, wrong)
        assert node_ids(scene) == before
    assert given.GetSegmentation().GetNumberOfSegments() == 0


def test_one_line_says_the_size_time_device_and_whether_the_target_was_found(volume_node, result):
    """The line the Slicer panel and the web page show; a target not found or any note makes it a warning."""
    spacing = volume_from_node(volume_node).spacing
    millilitres = result.voxel_count * float(np.prod(spacing)) / 1000.0
    assert result.found and result.notes == []
    text, warned = describe_result(result, "mass")
    assert text == (f"mass: {result.voxel_count} voxels ({millilitres:.2f} mL) in {result.seconds:.1f} s on "
                    f"{result.device.upper()}; found ({result.evidence}).")
    assert not warned

    noted = dataclasses.replace(result, notes=["The GPU ran out of memory; TextSeg used the CPU instead."])
    text, warned = describe_result(noted, "mass", ["The segments cannot be shown in 3D here."])
    assert warned and text.endswith(f"; found ({result.evidence}). The GPU ran out of memory; TextSeg used the CPU "
                                    "instead. The segments cannot be shown in 3D here.")

    empty = dataclasses.replace(result, mask=np.zeros_like(result.mask), max_probability=0.2)
    text, warned = describe_result(empty, "mass")
    assert warned and text.startswith("mass: 0 voxels (0.00 mL) in ")
    assert text.endswith("; not found (maximum probability 0.20, threshold 0.50).")


def test_update_volume_node_puts_a_probability_on_the_volume_grid(scene, volume_node, result):
    probability = add_volume_node(scene, np.zeros((1, 1, 1), np.float32), np.eye(4), "probability")
    values = np.linspace(0.0, 1.0, result.mask.size, dtype=np.float32).reshape(result.mask.shape)
    update_volume_node(probability, values, volume_node)
    np.testing.assert_array_equal(volume_from_node(probability).array, values)
    np.testing.assert_allclose(volume_from_node(probability).ijk_to_lps(), volume_from_node(volume_node).ijk_to_lps())
    with pytest.raises(ValueError, match="differs from the volume"):
        update_volume_node(probability, values[:2], volume_node)


# ----------------------------------------------------------------------------------------------- terminology


GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"


@pytest.mark.parametrize(("prompt", "label", "category", "context"), [
    ("a large soft-tissue mass in the posterior left lower lung", "Mass in Left Lung", "Morphologically Altered",
     GENERAL_ANATOMY),
    ("a small solid nodule in the right upper lung near the mediastinum", "Nodule in Right Lung", "Morphologically",
     DICOM_MASTER),
    ("a contrast-enhancing lesion in the left cerebral hemisphere with irregular margins", "Mass in Brain",
     "Morphologically", GENERAL_ANATOMY),
    ("a small enhancing mass in the right breast", "Mass in Right Breast", "Morphologically", GENERAL_ANATOMY),
    ("a moderately low-density shadow in the upper right lobe of the liver with blurred margins", "Mass in Liver",
     "Morphologically", GENERAL_ANATOMY),
    ("hepatic tumour", "Neoplasm in Liver", "Morphologically", DICOM_MASTER),
    ("brain tumor", "Neoplasm in Brain", "Morphologically", DICOM_MASTER),
    ("bilateral pulmonary infection, two infected areas", "Inflammation in Lung", "Morphologically", DICOM_MASTER),
    ("a nodular lesion", "Nodule", "Morphologically", DICOM_MASTER),
    ("Liver", "Liver", "Anatomical Structure", GENERAL_ANATOMY),
    ("the left kidney", "Left Kidney", "Anatomical Structure", GENERAL_ANATOMY),
    ("the right breast", "Right Breast", "Anatomical Structure", DICOM_MASTER),
    ("both lungs, left and right", "Lung", "Anatomical Structure", GENERAL_ANATOMY),
    ("pancreas", "Pancreas", "Anatomical Structure", GENERAL_ANATOMY),
    ("the urinary bladder", "Bladder", "Anatomical Structure", GENERAL_ANATOMY),
    ("a lesion in the liver near the right kidney", "Mass in Liver", "Morphologically", GENERAL_ANATOMY),
    ("lung nodules", "Nodule in Lung", "Morphologically", DICOM_MASTER),
    ("metastases", "Neoplasm", "Morphologically", DICOM_MASTER),
    ("the gall bladder", "Gallbladder", "Anatomical Structure", GENERAL_ANATOMY),
    ("a cystic structure", "Tissue", "Tissue", GENERAL_ANATOMY),
    ("massive oedema", "Tissue", "Tissue", GENERAL_ANATOMY),
])
def test_prompts_map_to_standard_terminology(prompt, label, category, context):
    entry = terminology_for_prompt(prompt)
    assert entry.label == label
    assert entry.category.meaning.startswith(category)
    parsed = terminology_entry_from_string(entry.to_slicer())
    assert parsed["contextName"] == context
    assert parsed["category"] == [entry.category.scheme, entry.category.value, entry.category.meaning]
    assert parsed["type"] == [entry.type.scheme, entry.type.value, entry.type.meaning]
    assert terminology_entry_to_string(parsed) == entry.to_slicer()


def test_every_real_case_prompt_names_its_organ(annotations):
    organs = {"lung1": "Lung", "lung2": "Lung", "brain1": "Brain", "brain2": "Brain", "breast1": "Breast"}
    for case, row in annotations.items():
        entry = terminology_for_prompt(row["prompt"])
        assert entry.region is not None and entry.region.meaning == organs[case], case
        assert entry.type in {finding.code for finding in FINDINGS}, case
