"""Resumable training state without pickle: tensors in safetensors files, everything else in their JSON header.

``<output>/state/train.safetensors`` (written by rank 0) holds the model, the optimizer's per-parameter tensors and,
in its metadata, the optimizer's parameter groups, the scheduler, the AMP scaler, the epoch counters and the
metric history. ``<output>/state/rng-<rank>.safetensors`` (one per process) holds that process's random states, so a
resumed run draws the same augmentations and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from TextSegLib.core.files import atomic_write

__all__ = ["load_rng", "load_state", "save_rng", "save_state"]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
               progress: dict[str, Any]) -> None:
    """Write the main training state (call on rank 0)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    metadata = {
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "progress": progress,
    }
    header = {"textseg-training-state": json.dumps(metadata)}
    atomic_write(folder / "train.safetensors", lambda temporary: save_file(tensors, temporary, metadata=header))


def load_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               scaler) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns the progress dict."""
    from safetensors import safe_open

    path = folder / "train.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"No training state to resume from in {folder} (expected {path.name}).")
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["textseg-training-state"])
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, metadata["optimizer"]))
    scheduler.load_state_dict(metadata["scheduler"])
    if scaler is not None and metadata["scaler"] is not None:
        scaler.load_state_dict(metadata["scaler"])
    return metadata["progress"]


def save_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    """Write this process's random states (global CPU, CUDA, and the augmentation generator)."""
    tensors = {"cpu": torch.get_rng_state(), "augment": generator.get_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    atomic_write(folder / f"rng-{rank}.safetensors", lambda temporary: save_file(tensors, temporary))


def load_rng(folder: Path, rank: int, generator: torch.Generator) -> None:
    path = folder / f"rng-{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"No random state for process {rank} in {folder}: resume with as many processes "
                                "as the interrupted run used.")
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["cpu"])
    generator.set_state(tensors["augment"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
