"""2D images (PNG, TIFF, JPEG, BMP; grey or colour) and LViT's 2D dataset layout.

A 2D image is read channels first, ``(C, H, W)`` float32 with ``C = 1`` (grey) or ``3`` (colour; an alpha channel
is dropped): the network decides what it takes (:meth:`TextSegLib.engine.preprocessing.Preprocessing.prepare`), so
an RGB network sees the three colours and not their mean. Masks are read as ``(H, W)`` bool (any channel nonzero)
and written as 8-bit PNG with 0 and 255, as LViT's ``labelcol`` masks are.

LViT's layout (``Train_Folder``, ``Val_Folder``, ``Test_Folder`` of MoNuSeg, QaTa-COV19...): an image folder
(``img``), a mask folder (``labelcol``, masks named like their images) and a text table (``*_text.xlsx`` or CSV
with columns ``Image`` and ``Description``, optionally ``Patient``): one sentence per image. A table row's image
is matched by file name, else by base name (MoNuSeg's test table names ``.png`` files that are stored as ``.tif``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextSegLib.core.files import atomic_write
from TextSegLib.io.manifests import ManifestError
from TextSegLib.io.volumes import VolumeError

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "LvitItem",
    "is_image_2d",
    "lvit_folder",
    "lvit_items",
    "lvit_mask",
    "read_image_2d",
    "read_mask_2d",
    "read_text_table",
    "write_mask_2d",
]

IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def is_image_2d(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a 2D picture file (by its suffix) rather than a volume."""
    return Path(path).suffix.lower() in IMAGE_2D_SUFFIXES


def _read(path: Path):
    import SimpleITK as sitk

    if not path.is_file():
        raise VolumeError(f"File not found: {str(path)!r}.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeError(f"Cannot read {str(path)!r}: it is not a PNG, TIFF, JPEG or BMP image, or it is "
                          "damaged.") from error
    if image.GetDimension() != 2:
        raise VolumeError(f"{str(path)!r} is not a 2D image ({image.GetDimension()} dimensions); give a single "
                          "picture.")
    return sitk.GetArrayFromImage(image), image.GetNumberOfComponentsPerPixel()


def read_image_2d(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2D image as ``(C, H, W)`` float32: ``C = 1`` for grey, 3 for colour (RGB; alpha dropped)."""
    array, components = _read(Path(path))
    if components == 1:
        return array.astype(np.float32)[None]
    if components == 2:  # grey + alpha
        return array[..., :1].astype(np.float32).transpose(2, 0, 1)
    return np.ascontiguousarray(array[..., :3].astype(np.float32).transpose(2, 0, 1))


def read_mask_2d(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2D mask as ``(H, W)`` bool: pixels nonzero in any channel."""
    array, components = _read(Path(path))
    return array != 0 if components == 1 else (array != 0).any(axis=-1)


def lvit_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An ``(H0, W0)`` mask at ``size`` ``(H, W)`` as LViT's data loader makes it (``Load_Dataset.py``, which MMRDL's
    paper follows for training and testing): the 8-bit mask (0 and 255) resized bilinearly without antialiasing
    (OpenCV's ``INTER_LINEAR``; PyTorch's bilinear with ``align_corners=False`` gives the same pixels), then every
    pixel above 0 after rounding to 8 bits kept. A shrunk mask thus holds every pixel that a structure touches at
    all: on MoNuSeg's 1000 x 1000 tiles at 224 x 224 about an eighth more foreground than a majority rule.
    Returns ``(H, W)`` bool."""
    import torch
    import torch.nn.functional as F

    size = tuple(size)
    mask = np.asarray(mask) != 0
    if mask.shape == size:
        return mask
    scaled = torch.from_numpy(mask.astype(np.float32) * 255.0)[None, None]
    resized = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)[0, 0]
    return (resized > 0.5).numpy()


def write_mask_2d(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write an ``(H, W)`` mask as an 8-bit image (0 outside, 255 inside; PNG by the usual suffix), atomically."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray((np.asarray(mask) != 0).astype(np.uint8) * 255)
    atomic_write(path, lambda temporary: sitk.WriteImage(image, temporary))


def read_text_table(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a text table (XLSX or CSV) as dicts keyed by the lower-cased column names."""
    path = Path(path)
    if path.suffix.lower() in (".xlsx", ".xls"):
        try:
            import openpyxl
        except ImportError as error:
            raise ManifestError("Reading LViT's .xlsx text tables needs openpyxl: pip install openpyxl") from error
        sheet = openpyxl.load_workbook(path, read_only=True).active
        rows = list(sheet.iter_rows(values_only=True))
        if not rows:
            raise ManifestError(f"{path.name} is empty; it needs the columns Image and Description.")
        header = [str(h).strip().lower() for h in rows[0]]
        return [{h: "" if v is None else str(v) for h, v in zip(header, row, strict=False)} for row in rows[1:]]
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k.strip().lower(): (v or "") for k, v in row.items() if k} for row in csv.DictReader(handle)]


@dataclass(frozen=True)
class LvitItem:
    """One image of an LViT-layout folder: its files, its sentence and its patient (the image name without one)."""

    name: str
    image: Path
    mask: Path
    text: str
    patient: str


def _find(folder: Path, name: str) -> Path | None:
    exact = folder / name
    if exact.is_file():
        return exact
    stem = Path(name).stem
    same_stem = sorted(p for p in folder.glob(f"{stem}.*") if p.suffix.lower() in IMAGE_2D_SUFFIXES)
    return same_stem[0] if len(same_stem) == 1 else None


def lvit_items(images: Path, masks: Path, table: Path, mask_name: str = "{name}",
               names: Sequence[str] | None = None) -> list[LvitItem]:
    """The images a text table describes, with their masks (``mask_name`` from the image's table name:
    ``"{name}"``, ``"mask_{name}"``, ``"{stem}_mask.png"``); only ``names`` when given. Raises
    :class:`~TextSegLib.io.manifests.ManifestError` naming the table and the missing file or sentence."""
    items = []
    for row in read_text_table(table):
        name = row.get("image", "").strip()
        text = " ".join(row.get("description", row.get("text", "")).split())
        if not name or (names is not None and name not in names):
            continue
        if not text:
            raise ManifestError(f"{table.name}: image {name!r} has no description")
        image = _find(images, name)
        mask = _find(masks, mask_name.format(name=name, stem=Path(name).stem))
        for found, folder, what in ((image, images, name), (mask, masks, mask_name.format(name=name,
                                                                                            stem=Path(name).stem))):
            if found is None:
                raise ManifestError(f"{table.name}: {folder / what} does not exist (nor one file of that base name)")
        items.append(LvitItem(name, image, mask, text, row.get("patient", "").strip() or name))
    return items


def lvit_folder(folder: str | os.PathLike[str]) -> list[LvitItem]:
    """The items of one LViT split folder: ``img/``, ``labelcol/`` and its one text table (``*.xlsx`` or
    ``*.csv``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{str(folder)!r} is not a folder; give an LViT split folder (img/, labelcol/ and a text "
                            "table), e.g. MoNuSeg's Test_Folder.")
    tables = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".xlsx", ".csv")
                    and not p.name.startswith("~$"))
    missing = [name for name in ("img", "labelcol") if not (folder / name).is_dir()]
    if missing or len(tables) != 1:
        problem = f"has no {' or '.join(f'{m}/' for m in missing)} folder" if missing else \
            f"has {len(tables)} text tables (.xlsx or .csv), not one"
        raise ManifestError(f"{str(folder)!r} {problem}; an LViT split folder holds img/, labelcol/ and one text "
                            "table with the columns Image and Description.")
    items = lvit_items(folder / "img", folder / "labelcol", tables[0])
    if not items:
        raise ManifestError(f"{tables[0]} describes no image; it needs the columns Image and Description.")
    return items
