"""Training/mix.py on the repository's own manifests and the shared data: repeated rows, paths that still reach
the same files from the mix's folder, splits kept or made 'train', and one-line refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from TextSegLib.io.manifests import read_manifest
from Training.mix import main, mix

MANIFESTS = Path(__file__).resolve().parents[2] / "Training" / "manifests"
SHIPPED = MANIFESTS / "shipped.csv"
LESIONS = MANIFESTS / "pyradiomics.csv"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_each_manifest_is_written_its_number_of_times_and_reaches_the_same_files(tmp_path):
    output = tmp_path / "deeper" / "mix.csv"
    written = mix([(SHIPPED, 1), (LESIONS, 3)], output)
    assert written == len(_rows(SHIPPED)) + 3 * len(_rows(LESIONS))
    mixed = {case.case: case for case in read_manifest(output)}
    for source in (SHIPPED, LESIONS):
        for case in read_manifest(source):
            got = mixed[case.case]
            assert (got.image, got.label) == (case.image, case.label)
            assert got.image.is_file()
            assert got.split == "train"
    lesion = read_manifest(LESIONS)[0]
    wanted = len(lesion.targets) * 3 + sum(len(c.targets) for c in read_manifest(SHIPPED) if c.case == lesion.case)
    assert len(mixed[lesion.case].targets) == wanted


def test_a_given_split_is_kept(tmp_path):
    rows = _rows(LESIONS)
    source = tmp_path / "split.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "split"])
        writer.writeheader()
        for number, row in enumerate(rows):
            row["image"] = str((LESIONS.parent / row["image"]).resolve())
            row["label"] = str((LESIONS.parent / row["label"]).resolve())
            writer.writerow({**row, "split": "val" if number == 0 else ""})
    mix([(source, 2)], tmp_path / "mix.csv")
    splits = {case.case: case.split for case in read_manifest(tmp_path / "mix.csv")}
    assert splits[rows[0]["case"]] == "val"
    assert {split for case, split in splits.items() if case != rows[0]["case"]} == {"train"}


def test_a_case_with_two_images_is_refused_and_nothing_is_left(tmp_path, capsys):
    rows = _rows(LESIONS)
    other = tmp_path / "other.csv"
    with open(other, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow({**rows[0], "image": str((LESIONS.parent / rows[1]["image"]).resolve()),
                         "label": str((LESIONS.parent / rows[1]["label"]).resolve())})
    output = tmp_path / "mix.csv"
    assert main([str(LESIONS), str(other), "--output", str(output)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "another image" in error
    assert not output.exists()


@pytest.mark.parametrize(("argument", "said"), [("missing.csv", "not found"), (f"{LESIONS}:0", "at least once")])
def test_bad_arguments_get_one_line(tmp_path, capsys, argument, said):
    assert main([argument, "--output", str(tmp_path / "mix.csv")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and said in error


def test_an_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    output = tmp_path / "mix.csv"
    output.write_text("mine\n")
    assert main([str(LESIONS), "--output", str(output)]) == 1
    assert output.read_text() == "mine\n" and "--overwrite" in capsys.readouterr().err
