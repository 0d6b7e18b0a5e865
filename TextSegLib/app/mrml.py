"""Masks as segments in Slicer segmentation nodes, and volumes as Slicer volume nodes.

A segment gets the name, colour, terminology and TextSeg tags that a ``.seg.nrrd`` file gives it
(:mod:`TextSegLib.io.segnrrd` describes the tags and their encoding, the same in files and in nodes).

Slicer nodes are used through their MRML classes only, so the same functions run inside 3D Slicer and on the
``slicer-core`` package: a scalar volume node becomes a :class:`Volume` (voxels copied, IJK-to-RAS geometry
converted to LPS), and a mask becomes a segment on the volume's own grid. ``slicer`` is imported lazily, never at
module level. The rules for segments in a node:

- the segment's labelmap has the volume's geometry (through the volume's and the segmentation's parent transforms,
  which must be linear), and a segmentation without segments takes the volume's transform and reference geometry;
- a segment whose ``TextSeg.Prompt`` tag holds the same prompt is replaced in place (same ID, same position, same
  colour); no other segment is touched;
- name and colour are set explicitly (not auto-generated), terminology is stored in the ``TerminologyEntry`` tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from TextSegLib.core.errors import TextSegValueError
from TextSegLib.io.segnrrd import TAG_PROMPT, SegmentSpec, decode_tag, encode_tag, segment_for_result
from TextSegLib.io.volumes import Volume, VolumeError, check_volume

if TYPE_CHECKING:
    from slicer import (
        vtkMRMLScalarVolumeNode,
        vtkMRMLScene,
        vtkMRMLSegmentationNode,
        vtkOrientedImageData,
        vtkSegment,
    )
    from vtk import vtkMatrix4x4

    from TextSegLib.core.results import SegmentationResult

__all__ = [
    "describe_result",
    "find_segment_by_prompt",
    "put_segment",
    "segment_tag",
    "show_closed_surface",
    "store_in_new_or_existing_node",
    "store_result",
    "update_volume_node",
    "volume_from_node",
    "volume_to_node",
]


# ------------------------------------------------------------------------------------------------ Slicer nodes


def _matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtkMatrix4x4:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def _ijk_to_ras(volume_node: vtkMRMLScalarVolumeNode) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def _node_name(node: object) -> str:
    return node.GetName() or node.GetID() or node.GetClassName()


def volume_from_node(volume_node: vtkMRMLScalarVolumeNode | None, modality: str | None = None) -> Volume:
    """A :class:`Volume` (voxels copied, LPS geometry) from a scalar volume node, for the inference engine.

    The geometry is the node's own IJK-to-RAS matrix; a parent transform is not applied (segments made from the
    result follow the same transform, see :func:`put_segment`). Raises :class:`VolumeError` for a missing node, a
    node without voxels and vector (multi-component) volumes.
    """
    from vtkmodules.util import numpy_support

    if volume_node is None:
        raise VolumeError("No input volume: choose the volume to segment.")
    name = _node_name(volume_node)
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise VolumeError(f"The volume {name!r} holds no voxels; load the image again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise VolumeError(
            f"The volume {name!r} has {image.GetNumberOfScalarComponents()} values per voxel (a vector or colour "
            "image); TextSeg segments scalar CT or MR volumes: convert it to a scalar volume first."
        )
    dimensions = image.GetDimensions()
    if 0 in dimensions:
        raise VolumeError(f"The volume {name!r} is empty (size {dimensions}); there is nothing to segment.")
    array = numpy_support.vtk_to_numpy(scalars).reshape(dimensions[::-1]).copy()
    if array.dtype == np.float64 or not np.issubdtype(array.dtype, np.number):
        array = array.astype(np.float32)
    lps = np.diag([-1.0, -1.0, 1.0]) @ _ijk_to_ras(volume_node)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return Volume(
        array,
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in lps[:, 3]),
        lps[:, :3] / spacing,
        modality,
        source=name,
    )


def segment_tag(segment: vtkSegment, key: str) -> str | None:
    """Decoded value of a segment's tag (see :func:`encode_tag`), None when the segment lacks it."""
    import vtk

    value = vtk.reference("")
    if not segment.GetTag(key, value):
        return None
    return decode_tag(str(value))


def find_segment_by_prompt(segmentation_node: vtkMRMLSegmentationNode, prompt: str) -> str | None:
    """ID of the segment TextSeg made in ``segmentation_node`` from ``prompt`` (its ``TextSeg.Prompt`` tag)."""
    segmentation = segmentation_node.GetSegmentation()
    for number in range(segmentation.GetNumberOfSegments()):
        if segment_tag(segmentation.GetNthSegment(number), TAG_PROMPT) == prompt:
            return segmentation.GetNthSegmentID(number)
    return None


def _labelmap(mask: np.ndarray, image_to_world: np.ndarray) -> vtkOrientedImageData:
    """A ``vtkOrientedImageData`` holding ``mask`` (``(K, J, I)``, 1 inside) with the given IJK-to-world matrix."""
    import slicer
    import vtk
    from vtkmodules.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    voxels = numpy_support.numpy_to_vtk((mask != 0).astype(np.uint8).ravel(), deep=True,
                                        array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(voxels)
    image.SetImageToWorldMatrix(_numpy_to_matrix(image_to_world))
    return image


def _voxel_shape(volume_node: vtkMRMLScalarVolumeNode) -> tuple[int, int, int]:
    """``(K, J, I)`` shape of a volume node's voxel array (what its masks must have)."""
    image = volume_node.GetImageData()
    if image is None:
        raise VolumeError(f"The volume {_node_name(volume_node)!r} holds no voxels; load the image again.")
    return tuple(int(d) for d in image.GetDimensions()[::-1])


def put_segment(segmentation_node: vtkMRMLSegmentationNode, volume_node: vtkMRMLScalarVolumeNode,
                spec: SegmentSpec) -> str:
    """Add ``spec`` as a segment on ``volume_node``'s grid to ``segmentation_node``; return the segment ID.

    A segment carrying the same ``TextSeg.Prompt`` tag is replaced (same ID and position); every other segment
    is left as it was. Raises :class:`~TextSegLib.core.errors.TextSegValueError` (a ``ValueError``) when the mask
    does not fit the volume, when the segmentation is not made of labelmaps (for example imported models) or when a
    non-linear transform lies between the two nodes.
    """
    import slicer
    import vtk

    if spec.mask.shape != _voxel_shape(volume_node):
        raise TextSegValueError(
            f"The mask of {spec.name!r} has shape {spec.mask.shape}, the volume {_node_name(volume_node)!r} "
            f"{_voxel_shape(volume_node)}; the segment must be made on that volume."
        )
    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    geometry_name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation.SetSourceRepresentationName(labelmap_name)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    elif segmentation.GetSourceRepresentationName() != labelmap_name:
        raise TextSegValueError(
            f"The segmentation {_node_name(segmentation_node)!r} is made of "
            f"{segmentation.GetSourceRepresentationName().lower()}s, not labelmaps; choose another segmentation "
            "or create a new one."
        )
    elif not segmentation.GetConversionParameter(geometry_name):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)

    volume_to_segmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), volume_to_segmentation
    ):
        raise TextSegValueError(
            f"A non-linear transform lies between the volume {_node_name(volume_node)!r} and the segmentation "
            f"{_node_name(segmentation_node)!r}; harden it or put both under the same transform."
        )
    image_to_world = _matrix_to_numpy(volume_to_segmentation) @ _ijk_to_ras(volume_node)

    segment = slicer.vtkSegment()
    segment.SetName(spec.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*(float(c) for c in spec.color))
    segment.SetColorAutoGenerated(False)
    for key, value in spec.tags.items():
        segment.SetTag(key, encode_tag(value))
    if spec.terminology:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), spec.terminology)
    segment.AddRepresentation(labelmap_name, _labelmap(spec.mask, image_to_world))

    prompt = spec.tags.get(TAG_PROMPT)
    segment_id = find_segment_by_prompt(segmentation_node, prompt) if prompt else None
    following = ""
    if segment_id is not None:
        position = segmentation.GetSegmentIndex(segment_id)
        if position + 1 < segmentation.GetNumberOfSegments():
            following = segmentation.GetNthSegmentID(position + 1)
        segmentation.RemoveSegment(segment_id)
    else:
        segment_id = segmentation.GenerateUniqueSegmentID("TextSeg")
    if not segmentation.AddSegment(segment, segment_id, following):
        raise RuntimeError(f"The segment {spec.name!r} could not be added to {_node_name(segmentation_node)!r}.")
    return segment_id


def store_result(segmentation_node: vtkMRMLSegmentationNode, volume_node: vtkMRMLScalarVolumeNode,
                 result: SegmentationResult, name: str | None = None) -> str:
    """Put an engine result on ``volume_node`` into ``segmentation_node`` as one segment; return its ID.

    Name (default: the prompt), terminology, tags and colour as :func:`segment_for_result` makes them; the colour
    index counts the TextSeg segments already in the node, and a segment replaced for the same prompt keeps its
    colour (a colour the user chose survives a re-run).
    """
    segmentation = segmentation_node.GetSegmentation()
    previous = find_segment_by_prompt(segmentation_node, result.prompt)
    index = sum(
        1 for n in range(segmentation.GetNumberOfSegments())
        if segmentation.GetNthSegmentID(n) != previous
        and segment_tag(segmentation.GetNthSegment(n), TAG_PROMPT) is not None
    )
    spec = segment_for_result(result, name, index)
    if previous is not None:
        spec.color = tuple(segmentation.GetSegment(previous).GetColor())
    return put_segment(segmentation_node, volume_node, spec)


def store_in_new_or_existing_node(scene: vtkMRMLScene, volume_node: vtkMRMLScalarVolumeNode,
                                  segmentation_node: vtkMRMLSegmentationNode | None, result: SegmentationResult,
                                  name: str | None = None) -> tuple[vtkMRMLSegmentationNode, str]:
    """Store ``result`` as :func:`store_result` does, in ``segmentation_node`` or, when it is None, in a new
    segmentation in ``scene`` named after the volume (``"<volume> TextSeg"``, made unique); return the segmentation
    node and the segment's ID. The node gets its default display nodes. When storing fails, a segmentation created
    here is removed again, so the scene is as it was."""
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{_node_name(volume_node)} TextSeg"))
    try:
        segment_id = store_result(segmentation_node, volume_node, result, name)
    except Exception:
        if created:
            scene.RemoveNode(segmentation_node)
        raise
    segmentation_node.CreateDefaultDisplayNodes()
    return segmentation_node, segment_id


def describe_result(result: SegmentationResult, name: str, notes: Sequence[str] = ()) -> tuple[str, bool]:
    """One line for the user about a stored result, and whether it carries a warning: the segment's ``name``, its
    voxels and millilitres, the time and device, whether the target was found and on what evidence, then the
    result's own notes and ``notes`` (warnings from showing it). A warning is a target not found or any note."""
    everything = [*result.notes, *notes]
    text = (f"{name}: {result.voxel_count} voxels ({result.volume_ml:.2f} mL) in {result.seconds:.1f} s on "
            f"{(result.device or '?').upper()}; {result.presence}.")
    return " ".join([text, *everything]), not result.found or bool(everything)


def update_volume_node(volume_node: vtkMRMLScalarVolumeNode, array: np.ndarray,
                       reference_node: vtkMRMLScalarVolumeNode) -> None:
    """Fill ``volume_node`` with ``array`` (``(K, J, I)``) on ``reference_node``'s grid, geometry and transform
    (used for probability volumes)."""
    if array.shape != _voxel_shape(reference_node):
        raise ValueError(f"array shape {array.shape} differs from the volume's {_voxel_shape(reference_node)}")
    volume_node.SetAndObserveImageData(_image_data(array))
    volume_node.SetIJKToRASMatrix(_numpy_to_matrix(_ijk_to_ras(reference_node)))
    volume_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())


def _image_data(array: np.ndarray):
    """A ``vtkImageData`` holding a copy of ``array`` (``(K, J, I)``), without geometry (nodes keep it)."""
    import vtk
    from vtkmodules.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    return image


def volume_to_node(volume: Volume, scene, name: str) -> vtkMRMLScalarVolumeNode:
    """A new scalar volume node in ``scene`` holding a copy of ``volume``'s voxels and its geometry (LPS converted
    to RAS), with default display nodes: the inverse of :func:`volume_from_node`."""
    check_volume(volume)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(_image_data(volume.array))
    node.SetIJKToRASMatrix(_numpy_to_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.ijk_to_lps()))
    node.CreateDefaultDisplayNodes()
    return node


def show_closed_surface(segmentation_node: vtkMRMLSegmentationNode) -> list[str]:
    """Make the closed surfaces the 3D views draw segments with; return a warning when they cannot be made.

    ``vtkMRMLSegmentationNode::CreateClosedSurfaceRepresentation`` returns false when the segmentation has no
    conversion path from its labelmaps to closed surfaces (a Slicer without the Segmentations module's converter
    rules); the segments then show in the slice views only.
    """
    import slicer

    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    if segmentation_node.CreateClosedSurfaceRepresentation() and \
            segmentation_node.GetSegmentation().ContainsRepresentation(surface):
        return []
    return [f"The segments of {_node_name(segmentation_node)!r} cannot be shown in 3D here (no conversion from "
            "labelmaps to closed surfaces); they show in the slice views."]
