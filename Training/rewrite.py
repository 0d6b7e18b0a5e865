"""What the checkpoint-rewriting tools (``half.py``, ``soup.py``) share: the command's output handling."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from TextSegLib.engine.checkpoints import CheckpointError, CheckpointInfo

__all__ = ["write_checkpoint"]


def write_checkpoint(output: Path, overwrite: bool, write: Callable[[], CheckpointInfo],
                     said: Callable[[CheckpointInfo], str]) -> int:
    """Run ``write`` (which writes ``output``) unless ``output`` exists and ``overwrite`` is off; print ``said`` of
    the written checkpoint, or the refusal in one line on stderr. Returns the command's exit status."""
    if output.exists() and not overwrite:
        print(f"{output} exists; give --overwrite to replace it.", file=sys.stderr)
        return 1
    try:
        info = write()
    except (CheckpointError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    print(said(info))
    return 0
