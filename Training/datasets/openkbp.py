"""OpenKBP's head-and-neck CTs as LPS volumes, label maps and TextSeg manifests.

    python -m Training.datasets openkbp --source open-kbp/provided-data --output data/openkbp

OpenKBP (the AAPM 2020 knowledge-based planning challenge; ``git clone https://github.com/ababier/open-kbp``, MIT
licence; Babier et al., "OpenKBP: The open-access knowledge-based planning grand challenge and dataset", Medical
Physics 48(9), 2021) holds 340 head-and-neck CTs with their clinical (manual) radiotherapy contours on a 128^3 grid,
in ``provided-data/{train,validation,test}-pats/pt_N/``: a sparse ``ct.csv``, one CSV of flat indices per structure
(a structure a patient lacks has no file) and ``voxel_dimensions.csv``. A patient without ``ct.csv`` is skipped.

**Intensities.** ``ct.csv`` lists ``flat index, value`` with value = HU + 1024, only for voxels whose value is above 0
(OpenKBP's ``sparse_vector_function`` keeps ``x > 0``). An unlisted voxel held 0 and is written as -1024 HU (air:
they lie outside the body). The CT is written as int16 HU.

**Geometry.** The flat index is C order on an ``(a, b, c)`` grid whose orientation is not stored. The centroids of
the contours of all 340 patients fix it:

* ``b`` increases towards the patient's left: the left parotid lies at larger ``b`` than the right one in all 326
  patients with both;
* ``c`` increases inferiorly: the brainstem lies at smaller ``c`` than the larynx (157 of 157 patients), the
  spinal cord (286 of 286) and the mandible (211 of 211);
* ``a`` increases posteriorly: the spinal cord lies at larger ``a`` than the larynx (150 of 150), the oesophagus
  (116 of 116) and the mandible (212 of 212);
* ``voxel_dimensions.csv`` holds the spacings of ``a``, ``b``, ``c`` in mm. The first two are equal in every patient
  (1.95 to 5.42 mm); the third (1.5 to 3.3 mm) is ``c``'s: with it the brainstem's centroid lies 115 mm above the
  larynx's on average and the distance varies less between patients (coefficient of variation 0.15) than with the
  in-plane spacing (201 mm, 0.21).

Volumes are written in LPS with an identity direction: ``i`` is ``b`` (towards the left), ``j`` is ``a``
(posterior), ``k`` is ``c`` reversed (superior), so ``k`` indexes axial slices. The origin is 0: the patient's
position is not stored.

**Label maps.** A structure has one label value in every file (:data:`LABEL_VALUES`: Brainstem 1 ... PTV70 10).
Organs go into ``organs.nrrd``, the planning target volumes into ``targets.nrrd``, and a structure that overlaps one
already in its family's map into the family's next map (``organs_2.nrrd``, ...), so every structure keeps exactly
its contour's voxels. Target volumes overlap organs in most patients, hence two families; organs overlap each other
in 179 of the 340 patients (a parotid and the mandible in 146, by a few voxels; the brainstem and the spinal cord at
their junction in 44), target volumes in two (by one or two voxels).

**Manifests** (:func:`write_manifests`): a case is one label map of one patient (``pt_1-organs``, with the CT as
its image); one row per (patient, structure present, phrasing of :data:`STRUCTURES`); the split is OpenKBP's own.
A structure a patient lacks has no row, as in ``Training/structures.py``.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TextSegLib.io.volumes import Volume, VolumeError, write_image
from Training.structures import Structure

__all__ = [
    "ABSENT_HELD_OUT",
    "ABSENT_LABEL_VALUE",
    "ABSENT_TRAINED",
    "LABEL_VALUES",
    "ORGANS",
    "SPLITS",
    "STRUCTURES",
    "TARGETS",
    "Contour",
    "Conversion",
    "Patient",
    "convert",
    "convert_patient",
    "grid_to_lps",
    "read_ct",
    "read_indices",
    "read_spacing",
    "write_manifests",
]

GRID = (128, 128, 128)
HU_OFFSET = 1024
AIR_HU = -1024

#: Split name -> OpenKBP's folder; the manifests' ``split`` column says ``val`` for validation.
SPLITS = {"train": "train-pats", "validation": "validation-pats", "test": "test-pats"}
SPLIT_COLUMN = {"train": "train", "validation": "val", "test": "test"}
#: Validation patients in ``recipe.csv``: each is validated on every slice of seven organs after every epoch.
RECIPE_VALIDATION_PATIENTS = 8
FIELDS = ("case", "image", "label", "text", "split", "modality", "label_value")


def _named(name: str, noun: str, *paraphrases: str, short: str | None = None, synonyms: Sequence[str] = (),
           validation: Sequence[str] = ()) -> Structure:
    """``name`` trained as "the NOUN", "SHORT" (default: NOUN), "the patient's NOUN", "segment the NOUN", then its
    ``synonyms``; tested under ``paraphrases``; checkpoints chosen on ``validation`` too."""
    return Structure(name, (f"the {noun}", short or noun, f"the patient's {noun}", f"segment the {noun}",
                            *synonyms), paraphrases, tuple(validation))


def _parotid(side: str, latin: str) -> Structure:
    """The ``side`` ("right" or "left") parotid gland; ``latin`` is the side in its Latin validation paraphrase."""
    return _named(f"{side.capitalize()}Parotid", f"{side} parotid gland", f"the {side} parotid salivary gland",
                  f"the parotid on the {side} side", short=f"{side} parotid",
                  synonyms=(f"parotid gland, {side}", f"{side} parotid contour", f"the {side} parotid organ at risk",
                            f"the parotid gland on the patient's {side}"),
                  validation=(f"glandula parotidea {latin}", f"{side} parotid outline"))


#: The organs. Each is trained under four forms of its name and four synonyms, chosen on two validation paraphrases
#: and tested under two held-out paraphrases. A synonym or validation paraphrase shares no word with the organ's
#: test paraphrases beyond the words of its name ("the parotid on the right side": "side" is in no other phrasing),
#: so the test still asks for wording the network never saw and was not chosen on.
ORGANS: tuple[Structure, ...] = (
    _named("Brainstem", "brainstem", "the brain stem", "the pons and medulla",
           synonyms=("the truncus encephali", "brainstem contour", "the brainstem organ at risk",
                     "the midbrain and hindbrain"),
           validation=("the encephalic trunk", "brainstem outline")),
    _named("SpinalCord", "spinal cord", "spinal cord tissue", "the cord in the spinal canal",
           synonyms=("the myelon", "spinal cord contour", "the spinal cord organ at risk", "the cervical spinal cord"),
           validation=("the cervical cord", "spinal cord outline")),
    _parotid("right", "dextra"),
    _parotid("left", "sinistra"),
    _named("Esophagus", "esophagus", "the oesophagus", "the gullet",
           synonyms=("the esophageal tube", "esophagus contour", "the esophagus organ at risk",
                     "the cervical esophagus"),
           validation=("the food pipe", "esophagus outline")),
    _named("Larynx", "larynx", "the voice box", "the laryngeal region",
           synonyms=("the glottis and supraglottis", "larynx contour", "the larynx organ at risk",
                     "the larynx with its cartilages"),
           validation=("the organ of phonation", "larynx outline")),
    _named("Mandible", "mandible", "the lower jaw", "the jawbone",
           synonyms=("the mandibular bone", "mandible contour", "the mandible organ at risk", "the mandibular arch"),
           validation=("the inferior maxillary bone", "mandible outline")),
)
TARGETS: tuple[Structure, ...] = tuple(
    _named(f"PTV{dose}", f"{dose} Gy planning target volume", f"the planning target volume prescribed {dose} Gy",
           f"the {level}-dose target", short=f"PTV{dose}")
    for dose, level in ((56, "low"), (63, "intermediate"), (70, "high"))
)
STRUCTURES: tuple[Structure, ...] = ORGANS + TARGETS
#: Structure name -> its value in every label map.
LABEL_VALUES: dict[str, int] = {structure.name: value for value, structure in enumerate(STRUCTURES, start=1)}
#: Organs no head-and-neck CT of OpenKBP holds (the scans end above the heart), asked on training patients with an
#: empty target so that a name the network was not taught in this anatomy is answered "not found" rather than drawn
#: on the nearest organ. Asked two a patient, rotating (``recipe_absent.csv``).
ABSENT_TRAINED: tuple[str, ...] = ("the stomach", "the pancreas", "the urinary bladder", "the colon",
                                   "the small intestine", "the prostate", "the uterus", "the adrenal gland")
#: Absent organs never trained on: the check of a candidate on the validation patients (``validation_absent.csv``)
#: and the report on the test patients (``test_absent.csv``). They share no word with :data:`ABSENT_TRAINED`.
ABSENT_HELD_OUT: tuple[str, ...] = ("the liver", "the left kidney", "the spleen", "the gallbladder")
#: The label value of an absent organ's rows: no label map holds it, so the target is empty on every slice.
ABSENT_LABEL_VALUE = len(STRUCTURES) + 1


@dataclass(frozen=True)
class Contour:
    """A structure of a converted patient: the label map holding it (value ``LABEL_VALUES[structure]``)."""

    structure: str
    label: Path


@dataclass(frozen=True)
class Patient:
    """A converted patient: its CT and its contours, in the order of :data:`STRUCTURES`."""

    name: str
    split: str
    image: Path
    contours: tuple[Contour, ...]


@dataclass
class Conversion:
    """What :func:`convert` did: converted patients, and per split the patients skipped (no ``ct.csv``)."""

    patients: list[Patient] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    missing_splits: list[str] = field(default_factory=list)

    def converted(self, split: str) -> list[Patient]:
        """The patients of ``split``."""
        return [patient for patient in self.patients if patient.split == split]


def _natural(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _load(path: Path, **layout) -> np.ndarray:
    """The rows of an OpenKBP CSV below its header line (``layout``: ``usecols``, ``dtype``, ``ndmin``)."""
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, **layout)
    except ValueError as error:
        raise VolumeError(f"{path} is not an OpenKBP sparse CSV ({error}); convert an unchanged copy of "
                          "open-kbp/provided-data.") from None


def _checked(indices: np.ndarray, path: Path) -> np.ndarray:
    if indices.size and (indices.min() < 0 or indices.max() >= np.prod(GRID)):
        raise VolumeError(f"{path} has voxel indices outside the 128^3 grid; convert an unchanged copy of "
                          "open-kbp/provided-data.")
    return indices


def read_indices(path: Path) -> np.ndarray:
    """The flat (C order, 128^3 grid) indices of a structure CSV: a header line, then ``index,`` per voxel."""
    return _checked(_load(path, usecols=0, dtype=np.int64, ndmin=1), path)


def read_ct(path: Path) -> np.ndarray:
    """``ct.csv`` as a 128^3 int16 HU array on OpenKBP's ``(a, b, c)`` grid; unlisted voxels are -1024 HU."""
    table = _load(path, usecols=(0, 1), dtype=float, ndmin=2)
    flat = np.full(int(np.prod(GRID)), AIR_HU, dtype=np.int16)
    flat[_checked(table[:, 0].astype(np.int64), path)] = np.clip(np.rint(table[:, 1]) - HU_OFFSET, -32768, 32767)
    return flat.reshape(GRID)


def read_spacing(path: Path) -> tuple[float, float, float]:
    """``voxel_dimensions.csv``: the spacings of OpenKBP's grid axes ``a``, ``b``, ``c`` in mm."""
    try:
        spacing = np.loadtxt(path, dtype=float, ndmin=1)
    except ValueError as error:
        raise VolumeError(f"{path} is not three voxel sizes in mm ({error}).") from None
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise VolumeError(f"{path} holds {spacing.tolist()}, not three positive voxel sizes in mm.")
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def grid_to_lps(grid: np.ndarray) -> np.ndarray:
    """An ``(a, b, c)`` grid array as the ``(K, J, I)`` array of an identity-direction LPS volume (module doc)."""
    return np.ascontiguousarray(np.flip(grid.transpose(2, 0, 1), axis=0))


def _label_maps(folder: Path, family: Sequence[Structure], stem: str) -> list[tuple[str, np.ndarray, list[str]]]:
    """The family's structures in as few label maps as keep each exactly: ``(file stem, flat map, structures)``."""
    maps: list[tuple[np.ndarray, list[str]]] = []
    for structure in family:
        path = folder / f"{structure.name}.csv"
        if not path.is_file():
            continue
        indices = read_indices(path)
        free = next((m for m in maps if not m[0][indices].any()), None)
        if free is None:
            free = (np.zeros(int(np.prod(GRID)), dtype=np.uint8), [])
            maps.append(free)
        free[0][indices] = LABEL_VALUES[structure.name]
        free[1].append(structure.name)
    return [(stem if number == 1 else f"{stem}_{number}", flat, names)
            for number, (flat, names) in enumerate(maps, start=1)]


def convert_patient(folder: Path, output: Path, split: str) -> Patient | None:
    """Write ``output/ct.nrrd`` and the label maps of the OpenKBP patient ``folder``; None without ``ct.csv``."""
    if not (folder / "ct.csv").is_file():
        return None
    spacing_a, spacing_b, spacing_c = read_spacing(folder / "voxel_dimensions.csv")
    ct = read_ct(folder / "ct.csv")
    volume = Volume(grid_to_lps(ct), (spacing_b, spacing_a, spacing_c), (0.0, 0.0, 0.0), np.eye(3), "CT",
                    str(folder))
    output.mkdir(parents=True, exist_ok=True)
    image = output / "ct.nrrd"
    write_image(image, volume.array, volume)
    contours = {}
    for family, stem in ((ORGANS, "organs"), (TARGETS, "targets")):
        for name, flat, names in _label_maps(folder, family, stem):
            label = output / f"{name}.nrrd"
            write_image(label, grid_to_lps(flat.reshape(GRID)), volume)
            contours.update({structure: Contour(structure, label) for structure in names})
    order = [structure.name for structure in STRUCTURES]
    return Patient(folder.name, split, image, tuple(sorted(contours.values(), key=lambda c: order.index(c.structure))))


def convert(source: Path, output: Path, splits: Iterable[str] = tuple(SPLITS), limit: int | None = None) -> Conversion:
    """Convert OpenKBP's ``provided-data`` folder ``source`` into ``output/<split>/pt_N/``.

    ``limit``: the first that many patients of each split (by number). A split whose folder ``source`` lacks is
    listed in ``missing_splits``; none at all is an error.
    """
    splits = list(splits)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise VolumeError(f"Unknown split(s) {unknown}; choose from {list(SPLITS)}.")
    conversion = Conversion()
    for split in splits:
        folder = source / SPLITS[split]
        if not folder.is_dir():
            conversion.missing_splits.append(split)
            continue
        patients = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("pt_")),
                          key=lambda p: _natural(p.name))
        conversion.skipped[split] = []
        for patient_folder in patients[:limit]:
            patient = convert_patient(patient_folder, output / split / patient_folder.name, split)
            if patient is None:
                conversion.skipped[split].append(patient_folder.name)
            else:
                conversion.patients.append(patient)
    if len(conversion.missing_splits) == len(splits):
        raise VolumeError(f"{source} has none of the folders {', '.join(SPLITS[s] for s in splits)}; give the "
                          "provided-data folder of a clone of https://github.com/ababier/open-kbp.")
    return conversion


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _row(patient: Patient, contour: Contour, text: str, split: str, folder: Path) -> dict[str, str]:
    """The manifest row asking for ``contour`` of ``patient`` by ``text``, paths relative to ``folder``."""
    return {"case": f"{patient.name}-{contour.label.name.split('.')[0]}", "image": _relative(patient.image, folder),
            "label": _relative(contour.label, folder), "text": text, "split": split, "modality": "CT",
            "label_value": str(LABEL_VALUES[contour.structure])}


def _rows(patients: Iterable[Patient], folder: Path, paraphrases: bool = False) -> list[dict[str, str]]:
    """One row per (patient, contour, phrasing), or per held-out paraphrase with ``paraphrases``."""
    by_name = {structure.name: structure for structure in STRUCTURES}
    rows = []
    for patient in patients:
        for contour in patient.contours:
            structure = by_name[contour.structure]
            rows.extend(_row(patient, contour, text, SPLIT_COLUMN[patient.split], folder)
                        for text in (structure.paraphrases if paraphrases else structure.phrasings))
    return rows


def _absent_row(patient: Patient, text: str, split: str, folder: Path) -> dict[str, str]:
    """The manifest row asking ``patient``'s CT for an organ it does not hold (:data:`ABSENT_LABEL_VALUE`)."""
    organs = next(contour.label for contour in patient.contours if contour.label.name == "organs.nrrd")
    return {"case": f"{patient.name}-organs", "image": _relative(patient.image, folder),
            "label": _relative(organs, folder), "text": text, "split": split, "modality": "CT",
            "label_value": str(ABSENT_LABEL_VALUE)}


def _absent_rows(patients: Sequence[Patient], folder: Path, split: str) -> list[dict[str, str]]:
    """For ``split`` "train": two of :data:`ABSENT_TRAINED` per training patient, rotating over the patients; for
    "validation" or "test": every :data:`ABSENT_HELD_OUT` organ on every patient of that split. Patients without an
    organ label map (no organ contoured) are left out."""
    members = [patient for patient in patients if patient.split == split
               and any(contour.label.name == "organs.nrrd" for contour in patient.contours)]
    rows = []
    for number, patient in enumerate(members):
        if split == "train":
            texts = tuple(ABSENT_TRAINED[(2 * number + i) % len(ABSENT_TRAINED)] for i in range(2))
        else:
            texts = ABSENT_HELD_OUT
        rows.extend(_absent_row(patient, text, SPLIT_COLUMN[split], folder) for text in texts)
    return rows


def _recipe_rows(patients: Sequence[Patient], folder: Path, validation_patients: int) -> list[dict[str, str]]:
    """The organs only: each training patient names each organ once, rotating through the trained phrasings (so
    every phrasing is seen on an eighth of the patients and an epoch is not eight copies of each slice); each
    validation patient (the first ``validation_patients``) names each organ twice, as "the NOUN" and by one of its
    validation paraphrases (alternating between patients), so the per-epoch choice weighs wording as much as
    anatomy."""
    by_name = {structure.name: structure for structure in ORGANS}
    validation = [patient for patient in patients if patient.split == "validation"][:validation_patients]
    training = [patient for patient in patients if patient.split == "train"]
    rows = []
    for number, patient in enumerate(training + validation):
        for contour in patient.contours:
            structure = by_name.get(contour.structure)
            if structure is None:
                continue
            if patient.split == "validation":
                texts = (structure.phrasings[0], structure.validation[number % len(structure.validation)])
            else:
                texts = (structure.phrasings[(number + ORGANS.index(structure)) % len(structure.phrasings)],)
            rows.extend(_row(patient, contour, text, SPLIT_COLUMN[patient.split], folder) for text in texts)
    return rows


#: The prompt-effect manifest asks for another organ than the one labelled: left and right parotid swapped, and
#: each other organ asked as a neighbour (the brainstem and the spinal cord meet; so do the larynx and esophagus).
SWAPPED = {"LeftParotid": "RightParotid", "RightParotid": "LeftParotid", "Brainstem": "SpinalCord",
           "SpinalCord": "Brainstem", "Esophagus": "Larynx", "Larynx": "Esophagus", "Mandible": "Larynx"}


def _test_rows(patients: Sequence[Patient], folder: Path, ask: str) -> list[dict[str, str]]:
    """The test patients' organs, each asked once: by its own name ("the NOUN", ``ask="right"``), by the name of
    :data:`SWAPPED`'s organ (``"swapped"``), or by one of its held-out paraphrases, alternating between patients
    (``"paraphrase"``)."""
    by_name = {structure.name: structure for structure in ORGANS}
    rows = []
    for number, patient in enumerate(p for p in patients if p.split == "test"):
        for contour in patient.contours:
            structure = by_name.get(contour.structure)
            if structure is None:
                continue
            text = {"right": structure.phrasings[0], "swapped": by_name[SWAPPED[structure.name]].phrasings[0],
                    "paraphrase": structure.paraphrases[number % len(structure.paraphrases)]}[ask]
            rows.append(_row(patient, contour, text, "test", folder))
    return rows


def _validation_rows(patients: Sequence[Patient], folder: Path, validation_patients: int) -> list[dict[str, str]]:
    """The recipe's validation patients' organs, each asked by its name and by each of its validation paraphrases:
    the 3D check of a candidate's wording before it is chosen."""
    by_name = {structure.name: structure for structure in ORGANS}
    rows = []
    for patient in [patient for patient in patients if patient.split == "validation"][:validation_patients]:
        for contour in patient.contours:
            structure = by_name.get(contour.structure)
            if structure is None:
                continue
            rows.extend(_row(patient, contour, text, "val", folder)
                        for text in (structure.phrasings[0], *structure.validation))
    return rows


def _write(path: Path, rows: list[dict[str, str]]) -> tuple[Path, int]:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path, len(rows)


def write_manifests(output: Path, patients: Sequence[Patient]) -> dict[str, tuple[Path, int]]:
    """Write the manifests of ``patients`` into ``output``; returns ``name -> (path, rows)``.

    * ``train.csv``, ``validation.csv``, ``test.csv``: one per split present, each holding only its split's patients;
    * ``trainval.csv``: the train and validation rows together, the manifest to train on (its ``split`` column
      keeps OpenKBP's validation patients for validation);
    * ``recipe.csv``: what the head-and-neck recipes train on: the organs of the training patients, one rotating
      phrasing each, and of the first :data:`RECIPE_VALIDATION_PATIENTS` validation patients, by name and by a
      validation paraphrase, for the per-epoch choice;
    * ``recipe_absent.csv``: ``recipe.csv`` and two organs of :data:`ABSENT_TRAINED` per training patient, with
      empty targets;
    * ``validation_organs.csv``: those validation patients' organs asked by name and by both validation
      paraphrases, for ``textseg evaluate --manifest`` before a candidate is chosen;
    * ``validation_absent.csv``, ``test_absent.csv``: every validation (test) patient asked for the organs of
      :data:`ABSENT_HELD_OUT`, with empty references (Dice 1 for "not found", 0 for anything drawn);
    * ``test_paraphrases.csv``: the test patients' structures named by their held-out paraphrases only (never in a
      training manifest);
    * ``test_organs_right.csv``, ``test_organs_swapped.csv``, ``test_organs_paraphrase.csv``: the test patients'
      organs asked once each by their own name, by another organ's (:data:`SWAPPED`) and by a held-out paraphrase,
      for the evaluation and the prompt-effect table (``textseg evaluate --manifest``).
    """
    output.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        members = [patient for patient in patients if patient.split == split]
        if members:
            written[split] = _write(output / f"{split}.csv", _rows(members, output))
    development = [patient for patient in patients if patient.split in ("train", "validation")]
    if development:
        written["trainval"] = _write(output / "trainval.csv", _rows(development, output))
    if any(patient.split == "train" for patient in patients):
        recipe = _recipe_rows(patients, output, RECIPE_VALIDATION_PATIENTS)
        written["recipe"] = _write(output / "recipe.csv", recipe)
        written["recipe_absent"] = _write(output / "recipe_absent.csv",
                                          recipe + _absent_rows(patients, output, "train"))
    if any(patient.split == "validation" for patient in patients):
        written["validation_organs"] = _write(output / "validation_organs.csv",
                                              _validation_rows(patients, output, RECIPE_VALIDATION_PATIENTS))
        written["validation_absent"] = _write(output / "validation_absent.csv",
                                              _absent_rows(patients, output, "validation"))
    held_out = [patient for patient in patients if patient.split == "test"]
    if held_out:
        written["test_paraphrases"] = _write(output / "test_paraphrases.csv", _rows(held_out, output, True))
        for ask in ("right", "swapped", "paraphrase"):
            written[f"test_organs_{ask}"] = _write(output / f"test_organs_{ask}.csv",
                                                   _test_rows(held_out, output, ask))
        written["test_absent"] = _write(output / "test_absent.csv", _absent_rows(patients, output, "test"))
    return written
