"""Training/prompt_effect.py: the swap, the scoring on patient B's real labels, and the script end to end.

The scoring is checked with two known predictors on patient B's real label map (on its DICOM grid): one that
follows the prompt perfectly (it returns the label of the structure the prompt names, whichever of its phrasings
is used) and one that ignores it (always the liver). The script runs end to end on a two-step budget.
"""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from TextSegLib.evaluation.metrics import dice
from Training.prompt_effect import main, patient_b, score_prompts, scored_structures, summarise, swap_map
from Training.structures import STRUCTURES


@pytest.fixture(scope="module")
def held_out():
    return patient_b()


def test_the_swap_is_a_fixed_derangement():
    names = ["liver", "spleen", "stomach", "aorta"]
    swaps = swap_map(names)
    assert swaps == {"liver": "spleen", "spleen": "stomach", "stomach": "aorta", "aorta": "liver"}
    assert sorted(swaps.values()) == sorted(names)
    assert swap_map(["liver", "spleen"]) == {"liver": "spleen", "spleen": "liver"}
    for bad in (["liver"], ["liver", "liver"], []):
        with pytest.raises(ValueError, match="at least two different"):
            swap_map(bad)


def test_scored_structures_are_those_trained_and_present_in_patient_b():
    names = [s.name for s in scored_structures()]
    assert names == ["liver", "spleen", "stomach", "aorta", "inferior_vena_cava", "spinal_cord", "colon",
                     "autochthon_left", "autochthon_right"]
    assert not {"kidney_left", "kidney_right", "gallbladder"} & set(names)  # absent from patient B


def test_a_prompt_follower_and_a_prompt_ignorer_score_as_they_must(held_out):
    volume, labels, values = held_out
    structures = scored_structures()
    assert labels.shape == volume.array.shape
    named = {text: s.name for s in STRUCTURES for text in (*s.phrasings, *s.paraphrases)}
    asked: list[str] = []

    def follower(prompt: str) -> np.ndarray:
        asked.append(prompt)
        return labels == values[named[prompt]]

    rows = score_prompts(follower, None, labels, values, structures)
    assert len(rows) == 2 * len(structures) + sum(len(s.paraphrases) for s in structures)
    assert sorted(asked) == sorted({row["prompt"] for row in rows})  # each prompt segmented once
    swaps = swap_map([s.name for s in structures])
    for row in rows:
        assert named[row["prompt"]] == row["prompt_names"]
        if row["condition"] == "swapped":
            assert row["prompt_names"] == swaps[row["structure"]] != row["structure"]
            expected = dice(labels == values[row["prompt_names"]], labels == values[row["structure"]])
            assert row["dice"] == pytest.approx(expected) and row["dice"] < 0.05  # disjoint organs
            assert row["dice_named"] == 1.0
        else:
            assert row["prompt_names"] == row["structure"] and row["dice"] == row["dice_named"] == 1.0
            trained = next(s for s in structures if s.name == row["structure"])
            assert row["prompt"] in (trained.phrasings[:1] if row["condition"] == "right" else trained.paraphrases)
        assert row["reference_voxels"] == int(np.count_nonzero(labels == values[row["structure"]])) > 0
    table = summarise(rows)
    assert [r["structure"] for r in table] == [*swaps, "mean"]
    assert table[-1]["right"] == table[-1]["paraphrase"] == table[-1]["swapped_named"] == 1.0
    assert table[-1]["swapped"] < 0.05
    assert table[-1]["p_right"] == table[-1]["p_paraphrase"] == 1.0 and table[-1]["p_swapped"] == 0.0

    liver = labels == values["liver"]
    ignored = summarise(score_prompts(lambda prompt: liver, None, labels, values, structures))
    for row in ignored:
        assert row["swapped"] == pytest.approx(row["right"]) == pytest.approx(row["paraphrase"])
        assert row["p_swapped"] == pytest.approx(row["p_right"])
    assert ignored[0]["structure"] == "liver" and ignored[0]["right"] == 1.0
    assert all(row["right"] < 0.2 for row in ignored[1:-1])


def test_probabilities_given_by_a_predictor_are_averaged_inside_each_label(held_out):
    _volume, labels, values = held_out
    structures = scored_structures()[:2]  # liver, spleen
    liver, spleen = labels == values["liver"], labels == values["spleen"]
    probability = np.where(liver, 0.8, np.where(spleen, 0.3, 0.0)).astype(np.float32)
    rows = score_prompts(lambda prompt: (probability > 0.5, probability), None, labels, values, structures,
                         ["right"])
    assert [(r["structure"], r["probability_inside"], r["dice"]) for r in rows] == [
        ("liver", pytest.approx(0.8), 1.0), ("spleen", pytest.approx(0.3), 0.0)]


def test_scoring_refuses_structures_the_labels_lack_and_unknown_conditions(held_out):
    volume, labels, values = held_out
    kidney = next(s for s in STRUCTURES if s.name == "kidney_left")
    with pytest.raises(ValueError, match="no kidney_left"):
        score_prompts(lambda prompt: labels, volume, labels, values, [STRUCTURES[0], kidney])
    with pytest.raises(ValueError, match="Unknown condition"):
        score_prompts(lambda prompt: labels, volume, labels, values, STRUCTURES[:2], ["reversed"])


def test_the_script_trains_scores_and_skips_a_finished_network(tmp_path, capsys):
    output = tmp_path / "prompt_effect"
    argv = ["--output", str(output), "--networks", "texlivernet", "--steps", "2", "--size", "32",
            "--structures", "liver,spleen"]
    assert main(argv) == 0
    with open(output / "prompt_effect.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    conditions = [row["condition"] for row in rows]
    assert conditions == ["right"] * 2 + ["swapped"] * 2 + ["paraphrase"] * 4
    assert {row["network"] for row in rows} == {"texlivernet"}
    assert [(r["structure"], r["prompt"]) for r in rows[2:4]] == [("liver", "the spleen"), ("spleen", "the liver")]
    assert all(0.0 <= float(row[key]) <= 1.0 for row in rows for key in ("dice", "probability_inside"))
    assert all(0.0 < float(row["probability_inside"]) < 1.0 for row in rows)  # the engine's probabilities
    with open(output / "manifest.csv", newline="") as handle:
        trained = list(csv.DictReader(handle))
    assert {row["case"] for row in trained} == {"ct_a", "mr_a"}
    paraphrases = set(itertools.chain(STRUCTURES[0].paraphrases, STRUCTURES[1].paraphrases))
    assert {row["text"] for row in trained}.isdisjoint(paraphrases)
    markdown = (output / "prompt_effect.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and table[0].count("|") == 8  # header, liver, spleen, mean
    assert "--steps 2" in markdown and "Trained 2 steps" in markdown

    model = output / "texlivernet" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert model.stat().st_mtime_ns == stamp
    assert "training" not in capsys.readouterr().err
    assert (output / "prompt_effect.md").read_text().split("\n", 1)[1] == markdown.split("\n", 1)[1]

    scored = tmp_path / "scored"  # --model scores a trained checkpoint as it is, with the same rows
    assert main(["--output", str(scored), "--model", str(model), "--structures", "liver,spleen"]) == 0
    with open(scored / "prompt_effect.csv", newline="") as handle:
        again = list(csv.DictReader(handle))
    assert [(r["condition"], r["structure"], r["prompt"], r["dice"]) for r in again] == [
        (r["condition"], r["structure"], r["prompt"], r["dice"]) for r in rows]
    assert not (scored / "texlivernet").exists() and "Scored in" in (scored / "prompt_effect.md").read_text()
