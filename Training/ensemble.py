"""Train an ensemble (one run per seed, same data split) and export it as one model file.

    python Training/ensemble.py --config Training/configs/freqmedclip.toml --output runs/freqmedclip-ensemble
    python Training/ensemble.py --checkpoints a.safetensors b.safetensors c.safetensors --output ensemble.safetensors

The first form trains ``--seeds`` (three by default, FreqMedCLIP's "3-checkpoint ensemble") in ``<output>/seed-<s>/``
with the config's recipe, ``train.seed`` set per run and the data split (``data.split_seed``) shared, resuming an
interrupted run and skipping a finished one (marked by ``finished``), then writes ``<output>/model.safetensors``.
The second form only joins trained checkpoints. The file holds every member's weights (frozen pretrained towers,
rebuilt from their source, are stored by none) and is one entry of the catalogue (``textseg import``, ``textseg
models``); ``textseg segment -m`` runs it like any model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TextSegLib.engine.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from TextSegLib.models.ensemble import Ensemble

__all__ = ["export_ensemble", "main"]

_SHARED = ("architecture", "config", "text_encoder", "preprocessing", "orientation")


def export_ensemble(checkpoints: Sequence[Path], output: Path, name: str = "", description: str = ""):
    """Join trained checkpoints of one architecture, config, text encoder, preprocessing and orientation into one
    ensemble checkpoint at ``output``; returns its info. The members' training summaries are kept in it."""
    loaded = [load_checkpoint(path) for path in checkpoints]
    first = loaded[0][1]
    for _, info in loaded[1:]:
        differing = [key for key in _SHARED if getattr(info, key) != getattr(first, key)]
        if differing:
            raise CheckpointError(f"{info.path} differs from {first.path} in {', '.join(differing)}: only runs of "
                                  "one recipe (differing in their seed) make an ensemble.")
    ensemble = Ensemble([network for network, _ in loaded])
    members = [info.training for _, info in loaded]
    summary = {"ensemble_of": [info.id for _, info in loaded], "members": members,
               "val_dice": [member.get("val_dice") for member in members],
               "seeds": [member.get("config", {}).get("train", {}).get("seed") for member in members]}
    for key in ("train_cases", "val_cases", "test_cases"):
        if key in members[0]:
            summary[key] = members[0][key]
    count = len(loaded)
    return save_checkpoint(
        output, ensemble, architecture=first.architecture, text_encoder=first.text_encoder,
        preprocessing=first.preprocessing, orientation=first.orientation, threshold=first.threshold,
        name=name or f"{first.name or first.architecture} (ensemble of {count})",
        description=description or f"{first.description} Ensemble of {count} runs, probabilities averaged.".strip(),
        example_prompts=first.example_prompts, training=summary,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TOML config to train once per seed")
    source.add_argument("--checkpoints", nargs="+", type=Path, help="trained checkpoints to join")
    parser.add_argument("--output", required=True, type=Path,
                        help="run folder (with --config) or the ensemble file (with --checkpoints)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    if args.checkpoints:
        if len(args.checkpoints) < 2:
            parser.error("an ensemble needs at least two checkpoints")
        info = export_ensemble(args.checkpoints, args.output)
        print(f"Ensemble of {info.members} models: {args.output}")
        return 0
    if len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least two different seeds")
    from Training.config import load_config
    from Training.distributed import setup, teardown
    from Training.trainer import Trainer

    base = load_config(args.config, args.set)
    context = setup(base.train.device)
    paths = []
    try:
        for seed in args.seeds:
            folder = args.output / f"seed-{seed}"
            checkpoint, finished = folder / "model.safetensors", folder / "finished"
            if not finished.is_file():  # early stopping ends a run before its last epoch: mark the end
                print(f"[seed {seed}] training ...", file=sys.stderr)
                resume = (folder / "state" / "train.safetensors").is_file()
                Trainer(load_config(args.config, [*args.set, f"train.seed={seed}"]), folder, context).fit(resume)
                if context.is_main:
                    finished.write_text("trained\n")
            paths.append(checkpoint)
        if context.is_main:
            info = export_ensemble(paths, args.output / "model.safetensors", base.export.name and
                                   f"{base.export.name} (ensemble of {len(paths)})")
            print(f"Ensemble of {info.members} models: {args.output / 'model.safetensors'}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
