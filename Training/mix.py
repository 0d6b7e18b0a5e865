"""Write one training manifest from several, each repeated a set number of times: how a model learns anatomies
from datasets of very different sizes (170 head-and-neck patients beside one abdominal CT) in one run.

    python Training/mix.py data/openkbp/recipe_absent.csv Training/manifests/shipped.csv:8 --output data/mix.csv

``MANIFEST:N`` writes each row of that manifest N times (default once); the balanced sampler draws slices, so N is
the manifest's weight against the others. Image and label paths are rewritten relative to the output's folder, a
row without a split is a training row, and the result is read back as a manifest before the command ends, so a
case that two manifests name with different images is refused in one line.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TextSegLib.io.manifests import ManifestError, read_manifest

__all__ = ["main", "mix"]

_PATHS = ("image", "label")


def _source(argument: str) -> tuple[Path, int]:
    """``PATH`` or ``PATH:N`` -> (path, N >= 1)."""
    path, _, times = argument.rpartition(":") if argument.rpartition(":")[2].isdigit() else (argument, "", "1")
    if int(times) < 1:
        raise ValueError(f"{argument}: a manifest is written at least once (PATH:N with N >= 1)")
    return Path(path), int(times)


def mix(sources: list[tuple[Path, int]], output: Path) -> int:
    """Write the rows of each ``(manifest, times)`` ``times`` times to the CSV ``output``; returns the rows written.
    Raises ManifestError for a manifest that is missing or that the mix cannot hold."""
    fields: list[str] = []
    rows: list[dict[str, str]] = []
    for path, times in sources:
        if not path.is_file():
            raise ManifestError(f"Manifest not found: {str(path)!r}")
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields += [name for name in reader.fieldnames or () if name not in fields]
            read = list(reader)
        for row in read:
            for key in _PATHS:
                if row.get(key):
                    row[key] = os.path.relpath((path.parent / row[key]).resolve(), output.parent.resolve())
            row["split"] = row.get("split") or "train"
        rows += read * times
    if "split" not in fields:
        fields.append("split")
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    try:
        read_manifest(output)
    except ManifestError:
        output.unlink()
        raise
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST[:N]", help="a CSV manifest, written N times")
    parser.add_argument("--output", required=True, type=Path, help="the mixed manifest (CSV)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"{args.output} exists; give --overwrite to replace it.", file=sys.stderr)
        return 1
    try:
        written = mix([_source(argument) for argument in args.manifests], args.output)
    except (ManifestError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{args.output}: {written} rows from {len(args.manifests)} manifests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
