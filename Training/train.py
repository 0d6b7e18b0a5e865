"""Train a TextSeg network.

One process:      python Training/train.py --config Training/configs/texlivernet.toml --output runs/texlivernet
N GPUs / CPUs:    torchrun --nproc_per_node=N Training/train.py --config ... --output ...
Several nodes:    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
                      --rdzv_id=RUN Training/train.py --config ... --output ...   (same command on every node)
Resume:           the same command with --resume (and the same number of processes).

The run writes ``<output>/model.safetensors`` (the inference checkpoint `textseg segment -m` takes: the best
validation Dice, or the last epoch), ``log.csv``, ``tensorboard/``, ``config.json`` and ``state/`` (for --resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Training.config import load_config
from Training.distributed import setup, teardown
from Training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="TOML config (Training/configs/)")
    parser.add_argument("--output", required=True, help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (TOML syntax), e.g. --set train.epochs=5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="textseg: %(levelname)s: %(message)s")
    config = load_config(args.config, args.set)
    context = setup(config.train.device)
    try:
        trainer = Trainer(config, Path(args.output), context)
        progress = trainer.fit(resume=args.resume)
        if context.is_main:
            best = progress["best_dice"]
            best_text = f"best validation Dice {best:.4f} (epoch {progress['best_epoch']})" if best >= 0 else \
                "no validation split"
            print(f"Trained {progress['epoch']} epoch(s), {progress['steps']} step(s); {best_text}. "
                  f"Checkpoint: {Path(args.output) / 'model.safetensors'}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
