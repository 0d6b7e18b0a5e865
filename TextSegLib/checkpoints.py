"""The single-file checkpoint format and the catalogue of models a user can pick.

A TextSeg checkpoint is one ``.safetensors`` file: the network's weights plus, in the safetensors header, a JSON
document under the key ``"textseg"``::

    {
      "format": "textseg-checkpoint", "format_version": 1,
      "architecture": "texlivernet",            # registry name (TextSegLib.models)
      "config": {...},                          # the architecture's config dataclass as a dict
      "text_encoder": {"source": "minilm", "max_tokens": 128},
      "preprocessing": {"size": [256, 256], "intensity": {"CT": {"kind": "window", "low": -200, "high": 200}}},
      "orientation": "LPS",                     # canonical orientation the network was trained in
      "threshold": 0.5,
      "name": "...", "description": "...", "example_prompts": ["..."],
      "training": {...},                        # summary: data, epochs, validation Dice, ...
      "textseg_version": "0.1.0",
      "external_weights": [],                   # state-dict prefixes the network builds itself (see models)
      "members": 1,                             # > 1: an ensemble of that many networks (models.ensemble)
      "weights_sha256": "..."                   # digest of the stored tensors, checked on every load
    }

Loading never unpickles anything (safetensors holds raw tensors only). The digest of the tensors detects files
modified after saving; the SHA-256 of the whole file identifies a checkpoint in segment tags and logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .models import (
    PretrainedUnavailableError,
    architectures,
    building_from_checkpoint,
    config_from_dict,
    create_model,
    get_spec,
)
from .models.ensemble import Ensemble
from .volumes import atomic_write

__all__ = [
    "SHIPPED_MODELS_DIR",
    "Catalogue",
    "CatalogueEntry",
    "CheckpointError",
    "CheckpointInfo",
    "file_sha256",
    "load_checkpoint",
    "read_checkpoint_info",
    "save_checkpoint",
    "user_models_dir",
    "weights_digest",
]

log = logging.getLogger("textseg")

FORMAT = "textseg-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "textseg"
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class CheckpointInfo:
    """Everything a checkpoint says about its model, without the weights."""

    architecture: str
    config: dict[str, Any]
    text_encoder: dict[str, Any]
    preprocessing: dict[str, Any]
    orientation: str = "LPS"
    threshold: float = 0.5
    name: str = ""
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    textseg_version: str = __version__
    external_weights: list[str] = field(default_factory=list)
    members: int = 1
    weights_sha256: str = ""
    path: Path | None = None
    sha256: str | None = None

    @property
    def id(self) -> str:
        """Catalogue id: the file name without ``.safetensors``."""
        if self.path is None:
            return self.name or self.architecture
        return self.path.name.removesuffix(".safetensors")

    def to_metadata(self) -> dict[str, Any]:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for item in dataclasses.fields(self):
            if item.name not in ("path", "sha256"):
                data[item.name] = getattr(self, item.name)
        return data

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any], path: Path | None = None) -> CheckpointInfo:
        names = {item.name for item in dataclasses.fields(cls)} - {"path", "sha256"}
        missing = [key for key in ("architecture", "config", "text_encoder", "preprocessing") if key not in data]
        if missing:
            raise CheckpointError(f"{_where(path)} lacks the metadata fields {', '.join(missing)}; it is damaged.")
        return cls(**{key: value for key, value in data.items() if key in names}, path=path)


def _where(path: Path | None) -> str:
    return f"The checkpoint {str(path)!r}" if path else "The checkpoint"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    architecture: str,
    text_encoder: Mapping[str, Any],
    preprocessing: Mapping[str, Any] | None = None,
    orientation: str = "LPS",
    threshold: float = 0.5,
    name: str = "",
    description: str = "",
    example_prompts: Iterable[str] = (),
    training: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Write ``model`` and its metadata to one ``.safetensors`` file (atomically: a temporary file is renamed).

    ``model.config`` must be the architecture's config dataclass; an :class:`~TextSegLib.models.ensemble.Ensemble`
    of such networks is saved as one model. ``preprocessing`` defaults to the architecture's registered default (the
    paper's). Returns the written checkpoint's info (with its SHA-256).
    """
    from safetensors.torch import save_file

    spec = get_spec(architecture)
    config = getattr(model, "config", None)
    if not isinstance(config, spec.config_class):
        raise TypeError(f"model.config must be a {spec.config_class.__name__} to save a {architecture} checkpoint")
    external = tuple(getattr(model, "external_weights", ()))
    state = {
        key: value.detach().cpu().contiguous()
        for key, value in model.state_dict().items()
        if not (external and key.startswith(external))
    }
    info = CheckpointInfo(
        architecture=architecture,
        config=json.loads(json.dumps(dataclasses.asdict(config))),
        text_encoder=dict(text_encoder),
        preprocessing=dict(preprocessing or spec.default_preprocessing),
        orientation=orientation,
        threshold=float(threshold),
        name=name,
        description=description,
        example_prompts=list(example_prompts),
        training=dict(training or {}),
        external_weights=list(external),
        members=len(model.members) if isinstance(model, Ensemble) else 1,
        weights_sha256=weights_digest(state),
    )
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps(info.to_metadata())}
    atomic_write(path, lambda temporary: save_file(state, temporary, metadata=metadata))
    info.path = path
    info.sha256 = file_sha256(path)
    return info


def read_checkpoint_info(path: str | os.PathLike[str], with_sha256: bool = True) -> CheckpointInfo:
    """Read a checkpoint's metadata from its header only (fast, no weights are read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Model file not found: {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{_where(path)} is damaged or incomplete (it may have been cut short while copying); "
            "copy or download it again."
        ) from error
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not a TextSeg checkpoint (it has no TextSeg metadata). "
            "Train or export a model with TextSeg's Training/ scripts."
        )
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{_where(path)} has unreadable metadata; it is damaged.") from error
    if data.get("format") != FORMAT or int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{_where(path)} uses checkpoint format {data.get('format')!r} version {data.get('format_version')}, "
            f"which this TextSeg ({__version__}) cannot read; update TextSeg."
        )
    info = CheckpointInfo.from_metadata(data, path)
    if with_sha256:
        info.sha256 = file_sha256(path)
    return info


def load_checkpoint(
    path: str | os.PathLike[str],
    expected_architecture: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, CheckpointInfo]:
    """Build the network a checkpoint describes and load its weights (eval mode, on ``device``).

    Raises :class:`CheckpointError` with a readable message for a missing, truncated or modified file, an
    architecture this TextSeg does not know or that differs from ``expected_architecture``, and weights that do
    not fit the architecture (missing, unexpected or mis-shaped tensors).
    """
    from safetensors.torch import load_file

    info = read_checkpoint_info(path)
    if expected_architecture is not None and info.architecture != expected_architecture:
        raise CheckpointError(
            f"{_where(info.path)} holds a {info.architecture} model, but a {expected_architecture} model was "
            "asked for."
        )
    if info.architecture not in architectures():
        raise CheckpointError(
            f"{_where(info.path)} needs the architecture {info.architecture!r}, which this TextSeg does not know "
            f"(known: {', '.join(architectures())}); update TextSeg."
        )
    try:
        config = config_from_dict(info.architecture, info.config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{_where(info.path)} has a config this TextSeg cannot build: {error}") from error
    try:
        state = load_file(str(info.path))
    except Exception as error:
        raise CheckpointError(
            f"{_where(info.path)} is damaged or incomplete (its tensors cannot be read); copy or download it again."
        ) from error
    if info.weights_sha256 and weights_digest(state) != info.weights_sha256:
        raise CheckpointError(
            f"{_where(info.path)} was modified or damaged after it was saved (its weights do not match the "
            "checksum recorded in it); use an untouched copy."
        )
    try:
        if info.members > 1:  # members.<i>.<prefix>: each member leaves out the same prefixes
            external = sorted({prefix.split(".", 2)[2] for prefix in info.external_weights})
            with building_from_checkpoint(external):
                model = Ensemble([create_model(info.architecture, config) for _ in range(info.members)])
        else:
            with building_from_checkpoint(info.external_weights):  # what the file stores is not fetched
                model = create_model(info.architecture, config)
    except PretrainedUnavailableError as error:
        raise CheckpointError(f"{_where(info.path)} needs pretrained weights that cannot be loaded: {error}") from error
    _load_state(model, state, info)
    return model.to(device).eval(), info


def describe_key_problems(groups: Iterable[tuple[str, list[str]]], shown: int = 5) -> str:
    """``"2 missing (a, b); 1 unexpected (c)"`` for the non-empty ``(label, keys)`` groups of a weights mismatch,
    naming at most ``shown`` keys per group."""
    problems = []
    for label, keys in groups:
        if keys:
            listed = ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
            problems.append(f"{len(keys)} {label} ({listed})")
    return "; ".join(problems)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], info: CheckpointInfo) -> None:
    expected = model.state_dict()
    external = tuple(info.external_weights)
    if external:  # built from their own source by the network's builder
        expected = {key: value for key, value in expected.items() if not key.startswith(external)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        problems = describe_key_problems(
            (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", mis_shaped)))
        raise CheckpointError(
            f"{_where(info.path)} does not fit the {info.architecture} architecture it names: "
            f"{problems}. It was saved from a different network or a different TextSeg version."
        )
    model.load_state_dict(state, strict=not external)


def user_models_dir() -> Path:
    """Folder of models the user imported: ``$TEXTSEG_MODELS_DIR``, else ``$XDG_DATA_HOME/textseg/models``
    (``~/.local/share/textseg/models``)."""
    if os.environ.get("TEXTSEG_MODELS_DIR"):
        return Path(os.environ["TEXTSEG_MODELS_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "textseg" / "models"


@dataclass(frozen=True)
class CatalogueEntry:
    """One model a user can pick."""

    id: str
    path: Path
    info: CheckpointInfo
    shipped: bool

    @property
    def title(self) -> str:
        return self.info.name or self.id

    @property
    def architecture_title(self) -> str:
        return get_spec(self.info.architecture).title if self.info.architecture in architectures() else "?"


class Catalogue:
    """The models shipped with TextSeg plus those in the user's models folder.

    Ids are file names without ``.safetensors``; an id in the shipped folder cannot be shadowed by a user file.
    Unreadable files are skipped with a warning rather than hiding every other model.
    """

    def __init__(self, user_dir: str | os.PathLike[str] | None = None, shipped_dir: Path = SHIPPED_MODELS_DIR):
        self.shipped_dir = Path(shipped_dir)
        self.user_dir = Path(user_dir) if user_dir is not None else user_models_dir()

    def entries(self) -> list[CatalogueEntry]:
        found: dict[str, CatalogueEntry] = {}
        for folder, shipped in ((self.shipped_dir, True), (self.user_dir, False)):
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.safetensors")):
                entry_id = path.name.removesuffix(".safetensors")
                if entry_id in found:
                    log.warning("Ignoring %s: a model with id %r is already in the catalogue", path, entry_id)
                    continue
                try:
                    info = read_checkpoint_info(path, with_sha256=False)
                except CheckpointError as error:
                    log.warning("Skipping %s: %s", path, error)
                    continue
                found[entry_id] = CatalogueEntry(entry_id, path, info, shipped)
        return list(found.values())

    def resolve(self, name_or_path: str | os.PathLike[str]) -> Path:
        """Path of a model given as a file path or a catalogue id."""
        candidate = Path(name_or_path).expanduser()
        if candidate.is_file():
            return candidate
        entries = self.entries()
        for entry in entries:
            if entry.id == str(name_or_path):
                return entry.path
        known = ", ".join(entry.id for entry in entries) or "none installed"
        raise CheckpointError(
            f"No model named {str(name_or_path)!r}: give a checkpoint file or one of the catalogue's models "
            f"({known}). `textseg models` lists them."
        )

    def import_model(self, path: str | os.PathLike[str], model_id: str | None = None) -> CatalogueEntry:
        """Check a checkpoint fully (weights included) and copy it into the user's models folder."""
        _, _info = load_checkpoint(path)
        entry_id = model_id or Path(path).name.removesuffix(".safetensors")
        if any(entry.id == entry_id for entry in self.entries()):
            raise CheckpointError(f"The catalogue already has a model {entry_id!r}; import it under another id.")
        target = self.user_dir / f"{entry_id}.safetensors"
        atomic_write(target, lambda temporary: shutil.copyfile(path, temporary))
        return CatalogueEntry(entry_id, target, read_checkpoint_info(target, with_sha256=False), shipped=False)
