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
      "weights_sha256": "...",                  # digest of the stored tensors, checked on every load
      "digest": "..."                           # digest of everything that changes a result (below)
    }

Loading never unpickles anything (safetensors holds raw tensors only). Two digests detect files modified after
saving: ``weights_sha256`` over the tensors, checked when the weights are loaded, and ``digest`` over the fields
that change a result (``RESULT_FIELDS``: architecture, config, text encoder, preprocessing, orientation, threshold,
external weights and ``weights_sha256`` itself), checked whenever the header is read. Name, description, example
prompts and the training summary are not covered: editing them changes no result. The digests detect edits and
damage, not an attacker (anyone can compute them); files are still only ever read as raw tensors. The SHA-256 of
the whole file identifies a checkpoint in segment tags and logs.

Format version 1 had only the weights digest; such files are refused until :func:`sign_checkpoint` records the
digest of their settings (``python -m TextSegLib.checkpoints sign FILE``; this is how the shipped demo checkpoint
was upgraded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .common import TextSegError, atomic_write
from .models import (
    PretrainedUnavailableError,
    architectures,
    building_from_checkpoint,
    config_from_dict,
    create_model,
    get_spec,
)
from .models.ensemble import Ensemble

__all__ = [
    "SHIPPED_MODELS_DIR",
    "Catalogue",
    "CatalogueEntry",
    "CheckpointError",
    "CheckpointInfo",
    "check_model_id",
    "file_sha256",
    "load_checkpoint",
    "metadata_digest",
    "read_checkpoint_info",
    "save_checkpoint",
    "sign_checkpoint",
    "user_models_dir",
    "weights_digest",
]

log = logging.getLogger("textseg")

FORMAT = "textseg-checkpoint"
FORMAT_VERSION = 2
METADATA_KEY = "textseg"
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "weights"
RESULT_FIELDS = ("architecture", "config", "text_encoder", "preprocessing", "orientation", "threshold",
                 "external_weights", "weights_sha256")


class CheckpointError(TextSegError, ValueError):
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
    digest: str = ""
    path: Path | None = None
    sha256: str | None = None

    @property
    def id(self) -> str:
        """Catalogue id: the file name without ``.safetensors``."""
        if self.path is None:
            return self.name or self.architecture
        return self.path.name.removesuffix(".safetensors")

    def to_metadata(self) -> dict[str, Any]:
        """The header document, with ``digest`` computed from the other fields."""
        data = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for item in dataclasses.fields(self):
            if item.name not in ("path", "sha256", "digest"):
                data[item.name] = getattr(self, item.name)
        data["digest"] = metadata_digest(data)
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


def metadata_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of the header fields that change a result (``RESULT_FIELDS``), as canonical JSON."""
    covered = {key: data.get(key) for key in ("format", *RESULT_FIELDS)}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _settings_problem(info: CheckpointInfo) -> str | None:
    """What is wrong with a checkpoint's settings, or None."""
    from .volumes import CanonicalTransform

    if not isinstance(info.architecture, str) or not info.architecture:
        return "its architecture is not a name"
    for name in ("config", "text_encoder", "preprocessing"):
        if not isinstance(getattr(info, name), dict):
            return f"its {name} is not a JSON object"
    if not isinstance(info.text_encoder.get("source"), str):
        return "it names no text encoder source"
    if not isinstance(info.orientation, str):
        return "its orientation is not a code such as 'LPS'"
    try:
        CanonicalTransform.create(np.eye(3), info.orientation)
    except (KeyError, ValueError):
        return f"its orientation {info.orientation!r} is not a code such as 'LPS' or 'RAS'"
    threshold = info.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
        return f"its threshold {threshold!r} does not lie between 0 and 1"
    if not isinstance(info.external_weights, list) or not all(isinstance(k, str) for k in info.external_weights):
        return "its external_weights is not a list of names"
    if not isinstance(info.weights_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", info.weights_sha256):
        return "it records no digest of its weights"
    try:
        from .preprocessing import Preprocessing

        Preprocessing.from_metadata(info.preprocessing)
    except (KeyError, TypeError, ValueError) as error:
        return f"its preprocessing cannot be used ({error})"
    return None


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
    problem = _settings_problem(info)
    if problem:
        raise ValueError(f"Cannot save the checkpoint: {problem}.")
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps(info.to_metadata())}
    atomic_write(path, lambda temporary: save_file(state, temporary, metadata=metadata))
    info.path = path
    info.digest = metadata_digest(info.to_metadata())
    info.sha256 = file_sha256(path)
    return info


_IMAGE_MAGIC = (b"NRRD", b"ObjectType", b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")


def _what_else(path: Path) -> str | None:
    """Why ``path`` is not a safetensors file at all (a folder, a pickle, an image, ...), or None when it looks like
    one (possibly cut short)."""
    if path.is_dir():
        return (f"{str(path)!r} is a folder, not a checkpoint; give the .safetensors file in it, or a catalogue id "
                "(`textseg models` lists them).")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if len(head) < 10 or (head[8:10] in (b'{"', b"{}")):
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return (f"{str(path)!r} is a PyTorch pickle (torch.save), which TextSeg never loads because unpickling can "
                "run any code; save the model as a TextSeg checkpoint (TextSegLib.checkpoints.save_checkpoint) "
                "where it was trained.")
    nifti = int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    if head.startswith(_IMAGE_MAGIC) or head[128:132] == b"DICM" or nifti or head[:2] == b"\x1f\x8b":
        return (f"{str(path)!r} is an image, not a model; give it as the input and a checkpoint (.safetensors) or a "
                "catalogue id with -m.")
    return (f"{str(path)!r} is not a TextSeg checkpoint (a .safetensors file); give a checkpoint or a catalogue id "
            "(`textseg models` lists them).")


def read_checkpoint_info(path: str | os.PathLike[str], with_sha256: bool = True) -> CheckpointInfo:
    """Read a checkpoint's metadata from its header only (fast, no weights are read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Model file not found: {str(path)!r}.")
    problem = _what_else(path)
    if problem:
        raise CheckpointError(problem)
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
    if not isinstance(data, dict):
        raise CheckpointError(f"{_where(path)} has unreadable metadata; it is damaged.")
    version = data.get("format_version")
    if data.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{_where(path)} uses checkpoint format {data.get('format')!r} version {version}, "
            f"which this TextSeg ({__version__}) cannot read; update TextSeg."
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{_where(path)} was saved before TextSeg recorded a digest of its settings, so edits to them cannot be "
            f"detected; if you trust the file, sign it: python -m TextSegLib.checkpoints sign {str(path)!r}"
        )
    try:
        expected = metadata_digest(data)
    except ValueError:  # NaN or infinity in a setting: not what save_checkpoint writes
        expected = None
    if expected is None or data.get("digest") != expected:
        raise CheckpointError(
            f"{_where(path)} was modified after it was saved (its settings, such as threshold, orientation or "
            "preprocessing, do not match the digest recorded in it); use an untouched copy."
        )
    info = CheckpointInfo.from_metadata(data, path)
    problem = _settings_problem(info)
    if problem:
        raise CheckpointError(f"{_where(path)} cannot be used: {problem}.")
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
        config = config_from_dict(info.architecture, {**get_spec(info.architecture).checkpoint_defaults,
                                                      **info.config})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{_where(info.path)} has a config this TextSeg cannot build: {error}") from error
    try:
        state = load_file(str(info.path))
    except Exception as error:
        raise CheckpointError(
            f"{_where(info.path)} is damaged or incomplete (its tensors cannot be read); copy or download it again."
        ) from error
    if weights_digest(state) != info.weights_sha256:
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

    @property
    def text_role(self) -> str:
        """What the prompt does in this model's network, from its architecture and config ("" if unknown)."""
        if self.info.architecture not in architectures():
            return ""
        spec = get_spec(self.info.architecture)
        try:
            return spec.describe_text(config_from_dict(spec.name, self.info.config)) if spec.describe_text else ""
        except (TypeError, ValueError):  # a config this version cannot read: loading it says why
            return ""


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
        if candidate.exists():
            return candidate
        text = str(name_or_path)
        if "/" in text or os.sep in text or text.endswith(".safetensors"):
            raise CheckpointError(f"Model file not found: {text!r}.")
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
        """Check a checkpoint fully (weights included) and copy it into the user's models folder under ``model_id``
        (default: the file name, with anything but letters, digits, ``_``, ``-``, ``+`` and ``.`` made ``-``).
        Raises :class:`CheckpointError` for an id that is not a plain name (see :func:`check_model_id`) or is
        taken."""
        if model_id is None:  # the file name, made a plain name
            model_id = re.sub(r"[^\w.+-]+", "-", Path(path).name.removesuffix(".safetensors")).strip("-.") or "model"
        entry_id = check_model_id(model_id)
        load_checkpoint(path)
        target = self.user_dir / f"{entry_id}.safetensors"
        if any(entry.id == entry_id for entry in self.entries()) or target.exists():
            raise CheckpointError(f"The catalogue already has a model {entry_id!r}; import it under another id.")
        atomic_write(target, lambda temporary: shutil.copyfile(path, temporary))
        return CatalogueEntry(entry_id, target, read_checkpoint_info(target, with_sha256=False), shipped=False)


def check_model_id(model_id: object) -> str:
    """Return ``model_id`` if it is a catalogue id: a name of letters, digits, ``_``, ``-``, ``+`` and ``.``
    (not first), at most 100 characters; never a path. Raises :class:`CheckpointError` otherwise."""
    if not isinstance(model_id, str) or not re.fullmatch(r"\w[\w.+-]{0,99}", model_id):
        raise CheckpointError(
            f"The model id {model_id!r} is not a name: use letters, digits, '_', '-', '+' and '.' (not first), "
            "without '/' or spaces; an id names a model in your models folder, never a path."
        )
    return model_id


def sign_checkpoint(path: str | os.PathLike[str], target: str | os.PathLike[str] | None = None) -> CheckpointInfo:
    """Record the digests of a checkpoint's current weights and settings (format version 2) in ``target`` (default:
    the file itself, replaced atomically). For checkpoints saved before version 2, and after a deliberate edit of
    a checkpoint's settings. Refuses files whose weights do not match the weights digest they record."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            data = json.loads((handle.metadata() or {})[METADATA_KEY])
        state = load_file(str(path))
    except Exception as error:  # safetensors, JSON and key errors: not a readable TextSeg checkpoint
        raise CheckpointError(f"{_where(path)} is not a readable TextSeg checkpoint ({error}).") from error
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{_where(path)} is not a TextSeg checkpoint.")
    digest = weights_digest(state)
    if data.get("weights_sha256") and data["weights_sha256"] != digest:
        raise CheckpointError(f"{_where(path)}: its weights do not match the checksum recorded in it; not signed.")
    data.update(format_version=FORMAT_VERSION, weights_sha256=digest)
    info = CheckpointInfo.from_metadata(data, path)
    problem = _settings_problem(info)
    if problem:
        raise CheckpointError(f"{_where(path)} cannot be signed: {problem}.")
    target = Path(target) if target is not None else path
    metadata = {METADATA_KEY: json.dumps(info.to_metadata())}
    atomic_write(target, lambda temporary: save_file(state, temporary, metadata=metadata))
    return read_checkpoint_info(target)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "sign":
        sys.exit("usage: python -m TextSegLib.checkpoints sign CHECKPOINT [SIGNED_COPY]")
    signed = sign_checkpoint(*sys.argv[2:])
    print(f"Signed {signed.path} (SHA-256 {signed.sha256})")
