"""What the prompt does, measured for each network: right, swapped and unseen prompts on a held-out CT.

    python Training/prompt_effect.py --output runs/prompt_effect                 # the three networks
    python Training/prompt_effect.py --output runs/pe --networks texlivernet --steps 2 --structures liver,spleen
    python Training/prompt_effect.py --output runs/pe-shipped --model abdomen-freqmedclip-small    # score, no training

Each network (small preset, the offline MiniLM text encoder) trains on TotalSegmentator's CT patient A and the
abdominal MR with every structure named only by its trained phrasings (``Training/structures.py``: "the liver",
"liver", "the patient's liver", "segment the liver"), with the same recipe for all three: ``--size`` inputs, global
batch 8, AdamW at a constant learning rate of 1e-3, ``--steps`` optimizer steps, every slice that shows a structure
plus a fifth of the slices without it (empty targets). Patient B's CT (never seen) is then segmented for every
structure present in it, three ways:

(a) *right*: the structure's canonical prompt ("the liver"), Dice against the structure's label;
(b) *swapped*: structures ``s_1 .. s_n`` (in ``STRUCTURES`` order) are asked with a fixed derangement of the
    prompts, ``s_i`` with the canonical prompt of ``s_{i+1}`` (``s_n`` with ``s_1``'s). Dice against ``s_i``'s own
    label: a network that ignores the prompt scores as in (a), one that follows it drops. (b') the same output
    against the label of the structure the prompt names (``s_{i+1}``) is in the CSV (``dice_named``); it equals
    (a) for ``s_{i+1}``, since that prompt is ``s_{i+1}``'s right prompt, so the tables leave it out;
(c) *paraphrase*: each of the structure's held-out phrasings ("liver parenchyma", "the hepatic organ"), never
    seen in training; Dice against the structure's label, averaged over its phrasings.

Labels are TotalSegmentator's own predictions (a silver standard), put on patient B's grid in physical space
(:func:`TextSegLib.io.volumes.labels_on_grid`: B's label file is stored y-flipped).

FreqMedCLIP's frozen BiomedCLIP ViT cannot be had offline; here its semantic stream is a small ViT with random
weights that is trained with the rest (a 4-block, 192-wide open_clip ViT with 16-pixel patches at ``--size``,
described by an ``open_clip_config.json`` this script writes; no weights are fetched). That is an architecture
variant, not the paper's pretrained tower.

A network whose run has finished (model and scores present) is not trained or scored again; an interrupted run
resumes from its training state. Writes ``<output>/prompt_effect.csv`` (one row per segmentation) and
``<output>/prompt_effect.md`` (per-network tables with the command and the times), and prints the tables.
:func:`score_prompts` scores any loaded model the same way (for a test of the shipped model); the tables also give
the mean probability inside each label, threshold-free.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import LoadedModel, clear_model_cache, load_model
from TextSegLib.evaluation.metrics import dice
from TextSegLib.io.volumes import Volume, labels_on_grid, read_volume
from Training.structures import CASES, STRUCTURES, Structure, label_values, write_manifest

__all__ = ["CONDITIONS", "NETWORKS", "patient_b", "score_prompts", "scored_structures", "summarise", "swap_map",
           "to_markdown", "train_network"]

NETWORKS = ("texlivernet", "mmrdl", "freqmedclip")
CONDITIONS = ("right", "swapped", "paraphrase")
TRAIN_CASES = ("ct_a", "mr_a")
HELD_OUT = "ct_b"
FIELDS = ("network", "condition", "structure", "prompt", "prompt_names", "dice", "dice_named", "probability_inside",
          "predicted_voxels", "reference_voxels")
SCORES = ("dice", "dice_named", "probability_inside")

#: The small open_clip ViT standing in for BiomedCLIP's (random weights, trained); ``image_size`` is set per run.
STAND_IN_VIT = {"embed_dim": 128, "vision_cfg": {"layers": 4, "width": 192, "head_width": 64, "patch_size": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}

#: ``prompt -> (K, J, I) mask``, or ``prompt -> (mask, probability)`` with the probability in ``[0, 1]``.
Predictor = Callable[[str], np.ndarray | tuple[np.ndarray, np.ndarray]]


def swap_map(names: Sequence[str]) -> dict[str, str]:
    """The fixed derangement of (b): ``names[i] -> names[i + 1]``, the last to the first (needs two or more)."""
    names = list(names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"Swapping prompts needs at least two different structures, got {names}.")
    return {name: names[(index + 1) % len(names)] for index, name in enumerate(names)}


def scored_structures(structures: Sequence[Structure] = STRUCTURES) -> list[Structure]:
    """The structures trained on (present in patient A's CT or the MR) that patient B's label file holds."""
    trained = set().union(*(label_values(CASES[case].table) for case in TRAIN_CASES))
    held_out = set(label_values(CASES[HELD_OUT].table))
    return [s for s in structures if s.name in trained and s.name in held_out]


def patient_b() -> tuple[Volume, np.ndarray, dict[str, int]]:
    """Patient B's CT from its DICOM series, its label map on that grid ``(K, J, I)`` and ``name -> label value``."""
    case = CASES[HELD_OUT]
    volume = read_volume(case.image, modality=case.modality)
    labels = labels_on_grid(read_volume(case.label), volume)
    return volume, labels, label_values(case.table)


def _predictor(model: InferenceEngine | LoadedModel | Predictor, volume: Volume | None) -> Predictor:
    if isinstance(model, LoadedModel):
        model = InferenceEngine(model)
    if isinstance(model, InferenceEngine):
        if volume is None:
            raise ValueError("A model segments a volume: give the volume to score on.")
        engine = model

        def segment(prompt: str) -> tuple[np.ndarray, np.ndarray]:
            result = engine.segment(volume, prompt, probability=True)
            return result.mask, result.probability

        return segment
    if callable(model):
        return model
    raise TypeError(f"Expected an InferenceEngine, a LoadedModel or a prompt -> mask function, not "
                    f"{type(model).__name__}.")


def score_prompts(model: InferenceEngine | LoadedModel | Predictor, volume: Volume | None, labels: np.ndarray,
                  values: dict[str, int], structures: Sequence[Structure],
                  conditions: Sequence[str] = CONDITIONS) -> list[dict[str, Any]]:
    """Segment ``volume`` with ``model`` under each condition and score against ``labels``.

    Args:
        model: a loaded model or engine (run on ``volume``), or any :data:`Predictor` function.
        volume: the volume to segment (unused by a function).
        labels: ``(K, J, I)`` integer label map on the volume's grid.
        values: ``structure name -> label value`` in ``labels``.
        structures: the structures asked for, in the order that defines the swap (:func:`swap_map`).
        conditions: any of ``"right"``, ``"swapped"``, ``"paraphrase"``.

    Returns one row per segmentation: ``condition``, ``structure`` (the one asked for and scored against),
    ``prompt``, ``prompt_names`` (the structure the prompt names), ``dice`` (against ``structure``'s label),
    ``dice_named`` (against ``prompt_names``' label), ``probability_inside`` (the mean probability inside
    ``structure``'s label: threshold-free, so it tells right from swapped also where no voxel passes the threshold;
    a function that returns only a mask gives its mask as the probability), ``predicted_voxels``,
    ``reference_voxels``.
    """
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"Unknown condition(s) {unknown}; choose from {list(CONDITIONS)}.")
    missing = [s.name for s in structures if s.name not in values]
    if missing:
        raise ValueError(f"The label map has no {', '.join(missing)}; score only structures it holds.")
    predict = _predictor(model, volume)
    by_name = {s.name: s for s in structures}
    swaps = swap_map([s.name for s in structures]) if "swapped" in conditions else {}
    asked: list[tuple[str, Structure, str, Structure]] = []
    for condition in conditions:
        for structure in structures:
            if condition == "right":
                asked.append((condition, structure, structure.prompt, structure))
            elif condition == "swapped":
                named = by_name[swaps[structure.name]]
                asked.append((condition, structure, named.prompt, named))
            else:
                asked += [(condition, structure, text, structure) for text in structure.paraphrases]
    rows, outputs = [], {}
    for condition, structure, prompt, named in asked:
        if prompt not in outputs:  # a swapped prompt is another structure's right prompt: segmented once
            answer = predict(prompt)
            mask, probability = answer if isinstance(answer, tuple) else (answer, answer)
            outputs[prompt] = np.asarray(mask) != 0, np.asarray(probability, dtype=np.float32)
        mask, probability = outputs[prompt]
        reference = labels == values[structure.name]
        rows.append({"condition": condition, "structure": structure.name, "prompt": prompt,
                     "prompt_names": named.name, "dice": dice(mask, reference),
                     "dice_named": dice(mask, labels == values[named.name]),
                     "probability_inside": float(probability[reference].mean()),
                     "predicted_voxels": int(np.count_nonzero(mask)),
                     "reference_voxels": int(np.count_nonzero(reference))})
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per structure (in row order) and a final ``mean`` row: Dice ``right``, ``swapped`` (against the structure
    asked for), ``swapped_named`` (against the structure the swapped prompt names), ``paraphrase`` (mean over the
    structure's unseen phrasings), and the mean probability inside the structure's label for each condition
    (``p_right``, ``p_swapped``, ``p_paraphrase``); a condition not scored is None."""
    names = list(dict.fromkeys(row["structure"] for row in rows))

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    table = []
    for name in names:
        mine = [row for row in rows if row["structure"] == name]
        pick = {condition: [row for row in mine if row["condition"] == condition] for condition in CONDITIONS}
        entry: dict[str, Any] = {"structure": name, "swapped_named": mean([r["dice_named"] for r in pick["swapped"]])}
        for condition in CONDITIONS:
            entry[condition] = mean([r["dice"] for r in pick[condition]])
            entry[f"p_{condition}"] = mean([r["probability_inside"] for r in pick[condition]])
        table.append(entry)
    columns = [key for key in table[0] if key != "structure"] if table else []
    table.append({"structure": "mean", **{c: mean([r[c] for r in table if r[c] is not None]) for c in columns}})
    return table


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    """A :func:`summarise` table as Markdown: Dice and mean probability inside the label for (a), (b) and (c).

    (b') is left out: the swapped prompt of ``s_i`` is the right prompt of ``s_{i+1}``, so its output and its Dice
    against ``s_{i+1}`` are (a)'s for ``s_{i+1}``.
    """
    lines = ["| structure | Dice (a) right | Dice (b) swapped | Dice (c) unseen | P inside (a) | P inside (b) | "
             "P inside (c) |", "|---|---|---|---|---|---|---|"]
    keys = ("right", "swapped", "paraphrase", "p_right", "p_swapped", "p_paraphrase")
    for row in table:
        cells = ["-" if row[c] is None else f"{row[c]:.3f}" for c in keys]
        name = f"**{row['structure']}**" if row["structure"] == "mean" else row["structure"].replace("_", " ")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _overrides(network: str, size: int, folder: Path) -> list[str]:
    """Network-specific config overrides: input size for the ViT-based ones, the stand-in ViT for FreqMedCLIP."""
    if network == "texlivernet":
        return ["model.overrides={head_bias=-3.0}"]  # a 5 % foreground prior, as the shipped recipe
    if network == "mmrdl":
        return [f"model.overrides={{image_size={size}}}"]
    if network == "freqmedclip":
        tower = folder / "stand-in-vit"
        tower.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": {**STAND_IN_VIT, "vision_cfg": {**STAND_IN_VIT["vision_cfg"], "image_size": size}}}
        (tower / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        return [f"model.overrides={{image_size={size}, vision_source={json.dumps('local-dir:' + str(tower))}, "
                "freeze_backbone=false, vit_layers=[1, 2, 3, 4]}"]
    raise ValueError(f"Unknown network {network!r}; choose from {', '.join(NETWORKS)}.")


def train_network(network: str, folder: Path, manifest: Path, steps: int, size: int,
                  extra: Sequence[str] = ()) -> Path:
    """Train ``network`` (small preset, MiniLM) on ``manifest`` into ``folder``; returns ``folder/model.safetensors``.

    Resumes from ``folder/state`` when a run was interrupted; a finished run is not trained again.
    """
    from Training.config import load_config
    from Training.distributed import setup
    from Training.trainer import Trainer

    overrides = [
        f"model.architecture=\"{network}\"", "model.preset=\"small\"", "text.encoder=\"minilm\"",
        f"data.manifest={json.dumps(str(manifest))}", "data.val_fraction=0.0", "data.slices=\"all\"",
        "data.empty_fraction=0.2",
        f"data.preprocessing={{size=[{size}, {size}], intensity={{CT={{kind=\"window\", low=-200.0, high=250.0}}, "
        "MR={kind=\"percentile\", low=0.5, high=99.5}}}",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "train.batch_size=8", "train.epochs=1000", f"train.max_steps={steps}",
        "train.seed=0", "export.select=\"last\"",
        f"export.name=\"prompt_effect: {network}\"", *_overrides(network, size, folder), *extra]
    config = load_config(None, overrides)
    checkpoint = folder / "model.safetensors"
    resume = (folder / "state" / "train.safetensors").is_file()
    done = checkpoint.is_file() and (folder / "trained.json").is_file()
    if not done:
        context = setup(config.train.device)
        progress = Trainer(config, folder, context).fit(resume=resume)
        (folder / "trained.json").write_text(json.dumps({"steps": progress["steps"],
                                                         "seconds": round(progress["seconds"], 1)}))
    return checkpoint


def _rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **{key: f"{row[key]:.4f}" for key in SCORES}})
    return buffer.getvalue()


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return [{**row, **{key: float(row[key]) for key in SCORES}} for row in csv.DictReader(handle)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the runs, the CSV and the Markdown tables")
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated subset of " +
                        ", ".join(NETWORKS))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per network (the time budget)")
    parser.add_argument("--size", type=int, default=128, help="input side in pixels (a multiple of 16)")
    parser.add_argument("--structures", help="comma-separated structure names to train and score (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch (1: on a shared two-core machine more threads than free cores "
                             "spin; one thread measured 10x faster there)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="further config overrides for every network")
    parser.add_argument("--model", help="score this trained model (catalogue id or checkpoint) instead of training")
    args = parser.parse_args(argv)
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown or not networks:
        parser.error(f"--networks takes names from {', '.join(NETWORKS)}, got {args.networks!r}")
    if args.steps < 1 or args.size < 32 or args.size % 16:
        parser.error("--steps must be at least 1 and --size a multiple of 16 of at least 32")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    structures = STRUCTURES
    if args.structures:
        wanted = [n.strip() for n in args.structures.split(",") if n.strip()]
        known = {s.name: s for s in STRUCTURES}
        missing = [n for n in wanted if n not in known]
        if missing:
            parser.error(f"unknown structure(s) {', '.join(missing)}; known: {', '.join(known)}")
        structures = tuple(known[n] for n in wanted)
    if len(scored_structures(structures)) < 2:
        parser.error("at least two of the structures must be present in patient B to swap their prompts")
    command = "python Training/prompt_effect.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.model:
            return _score_model(Path(args.output).resolve(), args.model, structures, command)
        return _run(Path(args.output).resolve(), networks, structures, args.steps, args.size, args.set, command)
    finally:
        torch.set_num_threads(previous)


def _score_model(output: Path, model: str, structures: tuple[Structure, ...], command: str) -> int:
    """Score one trained model on patient B under every condition; write and print its table."""
    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model, "auto")
    volume, labels, values = patient_b()
    started = time.perf_counter()
    rows = [{**row, "network": loaded.id} for row in score_prompts(loaded, volume, labels, values,
                                                                     scored_structures(structures))]
    (output / "prompt_effect.csv").write_text(_rows_csv(rows))
    table = summarise(rows)
    markdown = (f"Command: `{command}`\n\n### {loaded.id}\n\nScored in {time.perf_counter() - started:.0f} s "
                "(patient B; silver-standard labels).\n\n" + to_markdown(table))
    (output / "prompt_effect.md").write_text(markdown)
    print(markdown)
    return 0


def _run(output: Path, networks: list[str], structures: tuple[Structure, ...], steps: int, size: int,
         extra: list[str], command: str) -> int:
    """Train and score each network (skipping finished ones), then write and print the tables."""
    scored = scored_structures(structures)
    output.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(output / "manifest.csv", list(TRAIN_CASES), structures)
    volume, labels, values = patient_b()
    rows, sections = [], []
    for network in networks:
        folder = output / network
        scores = folder / "scores.csv"
        if not scores.is_file():
            print(f"[{network}] training {steps} steps ...", file=sys.stderr)
            checkpoint = train_network(network, folder, manifest, steps, size, extra)
            clear_model_cache()
            engine = InferenceEngine(load_model(checkpoint, "auto"))
            print(f"[{network}] scoring patient B ...", file=sys.stderr)
            scoring = time.perf_counter()
            found = score_prompts(engine, volume, labels, values, scored)
            (folder / "scoring.json").write_text(json.dumps({"seconds": round(time.perf_counter() - scoring, 1)}))
            scores.write_text(_rows_csv(found))
        found = [{**row, "network": network} for row in _read_rows(scores)]
        rows += found
        trained = json.loads((folder / "trained.json").read_text())
        scoring = json.loads((folder / "scoring.json").read_text())
        table = summarise(found)
        sections.append(f"### {network}\n\nTrained {trained['steps']} steps in {trained['seconds']:.0f} s, scored in "
                        f"{scoring['seconds']:.0f} s.\n\n"
                        + to_markdown(table))
        print(f"[{network}] mean Dice: right {table[-1]['right']:.3f}, swapped {table[-1]['swapped']:.3f}, "
              f"unseen phrasings {table[-1]['paraphrase']:.3f}", file=sys.stderr)
    (output / "prompt_effect.csv").write_text(_rows_csv(rows))
    markdown = (f"Command: `{command}`\n\nPatient B ({len(scored)} structures; silver-standard labels), Dice per "
                "structure.\n\n" + "\n".join(sections))
    (output / "prompt_effect.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
