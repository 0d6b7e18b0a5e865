"""Named structures of the TotalSegmentator cases, the phrasings that name them, and manifests built from them.

A structure is trained under several phrasings ("the liver", "liver", "the patient's liver", ...) and never under
its held-out paraphrases ("liver parenchyma", "the hepatic organ"), which ``Training/prompt_effect.py`` uses to
ask whether a network generalises over wording. Label values differ between the CT (TotalSegmentator's ``total``
map) and the MR (``total_mr``), so they are read from each case's ``labels.csv`` by structure name.

    python Training/structures.py            # rewrites Training/manifests/{totalsegmentator,shipped}.csv
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CASES", "STRUCTURES", "Structure", "TsCase", "label_values", "write_manifest"]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MANIFESTS = Path(__file__).resolve().parent / "manifests"


@dataclass(frozen=True)
class Structure:
    """One structure: its name, the phrasings it is trained under, the held-out paraphrases it is tested under and
    (where a recipe chooses its checkpoint by wording too) validation paraphrases, neither trained nor tested."""

    name: str
    phrasings: tuple[str, ...]
    paraphrases: tuple[str, ...]
    validation: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """The structure's canonical prompt (its first phrasing)."""
        return self.phrasings[0]


def _organ(noun: str, *paraphrases: str, article: str = "the") -> Structure:
    return Structure(noun.replace(" ", "_"), (f"{article} {noun}", noun, f"the patient's {noun}",
                                             f"segment the {noun}"), paraphrases)


STRUCTURES: tuple[Structure, ...] = (
    _organ("liver", "liver parenchyma", "the hepatic organ"),
    _organ("spleen", "spleen tissue", "the splenic organ"),
    _organ("stomach", "the gastric organ", "stomach tissue"),
    _organ("aorta", "the aortic lumen", "the descending aorta"),
    _organ("inferior vena cava", "the vena cava", "the caval vein"),
    _organ("spinal cord", "spinal cord tissue", "the cord in the spinal canal"),
    _organ("colon", "the large bowel", "the large intestine"),
    Structure("autochthon_left", ("the left autochthonous back muscle", "left back muscle",
                                  "the patient's left paraspinal muscle", "segment the left back muscle"),
              ("the left erector spinae", "the deep back muscle on the left")),
    Structure("autochthon_right", ("the right autochthonous back muscle", "right back muscle",
                                   "the patient's right paraspinal muscle", "segment the right back muscle"),
              ("the right erector spinae", "the deep back muscle on the right")),
    Structure("kidney_left", ("the left kidney", "left kidney", "the patient's left kidney",
                              "segment the left kidney"), ("the left renal organ", "left kidney tissue")),
    Structure("kidney_right", ("the right kidney", "right kidney", "the patient's right kidney",
                               "segment the right kidney"), ("the right renal organ", "right kidney tissue")),
    _organ("gallbladder", "the gall bladder", "the biliary vesicle"),
)


@dataclass(frozen=True)
class TsCase:
    """A TotalSegmentator case: image (file or DICOM folder), label file and the ``labels.csv`` beside it."""

    case: str
    image: Path
    label: Path
    table: Path
    modality: str


CASES: dict[str, TsCase] = {
    "ct_a": TsCase("ct_a", DATA / "totalsegmentator" / "ct_a_image.nii.gz",
                   DATA / "totalsegmentator" / "ct_a_labels.nii.gz", DATA / "totalsegmentator" / "ct_a_labels.csv",
                   "CT"),
    "mr_a": TsCase("mr_a", DATA / "totalsegmentator" / "mr_a_image.nii.gz",
                   DATA / "totalsegmentator" / "mr_a_labels.nii.gz", DATA / "totalsegmentator" / "mr_a_labels.csv",
                   "MR"),
    "ct_b": TsCase("ct_b", DATA / "totalsegmentator" / "ct_b_dicom",
                   DATA / "totalsegmentator" / "ct_b_labels.nii.gz", DATA / "totalsegmentator" / "ct_b_labels.csv",
                   "CT"),
}


def label_values(table: Path) -> dict[str, int]:
    """``structure name -> label value`` from a ``value,structure,voxels`` table."""
    with open(table, newline="") as handle:
        return {row["structure"]: int(row["value"]) for row in csv.DictReader(handle)}


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def write_manifest(target: Path, cases: list[str | TsCase], structures: tuple[Structure, ...] = STRUCTURES,
                   all_phrasings: bool = True, lesions: Path | None = None, lesion_weight: int = 1) -> Path:
    """Write a manifest with one row per (case, structure present in it, phrasing); paths relative to ``target``.

    ``cases`` are names of :data:`CASES` or cases of their own (a converter's output).
    ``all_phrasings=False`` names each structure by its canonical prompt only. ``lesions``: a manifest (such as
    ``pyradiomics.csv``) whose rows are appended with their paths rewritten, each ``lesion_weight`` times: a row is
    one target, so a lesion written four times weighs as much in an epoch as a structure named by four phrasings.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in cases:
        case = CASES[entry] if isinstance(entry, str) else entry
        values = label_values(case.table)
        for structure in structures:
            if structure.name not in values:
                continue
            for text in structure.phrasings if all_phrasings else structure.phrasings[:1]:
                rows.append({"case": case.case, "image": _relative(case.image, target.parent),
                             "label": _relative(case.label, target.parent), "text": text,
                             "modality": case.modality, "label_value": str(values[structure.name])})
    if lesions is not None:
        with open(lesions, newline="") as handle:
            for row in csv.DictReader(handle):
                for key in ("image", "label"):
                    row[key] = _relative((lesions.parent / row[key]).resolve(), target.parent)
                rows.extend({**row, "label_value": ""} for _ in range(lesion_weight))
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "label", "text", "modality", "label_value"])
        writer.writeheader()
        writer.writerows(rows)
    return target


def main() -> int:
    write_manifest(MANIFESTS / "totalsegmentator.csv", ["ct_a", "mr_a"])
    write_manifest(MANIFESTS / "shipped.csv", ["ct_a", "mr_a"], lesions=MANIFESTS / "pyradiomics.csv",
                   lesion_weight=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
