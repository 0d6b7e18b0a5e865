"""Where a run computes: the device a user asked for, checked against what this computer has (a GPU with too
little free memory means the CPU, with a note for the user)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "choose_device",
    "cpu_has_native_bf16",
    "resolve_device",
]

log = logging.getLogger("textseg")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) through oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when a GPU is usable, else CPU; ``"cuda"`` without a GPU is a readable error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("No CUDA GPU is available here; use the device 'cpu' or 'auto'.")
    return device


MINIMUM_FREE_GPU_BYTES = 2 << 30


GPU_BYTES_PER_CHECKPOINT_BYTE = 4


def choose_device(device: str, model_paths: Sequence[str | Path]) -> tuple[str, list[str]]:
    """Device to run on (``"cpu"``, ``"cuda"`` or ``"cuda:N"``) and warnings for the user.

    ``device`` is ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``. A GPU with less free memory than the models need (an
    estimate from their file sizes, at least ``MINIMUM_FREE_GPU_BYTES``) is not used: the CPU is, with a warning;
    so is the CPU when ``"cuda"`` is asked for where there is no GPU.
    """
    if device == "cpu":
        return "cpu", []
    if not torch.cuda.is_available():
        return "cpu", ([] if device == "auto" else ["No usable GPU was found; TextSeg runs on the CPU."])
    target = torch.device("cuda" if device == "auto" else device)
    free, _total = torch.cuda.mem_get_info(target)
    needed = max(MINIMUM_FREE_GPU_BYTES,
                 GPU_BYTES_PER_CHECKPOINT_BYTE * sum(Path(path).stat().st_size for path in model_paths))
    if free < needed:
        message = (f"The GPU has {free / 2**30:.1f} GB free, TextSeg needs about {needed / 2**30:.1f} GB: it runs "
                   "on the CPU (slower).")
        log.warning("%s", message)
        return "cpu", [message]
    return str(target), []
