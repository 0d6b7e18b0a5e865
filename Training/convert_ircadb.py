"""Convert 3D-IRCADb (3Dircadb1.N folders) into NRRD volumes and a TextSeg manifest.

    python Training/convert_ircadb.py /data/3Dircadb1 --output data/ircadb [--per-lesion]

Each ``3Dircadb1.N`` folder holds ``PATIENT_DICOM/`` (the CT) and ``MASKS_DICOM/<structure>/`` (one binary DICOM
series per structure, file names matching the CT's); either may still be a ``.zip``. The converter writes
``<patient>_image.nrrd`` and ``<patient>_label.nrrd`` (every ``livertumor*`` mask merged into label 1, or numbered
1, 2, ... with ``--per-lesion``), then

* ``manifest.csv``: one row per patient (or per lesion), with an empty ``text`` column to fill in with the
  lesion-specific description before training;
* ``slices.csv``: every slice with and without lesion (``has_lesion``) and an empty ``text`` column for
  slice-by-slice annotation (copy filled rows into the manifest with their ``slice`` index to use them).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TextSegLib.io.volumes import Volume, VolumeError, write_image

LESION = re.compile(r"^livertumou?rs?\d*$", re.IGNORECASE)


def _folder(parent: Path, name: str, scratch: Path) -> Path:
    """``parent/name``, extracting ``parent/name.zip`` into ``scratch`` when only the archive is there."""
    folder = parent / name
    if folder.is_dir():
        return folder
    archive = parent / f"{name}.zip"
    if archive.is_file():
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(scratch / parent.name)
        found = [p for p in (scratch / parent.name).rglob(name) if p.is_dir()]
        if found:
            return found[0]
    raise VolumeError(f"{parent} has no {name} folder (or {name}.zip); is it a 3Dircadb1.N folder?")


def _read_series(folder: Path):
    """The CT series (sorted by position) and its file names in that order."""
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(f"No DICOM series in {folder}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute(), [Path(f).name for f in files]


def _read_mask(folder: Path, names: list[str]) -> np.ndarray:
    """A structure's mask, read file by file in the CT's slice order, as a (K, J, I) bool array."""
    import SimpleITK as sitk

    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise VolumeError(f"{folder} lacks {len(missing)} of the CT's slices (e.g. {missing[0]})")
    image = sitk.ReadImage([str(folder / n) for n in names])
    return sitk.GetArrayFromImage(image).reshape(len(names), *image.GetSize()[1::-1]) != 0


def convert_patient(folder: Path, output: Path, per_lesion: bool, scratch: Path) -> dict:
    """Convert one ``3Dircadb1.N`` folder; returns its manifest information."""
    ct, names = _read_series(_folder(folder, "PATIENT_DICOM", scratch))
    volume = Volume.from_sitk(ct, source=str(folder), modality="CT")
    masks_root = _folder(folder, "MASKS_DICOM", scratch)
    lesions = sorted((p for p in masks_root.iterdir() if p.is_dir() and LESION.match(p.name)), key=lambda p: p.name)
    label = np.zeros(volume.array.shape, dtype=np.uint8)
    values = []
    for number, lesion in enumerate(lesions, start=1):
        value = number if per_lesion else 1
        label[_read_mask(lesion, names)] = value
        values.append((value, lesion.name))
    patient = folder.name.replace("3Dircadb", "ircadb").replace(".", "_")
    image_path, label_path = output / f"{patient}_image.nrrd", output / f"{patient}_label.nrrd"
    write_image(image_path, volume.array, volume)
    write_image(label_path, label, volume)
    present = label.reshape(label.shape[0], -1).any(axis=1)
    return {"case": patient, "image": image_path.name, "label": label_path.name, "lesions": values,
            "has_lesion": present.tolist()}


def convert(root: Path, output: Path, per_lesion: bool = False) -> list[dict]:
    """Convert every ``3Dircadb1.*`` folder under ``root`` and write ``manifest.csv`` and ``slices.csv``."""
    patients = sorted((p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("3dircadb")),
                      key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not patients:
        raise VolumeError(f"No 3Dircadb1.N folders in {root}")
    output.mkdir(parents=True, exist_ok=True)
    converted = []
    with tempfile.TemporaryDirectory() as scratch:
        for folder in patients:
            converted.append(convert_patient(folder, output, per_lesion, Path(scratch)))
            print(f"{folder.name}: {len(converted[-1]['lesions'])} lesion mask(s), "
                  f"{sum(converted[-1]['has_lesion'])} of {len(converted[-1]['has_lesion'])} slices with lesion")
    with open(output / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "image", "label", "text", "modality", "label_value"])
        for patient in converted:
            if per_lesion:
                for value, _ in patient["lesions"]:
                    writer.writerow([patient["case"], patient["image"], patient["label"], "", "CT", value])
            else:
                writer.writerow([patient["case"], patient["image"], patient["label"], "", "CT", ""])
    with open(output / "slices.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "slice", "has_lesion", "text"])
        for patient in converted:
            for index, present in enumerate(patient["has_lesion"]):
                writer.writerow([patient["case"], index, int(present), ""])
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder holding the 3Dircadb1.N folders")
    parser.add_argument("--output", required=True, help="folder for the NRRD files and the manifest")
    parser.add_argument("--per-lesion", action="store_true", help="number lesions 1, 2, ... (one text each)")
    args = parser.parse_args(argv)
    try:
        converted = convert(Path(args.root), Path(args.output), args.per_lesion)
    except VolumeError as error:
        print(f"convert_ircadb: error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {len(converted)} patient(s) into {args.output}. Fill in the text column of manifest.csv "
          "(and, for slice-by-slice text, slices.csv) before training.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
