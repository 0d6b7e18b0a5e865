"""Helpers shared by the test modules (fixtures live in ``conftest.py``): where the real data is, small checkpoints,
grid comparisons, tiny encoder folders, scene snapshots and training manifests.

No test module imports another; what two of them need lives here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from TextSegLib.app.mrml import (
    segment_tag,
)
from TextSegLib.engine.checkpoints import (
    metadata_digest,
    save_checkpoint,
)
from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.models.freqmedclip import FreqMedCLIP
from TextSegLib.models.freqmedclip_config import FreqMedCLIPConfig
from TextSegLib.models.registry import (
    create_model,
    get_spec,
    preset_config,
)
from TextSegLib.text.features import TextFeatures

REPO = Path(__file__).resolve().parents[1]


DATA = Path(os.environ.get("TEXTSEG_DATA", REPO.parent / "shared" / "data" / "pyradiomics"))


CASES = ("lung1", "lung2", "brain1", "brain2", "breast1")


TOTALSEG = REPO.parent / "shared" / "data" / "totalsegmentator"  # two abdominal CTs and an MR, named structures


OPENKBP = REPO.parent / "shared" / "data" / "openkbp-sample"  # three OpenKBP head-and-neck patients, raw CSVs


MONUSEG = REPO.parent / "shared" / "data" / "monuseg"  # MoNuSeg in LViT's layout: RGB H&E tiles, masks, sentences
MONUSEG_TILES = (("Train_Folder", "TCGA-21-5784-01Z-00-DX1.png"), ("Test_Folder", "TCGA-2Z-A9J9-01A-01-TS1.png"))
"""The two tiles the fast tests use: a PNG training tile and a test tile stored as TIFF (its table says .png)."""


def make_small_texlivernet(seed: int = 0, **overrides):
    """A small-preset TexLiverNet for MiniLM text with seeded random weights, calibrated on real slices.

    BatchNorm statistics are those of eight windowed lung2 slices (as after a first epoch), and the output bias
    is set so that about a third of those slices comes out inside: masks are then neither empty nor full, and
    activations keep their scale through the decoder, so the prompt visibly reaches the output.
    """
    import SimpleITK as sitk


    torch.manual_seed(seed)
    model = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384, **overrides))
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "lung2_image.nrrd")))[20:44:3].astype(np.float32)
    x = torch.from_numpy(np.clip((volume + 200.0) / 400.0, 0.0, 1.0))[:, None]
    x = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", antialias=True)
    generator = torch.Generator().manual_seed(seed)
    text = TextFeatures(torch.randn(1, 8, 384, generator=generator), torch.ones(1, 8, dtype=torch.bool),
                        torch.zeros(1, 384)).expand(x.shape[0])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()
        model(x, text)
        model.eval()
        logits = model(x, text)
        model.head.bias -= torch.quantile(logits.flatten()[::7], 0.67)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def save_small_checkpoint(path: Path, seed: int = 0, **overrides):

    model = make_small_texlivernet(seed, **overrides)
    return save_checkpoint(
        path, model, architecture="texlivernet",
        text_encoder={"source": "minilm", "max_tokens": model.config.max_text_tokens},
        name=f"small test model {seed}", description="random weights, for plumbing tests",
        example_prompts=["a large soft-tissue mass in the posterior left lower lung"],
    )


def assert_same_grid(written: Path, reference: Path) -> None:
    """The image file ``written`` has exactly the size, spacing, origin and direction of ``reference``."""
    import SimpleITK as sitk

    out, ref = sitk.ReadImage(str(written)), sitk.ReadImage(str(reference))
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)


def read_label(data_dir: Path, case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Binary (K, J, I) lesion mask of a real case and its spacing in array-axis order."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data_dir / f"{case}_label.nrrd"))
    return sitk.GetArrayFromImage(image) != 0, tuple(image.GetSpacing()[::-1])


def open_clip_folder(folder: Path, vision_cfg: dict, text_cfg: dict, weights: bool = True) -> Path:
    """An open_clip ``local-dir`` folder (``open_clip_config.json``) with seeded weights saved as
    ``open_clip_model.safetensors`` unless ``weights`` is False."""
    import open_clip
    from safetensors.torch import save_file

    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": text_cfg}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if weights:
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{folder}")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


TINY_VISION_CFG = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}


TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def tiny_open_clip_folder(folder: Path, text_cfg: dict) -> Path:
    return open_clip_folder(folder, TINY_VISION_CFG, text_cfg)


def rewrite_metadata(source, target, sign=True, **changes):
    """Copy a checkpoint with some metadata fields changed (weights untouched). ``sign`` records the digest of the
    changed settings, as saving a model with them would; without it the copy is a tampered file."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["textseg"])
    metadata.update(changes)
    if sign:
        metadata["digest"] = metadata_digest(metadata)
    save_file(load_file(str(source)), str(target), metadata={"textseg": json.dumps(metadata)})


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """A segment's voxels resampled onto the volume's grid, ``(K, J, I)`` uint8."""
    import slicer
    from vtkmodules.util import numpy_support

    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(volume_node.GetImageData().GetDimensions())
    reference.SetImageToWorldMatrix(to_vtk_matrix(ijk_to_ras(volume_node)))
    resampled = slicer.vtkOrientedImageData()
    assert slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled)
    dimensions = resampled.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dimensions[::-1])
    return (voxels != 0).astype(np.uint8)


def snapshot(segmentation_node, volume_node) -> list[tuple]:
    """Everything a user would notice about each segment: ID, name, colour, terminology, status tag, voxels."""
    segmentation = segmentation_node.GetSegmentation()
    state = []
    for number in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(number)
        segment = segmentation.GetSegment(segment_id)
        state.append((segment_id, segment.GetName(), segment.GetColor(), segment.GetTerminology(),
                      segment_tag(segment, "Segmentation.Status"),
                      segment_array(segmentation_node, segment_id, volume_node).tobytes()))
    return state


def add_user_segment(segmentation_node, volume_node, mask: np.ndarray) -> str:
    """A segment as a user makes it in the Segment Editor: a labelmap, a name, a colour, a status."""
    import slicer
    import vtk
    from vtkmodules.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(mask.astype(np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(to_vtk_matrix(ijk_to_ras(volume_node)))
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segment_id = segmentation_node.AddSegmentFromBinaryLabelmapRepresentation(image, "my lesion", [0.1, 0.9, 0.2])
    segmentation_node.GetSegmentation().GetSegment(segment_id).SetTag("Segmentation.Status", "completed")
    return segment_id


def write_dicom_series(image: sitk.Image, folder: Path, modality: str = "CT") -> None:
    """Write a 3D int16 image as a DICOM series, one file per slice, with the usual geometry tags.

    File names run against the slice order, so a reader has to sort the files by position."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    study, series = "1.2.826.0.1.3680043.2.1125.7.1", "1.2.826.0.1.3680043.2.1125.7.2"
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series}.{k + 1}",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0032": "\\".join(repr(float(v)) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            # Row direction (i axis), then column direction (j axis).
            "0020|0037": "\\".join(repr(float(v)) for v in (*direction[0::3], *direction[1::3])),
            "0028|0030": "\\".join(repr(float(v)) for v in (image.GetSpacing()[1], image.GetSpacing()[0])),
            "0018|0050": repr(float(image.GetSpacing()[2])),
            "0020|0013": str(k + 1),
        }
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{image.GetDepth() - 1 - k:03d}.dcm"))
        writer.Execute(slice_image)


def check_shape_and_gradients(module: torch.nn.Module, *inputs: torch.Tensor, expected: tuple[int, ...]):
    """Forward, check the output shape, backward, and check every parameter and every float input got a
    finite, non-zero gradient."""
    inputs = tuple(x.requires_grad_(True) if x.is_floating_point() else x for x in inputs)
    out = module(*inputs)
    assert tuple(out.shape) == expected
    (out.float() ** 2).mean().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"
    for x in inputs:
        if x.is_floating_point():
            assert x.grad is not None and x.grad.abs().sum() > 0
    return out


def calibrated_model(vit_folder: Path, encoder, data_dir: Path, seed: int) -> FreqMedCLIP:
    """A small FreqMedCLIP with seeded random weights, calibrated on real lung2 slices.

    BatchNorm statistics come from a training-mode pass over eight lung2 slices prepared as the engine prepares
    them (min-max CT, 224 x 224, three channels) and the fusion head's bias puts about a third of those pixels
    inside, so masks are neither empty nor full.
    """
    model = small_model(vit_folder, seed=seed)
    preprocessing = Preprocessing.from_metadata(get_spec("freqmedclip").default_preprocessing, channels=3)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))).astype(np.float32)
    mapping = preprocessing.intensity_for("CT").mapping(volume)
    x = preprocessing.prepare(torch.from_numpy(volume[20:44:3]), mapping)
    text = encoder.encode_cached(PROMPT).expand(x.shape[0])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()
        model(x, text)
        model.eval()
        logits = model(x, text)
        model.fuse[-1].bias -= torch.quantile(logits.flatten()[::7], 0.67)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


CONFIGS = REPO / "Training" / "configs"


SHORT = ["model.preset=\"small\"", "text.encoder=\"minilm\"", "train.epochs=1", "train.batch_size=4",
         "train.accumulation=1", "data.slices=\"lesion\"", "data.preprocessing={}"]


def write_manifest(path: Path, data_dir: Path, cases: list[str], annotations: dict, extra: str = "") -> Path:
    rows = ["case,image,label,text,modality,split,label_value,slice"]
    for case in cases:
        row = annotations[case]
        rows.append(f"{case},{data_dir / row['image']},{data_dir / row['label']},{row['prompt']},{row['modality']},,,")
    path.write_text("\n".join(rows) + "\n" + extra)
    return path


def to_vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def from_vtk_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return from_vtk_matrix(matrix)


def small_config(vit_folder: Path, **overrides) -> FreqMedCLIPConfig:
    values = {"vision_source": f"local-dir:{vit_folder}", "text_dim": 32, "pooled_dim": 16, **overrides}
    return preset_config("freqmedclip", "small", **values)


def small_model(vit_folder: Path, seed: int = 0, **overrides) -> FreqMedCLIP:
    torch.manual_seed(seed)
    return create_model("freqmedclip", small_config(vit_folder, **overrides))


PROMPT = "a large soft-tissue mass in the posterior left lower lung"


def assert_same_mask(mask: np.ndarray, reference: np.ndarray, probability: np.ndarray, threshold: float = 0.5,
                     most: int = 100) -> None:
    """``mask`` equals ``reference`` voxel for voxel, except at most ``most`` voxels whose probability (of the
    reference run) lies within 0.05 of the threshold: two runs of one model in two processes, with other thread
    counts or batch sizes, may round such a voxel either way (seen: 1 of 1.6 million on lung2 with a small
    TexLiverNet in fp32, 8 of 16 million with the shipped model in bf16)."""
    differs = np.asarray(mask) != np.asarray(reference)
    assert differs.sum() <= most, f"{differs.sum()} voxels differ"
    assert np.all(np.abs(probability[differs] - threshold) < 0.05), "voxels away from the threshold differ"


def monuseg_folder(root: Path) -> Path:
    """An LViT split folder under ``root`` holding the two real :data:`MONUSEG_TILES` (images as stored, PNG or
    TIFF; masks; each tile's sentence from its own table, the table naming both ``.png`` as MoNuSeg's does)."""
    import shutil

    from TextSegLib.io.images import lvit_folder

    (root / "img").mkdir(parents=True)
    (root / "labelcol").mkdir()
    rows = []
    for split, name in MONUSEG_TILES:
        item = next(i for i in lvit_folder(MONUSEG / split) if i.name == name)
        shutil.copy(item.image, root / "img" / item.image.name)
        shutil.copy(item.mask, root / "labelcol" / item.mask.name)
        rows.append(f"{name},{item.text}")
    (root / "text.csv").write_text("Image,Description\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root
