"""Where a run computes: the device a user asked for, checked against what this computer has (a GPU with too
little free memory means the CPU, with a note for the user), and the errors for a device that is missing or out of
memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from TextSegLib.core.errors import TextSegError
from TextSegLib.core.options import check_device
from TextSegLib.core.threads import configured_threads

__all__ = [
    "DeviceError",
    "DeviceMemoryError",
    "choose_device",
    "cpu_has_native_bf16",
    "memory_error",
    "resolve_device",
    "use_configured_threads",
]

log = logging.getLogger("textseg")


class DeviceError(TextSegError, RuntimeError):
    """A device that this computer does not have."""


class DeviceMemoryError(TextSegError, torch.OutOfMemoryError, MemoryError):
    """A run that did not fit in the memory of its device. A ``torch.OutOfMemoryError`` too, so that a caller that
    retries on the CPU after the GPU ran out (the worker service) still sees it as one."""


def memory_error(error: BaseException, device: torch.device) -> DeviceMemoryError | None:
    """The :class:`DeviceMemoryError` for ``error`` when it says that ``device`` ran out of memory while segmenting
    (torch's CUDA out-of-memory error, NumPy's ``MemoryError``, the CPU allocator's ``RuntimeError``); else None."""
    cpu_allocator = isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    if not isinstance(error, torch.OutOfMemoryError | MemoryError) and not cpu_allocator:
        return None
    if device.type == "cuda":
        return DeviceMemoryError(f"The GPU ({device}) ran out of memory while segmenting; close other programs that "
                                 "use it, or segment on the CPU.")
    return DeviceMemoryError("The computer ran out of memory while segmenting; close other programs, give a smaller "
                             "batch size, or segment on a GPU.")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) through oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when a GPU is usable, else CPU. A name that is no device
    (:func:`~TextSegLib.core.options.check_device`), ``"cuda"`` without a GPU and ``"cuda:N"`` without GPU ``N`` are
    readable errors."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(check_device(device) if isinstance(device, str) else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("No CUDA GPU is available here; use the device 'cpu' or 'auto'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"There is no GPU {device} here: this computer has {torch.cuda.device_count()} (cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}); use one of them, 'cuda' or 'auto'.")
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


def use_configured_threads() -> int:
    """Size torch's thread pools as :func:`TextSegLib.core.threads.configure` decided, when it was called in this
    process (the ``textseg`` commands call it): that many intra-op threads, one inter-op thread (where torch still
    allows the change: before any inter-op work and only once). Returns torch's intra-op thread count."""
    threads = configured_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if threads is not None and torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # inter-op work has started or the count was set already: it stays as it is
            log.debug("torch's inter-op thread count stays %d", torch.get_num_interop_threads())
    return torch.get_num_threads()
