"""Store a checkpoint's weights in fp16: half the file, the same network (loading casts the weights back to fp32,
and the device computes as it would with the fp32 file), for the catalogue's size limit.

    python Training/half.py runs/monuseg-mmrdl-text/model.safetensors TextSegLib/weights/monuseg-mmrdl.safetensors

Settings, description (unless --description replaces it) and training summary are kept; the summary records
which file the weights were halved from (its SHA-256). A weight beyond fp16's range stops the copy with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from TextSegLib.engine.checkpoints import CheckpointInfo, file_sha256, load_checkpoint, save_like
from Training.rewrite import write_checkpoint

__all__ = ["halve", "main"]


def halve(source: Path, target: Path, description: str | None = None) -> CheckpointInfo:
    """Write ``source``'s network with fp16 weights to ``target`` (with ``description`` in place of its own, if
    given); returns the new checkpoint's info."""
    network, info = load_checkpoint(source)
    return save_like(target, network, info, description=description,
                     training={**info.training, "halved_from_sha256": file_sha256(source)},
                     weights_dtype=torch.float16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a TextSeg .safetensors checkpoint")
    parser.add_argument("output", type=Path, help="the fp16 copy to write")
    parser.add_argument("--description", help="the description `textseg models` shows, in place of the checkpoint's "
                        "(e.g. to name the licence of the data it was trained on)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    return write_checkpoint(
        args.output, args.overwrite, lambda: halve(args.checkpoint, args.output, args.description),
        lambda info: f"{args.output}: {args.output.stat().st_size / 1e6:.1f} MB, weights in fp16 "
                     f"({info.weights_sha256[:12]})")


if __name__ == "__main__":
    sys.exit(main())
