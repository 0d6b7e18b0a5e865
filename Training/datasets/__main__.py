"""Convert a public data set into volumes, label maps and TextSeg manifests.

    python -m Training.datasets openkbp --source open-kbp/provided-data --output data/openkbp [--splits test --limit 2]
    python -m Training.datasets totalsegmentator --source TotalSegmentator --output data/totalsegmentator-full
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from TextSegLib.io.volumes import VolumeError
from Training.datasets import totalsegmentator
from Training.datasets.openkbp import SPLITS, STRUCTURES, Conversion, convert, write_manifests

PROGRAM = "python -m Training.datasets"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of patients of at least 1, got {text!r}")
    return value


def report(conversion: Conversion, manifests: dict[str, tuple[Path, int]]) -> str:
    """The counts of a conversion: patients converted and skipped per split, structures per split, manifests."""
    splits = [split for split in SPLITS if split in conversion.skipped]
    lines = []
    for split in SPLITS:
        if split in conversion.missing_splits:
            lines.append(f"{split}: no {SPLITS[split]} folder in the source, not converted")
        elif split in conversion.skipped:
            skipped = conversion.skipped[split]
            lines.append(f"{split}: {len(conversion.converted(split))} patients converted, {len(skipped)} skipped "
                         f"(no ct.csv){': ' + ', '.join(skipped) if skipped else ''}")
    lines.append("patients with each structure: " + " / ".join(splits))
    for structure in STRUCTURES:
        counts = [sum(any(c.structure == structure.name for c in patient.contours)
                      for patient in conversion.converted(split)) for split in splits]
        lines.append(f"  {structure.name:<13}" + " / ".join(str(count) for count in counts))
    lines.extend(f"manifest {name}: {path} ({rows} rows)" for name, (path, rows) in manifests.items())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 when the data set was converted, 1 (the reason on stderr) when it could not be."""
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0])
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    openkbp = datasets.add_parser("openkbp", help="OpenKBP head-and-neck CTs (git clone "
                                  "https://github.com/ababier/open-kbp)", description="Convert OpenKBP's patients "
                                  "into LPS NRRD volumes, label maps and one manifest per split (see "
                                  "Training/datasets/openkbp.py).")
    openkbp.add_argument("--source", required=True, type=Path, help="the provided-data folder of an open-kbp clone")
    openkbp.add_argument("--output", required=True, type=Path, help="folder for the volumes and the manifests")
    openkbp.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS),
                         help="splits to convert (default: all three)")
    openkbp.add_argument("--limit", type=_positive, help="convert only the first N patients of each split")
    full = datasets.add_parser("totalsegmentator", help="patient A of TotalSegmentator's test references at full "
                               "length (git clone https://github.com/wasserth/TotalSegmentator)",
                               description="Write patient A's whole CT, its label map, label table and a manifest "
                               "(see Training/datasets/totalsegmentator.py).")
    full.add_argument("--source", required=True, type=Path, help="the root of a TotalSegmentator clone")
    full.add_argument("--output", required=True, type=Path, help="folder for the volumes and the manifest")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "totalsegmentator":
            written = totalsegmentator.convert(args.source, args.output)
            print(f"patient A: {written.slices} slices, {len(written.structures)} structures "
                  f"({written.case.table})\nmanifest: {written.manifest}\nabdominal mix: {written.mix}")
            return 0
        conversion = convert(args.source, args.output, args.splits, args.limit)
        manifests = write_manifests(args.output, conversion.patients)
    except (VolumeError, OSError) as error:
        print(f"{PROGRAM} {args.dataset}: error: {error}", file=sys.stderr)
        return 1
    print(report(conversion, manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
