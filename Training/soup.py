"""Average the weights of checkpoints fine-tuned from one starting checkpoint (a "model soup", Wortsman et al.,
ICML 2022): one network of the same size and speed, often better than each of its members.

    python Training/soup.py runs/a/model.safetensors runs/b/model.safetensors --output runs/soup.safetensors

The members must describe the same network: architecture, network config, text encoder, preprocessing, orientation,
threshold and components (otherwise the average means nothing, and the copy stops with one line naming what
differs). Floating-point tensors are averaged uniformly, BatchNorm's running statistics included; integer buffers
(BatchNorm's step count) are the first member's. Name, description and example prompts are the first member's;
the training summary is too, with ``soup_of`` listing every member's SHA-256, best epoch and validation Dice.
Averaging only makes sense for members that started from the same weights; that is for the caller to know.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from TextSegLib.engine.checkpoints import CheckpointInfo, file_sha256, load_checkpoint, save_like
from Training.rewrite import write_checkpoint

__all__ = ["main", "soup"]

_SAME = ("architecture", "config", "text_encoder", "preprocessing", "orientation", "threshold", "components")


def soup(members: list[Path], target: Path, description: str | None = None) -> CheckpointInfo:
    """Write the uniform weight average of ``members`` (two or more checkpoints of one network) to ``target``, with
    ``description`` if given (else the first member's: say what the average was trained on when the members' data
    differ); returns the new checkpoint's info. Raises ValueError when the members differ in anything but their
    weights and training summary."""
    if len(members) < 2:
        raise ValueError("a soup needs two or more checkpoints")
    network, first = load_checkpoint(members[0])
    total = {key: value.double() if value.is_floating_point() else value
             for key, value in network.state_dict().items()}
    infos = [first]
    for path in members[1:]:
        other, info = load_checkpoint(path)
        differing = [field for field in _SAME if getattr(info, field) != getattr(first, field)]
        if differing:
            raise ValueError(f"{path} differs from {members[0]} in its {', '.join(differing)}: only checkpoints of "
                             "one network, fine-tuned from one start, can be averaged.")
        for key, value in other.state_dict().items():
            if value.is_floating_point():
                total[key] += value.double()
        infos.append(info)
    averaged = {key: (value / len(members)).to(network.state_dict()[key].dtype) if value.is_floating_point()
                else value for key, value in total.items()}
    network.load_state_dict(averaged)
    soup_of = [{"sha256": file_sha256(path), "best_epoch": info.training.get("best_epoch"),
                "val_dice": info.training.get("val_dice")} for path, info in zip(members, infos, strict=True)]
    return save_like(target, network, first, description=description,
                     training={**first.training, "soup_of": soup_of})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="TextSeg .safetensors checkpoints of one network")
    parser.add_argument("--output", type=Path, required=True, help="the averaged checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--description", help="the average's description (default: the first member's)")
    args = parser.parse_args(argv)
    return write_checkpoint(
        args.output, args.overwrite, lambda: soup(args.checkpoints, args.output, args.description),
        lambda info: f"{args.output}: the average of {len(args.checkpoints)} checkpoints ({info.weights_sha256[:12]})")


if __name__ == "__main__":
    sys.exit(main())
