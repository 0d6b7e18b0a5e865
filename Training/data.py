"""Training data: 3D volumes sliced on the fly, LViT's 2D layout, augmentation and the text table.

Slices are prepared by :meth:`TextSegLib.engine.preprocessing.Preprocessing.prepare`, the function the inference engine
uses, after the same canonical reorientation (:class:`TextSegLib.io.volumes.CanonicalTransform`): a network sees at
training time exactly what it will see in ``textseg segment``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from TextSegLib.engine.preprocessing import IntensityMapping, IntensitySpec, Preprocessing
from TextSegLib.io.images import lvit_items, lvit_mask, read_image_2d, read_mask_2d
from TextSegLib.io.manifests import ManifestCase, ManifestError
from TextSegLib.io.volumes import CanonicalTransform, guess_modality, read_volume
from TextSegLib.text.features import TextEncoder, TextFeatures

__all__ = ["MASK_RULES", "Lvit2DDataset", "SliceDataset", "SliceItem", "TextTable", "augment", "intensity_of",
           "resize_mask"]


@dataclass(frozen=True)
class SliceItem:
    """One training sample: a canonical slice of a case, the target's label value and its text."""

    case: int
    slice: int
    label_value: int | None
    text: str
    has_lesion: bool


#: How a mask is brought to the network's input size: "majority" (TextSeg's: resampled like the image, then halved)
#: or "lvit" (LViT's data loader: every pixel the structure touches; :func:`TextSegLib.io.images.lvit_mask`).
MASK_RULES = ("majority", "lvit")


def resize_mask(mask: torch.Tensor, size: tuple[int, int], rule: str = "majority") -> torch.Tensor:
    """Binary ``(..., H0, W0)`` mask to ``(..., H, W)`` float {0, 1} by ``rule`` (one of :data:`MASK_RULES`)."""
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}: use one of {', '.join(MASK_RULES)}")
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    shape = mask.shape
    if rule == "lvit":
        flat = mask.reshape(-1, *shape[-2:]).numpy()
        resized = np.stack([lvit_mask(plane, size) for plane in flat])
        return torch.from_numpy(resized).float().reshape(*shape[:-2], *size)
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    shrinking = flat.shape[-2] > size[0] or flat.shape[-1] > size[1]
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return (out >= 0.5).float().reshape(*shape[:-2], *size)


def intensity_of(preprocessing: Preprocessing, modality: str, case: str) -> IntensitySpec:
    """The intensity normalisation a training case of ``modality`` gets; never another modality's.

    Raises ``ValueError`` naming the case and the modality when the preprocessing has no entry for it: applying
    one modality's normalisation to another (a CT window to MR, say) would silently saturate the images.
    """
    for key, spec in preprocessing.intensity.items():
        if key.upper() == modality.upper():
            return spec
    raise ValueError(f"case {case!r} is {modality}, but the preprocessing has no intensity entry for {modality} "
                     f"(only {', '.join(preprocessing.intensity)}). Add one, e.g. data.preprocessing.intensity."
                     f"{modality} = {{ kind = \"percentile\", low = 0.5, high = 99.5 }}, or leave {modality} cases "
                     "out of the manifest.")


class _CaseVolume:
    """A case's image and label in canonical orientation, with its intensity mapping (loaded lazily)."""

    def __init__(self, case: ManifestCase, orientation: str, preprocessing: Preprocessing) -> None:
        if case.label is None:
            raise ManifestError(f"case {case.case!r} has no label; training needs one")
        label = read_volume(case.label)
        self.case = case
        self.orientation = orientation
        self.preprocessing = preprocessing
        self.transform = CanonicalTransform.create(label.direction, orientation)
        self.label = np.ascontiguousarray(self.transform.forward(label.array))
        self.file_shape = label.array.shape
        self._image: np.ndarray | None = None
        self._mapping: IntensityMapping | None = None

    def image(self) -> tuple[np.ndarray, IntensityMapping]:
        if self._image is None:
            volume = read_volume(self.case.image, modality=self.case.modality)
            if volume.array.shape != self.file_shape:
                raise ManifestError(f"case {self.case.case!r}: image {volume.array.shape} and label "
                                    f"{self.file_shape} are on different grids")
            canonical = self.transform.forward(volume.array)
            modality = volume.modality or guess_modality(canonical)
            self._mapping = intensity_of(self.preprocessing, modality, self.case.case).mapping(canonical)
            self._image = canonical
        return self._image, self._mapping

    def canonical_slice(self, file_slice: int) -> int:
        """Canonical slice index of the file's k index (per-slice texts are given in file indices)."""
        if self.transform.source_axes[2] != 2:
            raise ManifestError(f"case {self.case.case!r}: per-slice texts need slices along the file's k axis")
        return self.file_shape[0] - 1 - file_slice if self.transform.flips[2] else file_slice


class SliceDataset(Dataset):
    """2D samples from 3D cases: every target of every case, slice by slice.

    Args:
        cases: manifest cases (one patient each).
        preprocessing: the network's preprocessing (as stored in its checkpoint).
        orientation: canonical orientation code.
        slices: ``"all"`` slices, or only those where the target is present (``"lesion"``).
        empty_fraction: with ``"all"``, the share of target-free slices kept (chosen once, seeded).
        seed: for that choice.
        min_content: drop target-free slices of which less than this share is visible in the network's input
            (brighter than 1 % of the normalised volume's range above its minimum): the blank slices above and
            below the anatomy that FreqMedCLIP's paper filters as "uninformative". Slices with the target are kept.

    Items: ``{"image": (C, H, W) float32, "target": (1, H, W) float32, "text": str, "case": str, "slice": int}``.
    """

    def __init__(self, cases: Sequence[ManifestCase], preprocessing: Preprocessing, orientation: str = "LPS",
                 slices: str = "all", empty_fraction: float = 1.0, seed: int = 0, min_content: float = 0.0) -> None:
        if slices not in ("all", "lesion"):
            raise ValueError(f"slices must be 'all' or 'lesion', got {slices!r}")
        if not 0.0 <= min_content <= 1.0:
            raise ValueError(f"min_content is a share of a slice's pixels (0 to 1), got {min_content}")
        self.cases = list(cases)
        self.preprocessing = preprocessing
        for case in self.cases:  # declared modalities are checked before anything is read; guessed ones on reading
            if case.modality:
                intensity_of(preprocessing, case.modality, case.case)
        self.volumes = [_CaseVolume(case, orientation, preprocessing) for case in self.cases]
        chooser = random.Random(seed)
        self.items: list[SliceItem] = []
        for index, (case, volume) in enumerate(zip(self.cases, self.volumes, strict=True)):
            per_slice = {(value, volume.canonical_slice(k)): text for (value, k), text in case.slice_texts().items()}
            informative = self._content(volume) >= min_content if min_content > 0 else \
                np.ones(volume.label.shape[0], bool)
            for target in case.case_targets:
                mask = volume.label != 0 if target.label_value is None else volume.label == target.label_value
                present = mask.reshape(mask.shape[0], -1).any(axis=1)
                for c in range(mask.shape[0]):
                    if not present[c] and (slices == "lesion" or chooser.random() >= empty_fraction
                                           or not informative[c]):
                        continue
                    text = per_slice.get((target.label_value, c), target.text)
                    self.items.append(SliceItem(index, c, target.label_value, text, bool(present[c])))

    @staticmethod
    def _content(volume: _CaseVolume) -> np.ndarray:
        """Share of each canonical slice's pixels visible in the network's input: ``(K,)``."""
        image, mapping = volume.image()
        normalised = mapping.apply(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)))
        low, high = float(normalised.min()), float(normalised.max())
        visible = normalised > low + 0.01 * (high - low)
        return visible.reshape(visible.shape[0], -1).float().mean(dim=1).numpy()

    def __len__(self) -> int:
        return len(self.items)

    def case_items(self, case: int) -> list[int]:
        """Indices of a case's items, in slice order (validation runs case by case)."""
        return [i for i, item in enumerate(self.items) if item.case == case]

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        volume = self.volumes[item.case]
        image, mapping = volume.image()
        raw = torch.from_numpy(np.ascontiguousarray(image[item.slice], dtype=np.float32))
        x = self.preprocessing.prepare(raw[None], mapping)[0]
        label = volume.label[item.slice]
        mask = label != 0 if item.label_value is None else label == item.label_value
        target = resize_mask(torch.from_numpy(mask)[None], self.preprocessing.size)
        return {"image": x.contiguous(), "target": target, "text": item.text, "case": self.cases[item.case].case,
                "slice": item.slice}


class Lvit2DDataset(Dataset):
    """LViT's 2D layout: an image folder, a mask folder and a text table (CSV or XLSX with columns ``Image`` and
    ``Description``, optionally ``Patient``; see :mod:`TextSegLib.io.images`). The preprocessing must have exactly
    one intensity entry, which every image gets (the layout names no modality, so none is picked on a guess).

    Images are read with SimpleITK (PNG, JPEG, BMP, TIFF) channels first and prepared as inference prepares them
    (:meth:`Preprocessing.prepare`): an RGB image reaches an RGB network (MMRDL, like LViT, takes 3 channels) as
    its three colours, a one-channel network as their mean. Masks are found by ``mask_name`` (``"{name}"``: same
    file name, ``"mask_{name}"`` as in QaTa-COV19, ``"{stem}_mask.png"``...), else by base name, and brought to the
    input size by ``mask_rule`` (:data:`MASK_RULES`). Items as :class:`SliceDataset`; ``case`` is the patient
    column or the image name.
    """

    def __init__(self, images: Path, masks: Path, table: Path, preprocessing: Preprocessing,
                 mask_name: str = "{name}", names: Sequence[str] | None = None, mask_rule: str = "majority") -> None:
        if mask_rule not in MASK_RULES:
            raise ValueError(f"data.lvit_mask_rule is {mask_rule!r}: use one of {', '.join(MASK_RULES)}")
        self.preprocessing = preprocessing
        self.mask_rule = mask_rule
        if len(preprocessing.intensity) != 1:
            raise ValueError(
                "LViT's 2D layout says nothing of modality, so the preprocessing must have exactly one intensity entry "
                f"for its images (it has {', '.join(preprocessing.intensity)}). Set data.preprocessing, e.g. "
                "{ size = [224, 224], intensity = { PNG = { kind = \"window\", low = 0.0, high = 255.0 } } } for "
                "8-bit images.")
        self.spec = next(iter(preprocessing.intensity.values()))
        self.rows = [(item.image, item.mask, item.text, item.patient)
                     for item in lvit_items(images, masks, table, mask_name, names)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        image_path, mask_path, text, patient = self.rows[index]
        array = read_image_2d(image_path)
        x = self.preprocessing.prepare(torch.from_numpy(array)[None], self.spec.mapping(array))[0]
        target = resize_mask(torch.from_numpy(read_mask_2d(mask_path))[None], self.preprocessing.size, self.mask_rule)
        return {"image": x.contiguous(), "target": target, "text": text, "case": patient, "slice": 0}


def augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
            scale: tuple[float, float] | None, rotate_degrees: float, intensity_shift: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scaling (zoom), rotation and intensity shift of a batch, image and target alike.

    Shapes: images ``(B, C, H, W)``, targets ``(B, 1, H, W)`` -> the same. Random numbers come from ``generator``
    (CPU) so a resumed run repeats them. No flips: they would swap left and right, which prompts name.
    """
    batch = images.shape[0]
    if scale is None and not rotate_degrees and not intensity_shift:
        return images, targets
    draws = torch.rand(batch, 3, generator=generator)
    if scale is not None or rotate_degrees:
        low, high = scale if scale is not None else (1.0, 1.0)
        zoom = low + (high - low) * draws[:, 0]
        angle = torch.deg2rad((2 * draws[:, 1] - 1) * rotate_degrees)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / zoom
        theta[:, 0, 1] = -torch.sin(angle) / zoom
        theta[:, 1, 0] = torch.sin(angle) / zoom
        theta[:, 1, 1] = torch.cos(angle) / zoom
        grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        targets = (F.grid_sample(targets, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5)
        targets = targets.to(images.dtype)
    if intensity_shift:
        shift = ((2 * draws[:, 2] - 1) * intensity_shift).to(images.device, images.dtype)
        images = images + shift[:, None, None, None]
    return images, targets


def perturb_text(text: TextFeatures, generator: torch.Generator, scale: float) -> TextFeatures:
    """Text features with Gaussian noise: every pooled and every token vector ``v`` gets ``scale * |v| * n /
    sqrt(D)`` with ``n ~ N(0, I)``, a perturbation about ``scale`` times as long as ``v`` (cosine to ``v`` about
    ``1 / sqrt(1 + scale^2)``), drawn afresh on every call from ``generator`` (CPU) so a resumed run repeats it.

    A frozen encoder places a held-out paraphrase near, not on, the phrasings a network was trained under; trained on
    a few phrasings alone a network can answer only those points and nothing near them. Noise makes it answer the
    neighbourhood of each phrasing as the phrasing itself. Shapes: tokens ``(B, L, D)``, mask ``(B, L)``, pooled
    ``(B, P)`` -> the same; padding tokens stay as they were.
    """
    if scale < 0:
        raise ValueError(f"augment.text_noise is a share of each feature's length (0 or more), got {scale}")
    if scale == 0:
        return text

    def noisy(values: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(values.shape, generator=generator).to(values.device, values.dtype)
        length = values.norm(dim=-1, keepdim=True)
        return values + noise * (scale * length / values.shape[-1] ** 0.5)

    tokens = torch.where(text.mask[..., None], noisy(text.tokens), text.tokens)
    return TextFeatures(tokens, text.mask, noisy(text.pooled))


class TextTable:
    """Every distinct training text encoded once by the frozen encoder, handed out per batch."""

    def __init__(self, encoder: TextEncoder, texts: Sequence[str], chunk: int = 64) -> None:
        self.encoder = encoder
        unique = sorted(set(texts))
        self.features: dict[str, TextFeatures] = {}
        for start in range(0, len(unique), chunk):
            part = unique[start : start + chunk]
            encoded = encoder.encode(part)
            for row, text in enumerate(part):
                length = int(encoded.mask[row].sum())
                self.features[text] = TextFeatures(encoded.tokens[row : row + 1, :length].cpu(),
                                                   encoded.mask[row : row + 1, :length].cpu(),
                                                   encoded.pooled[row : row + 1].cpu())

    def batch(self, texts: Sequence[str], device: torch.device) -> TextFeatures:
        """Features of a batch's texts, padded to the longest (padding masked)."""
        missing = [t for t in texts if t not in self.features]
        if missing:
            raise KeyError(f"text not in the table: {missing[0]!r}")
        return TextFeatures.stack([self.features[t] for t in texts]).to(device)
