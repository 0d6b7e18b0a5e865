"""The single-file checkpoint format and the catalogue of models a user can pick.

A TextSeg checkpoint is one ``.safetensors`` file: the network's weights plus, in the safetensors header, a JSON
document under the key ``"textseg"``::

    {
      "format": "textseg-checkpoint", "format_version": 1,
      "architecture": "texlivernet",            # registry name (TextSegLib.models.registry)
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
digest of their settings (``textseg sign FILE``; this is how the shipped demo checkpoint was upgraded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from TextSegLib import __version__
from TextSegLib.core.errors import PretrainedUnavailableError, TextSegError
from TextSegLib.core.files import atomic_write, check_readable_file
from TextSegLib.core.messages import describe_key_problems
from TextSegLib.core.options import COMPONENTS, check_threshold
from TextSegLib.models.ensemble import Ensemble
from TextSegLib.models.registry import architectures, building_from_checkpoint, config_from_dict, create_model, get_spec

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "file_sha256",
    "load_checkpoint",
    "metadata_digest",
    "read_checkpoint_info",
    "save_checkpoint",
    "save_like",
    "sign_checkpoint",
    "weights_digest",
]

log = logging.getLogger("textseg")

FORMAT = "textseg-checkpoint"
FORMAT_VERSION = 2
METADATA_KEY = "textseg"
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
    components: str = "all"
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
    from TextSegLib.io.volumes import CanonicalTransform

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
    try:
        check_threshold(info.threshold)
    except TextSegError:
        return f"its threshold {info.threshold!r} does not lie between 0 and 1"
    if info.components not in COMPONENTS:
        return f"its components {info.components!r} is not one of {', '.join(COMPONENTS)}"
    if not isinstance(info.external_weights, list) or not all(isinstance(k, str) for k in info.external_weights):
        return "its external_weights is not a list of names"
    if not isinstance(info.weights_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", info.weights_sha256):
        return "it records no digest of its weights"
    try:
        from TextSegLib.engine.preprocessing import Preprocessing

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
    components: str = "all",
    name: str = "",
    description: str = "",
    example_prompts: Iterable[str] = (),
    training: Mapping[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> CheckpointInfo:
    """Write ``model`` and its metadata to one ``.safetensors`` file (atomically: a temporary file is renamed).

    ``model.config`` must be the architecture's config dataclass; an :class:`~TextSegLib.models.ensemble.Ensemble`
    of such networks is saved as one model. ``preprocessing`` defaults to the architecture's registered default (the
    paper's). ``weights_dtype`` (e.g. ``torch.float16``) stores the floating-point tensors in that type (loading
    casts them back to the network's); a value it cannot hold raises ``ValueError``. Returns the written
    checkpoint's info (with its SHA-256).
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
    if weights_dtype is not None:
        largest = torch.finfo(weights_dtype).max
        too_large = sorted(key for key, value in state.items()
                           if value.is_floating_point() and bool((value.abs() > largest).any()))
        if too_large:
            raise ValueError(f"Cannot store the weights as {weights_dtype}: {too_large[0]} holds values beyond "
                             f"{largest:g}.")
        state = {key: value.to(weights_dtype) if value.is_floating_point() else value for key, value in state.items()}
    info = CheckpointInfo(
        architecture=architecture,
        config=json.loads(json.dumps(dataclasses.asdict(config))),
        text_encoder=dict(text_encoder),
        preprocessing=dict(preprocessing or spec.default_preprocessing),
        orientation=orientation,
        threshold=float(threshold),
        components=components,
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


def save_like(
    path: str | os.PathLike[str],
    model: nn.Module,
    info: CheckpointInfo,
    *,
    description: str | None = None,
    training: Mapping[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> CheckpointInfo:
    """Write ``model`` with every setting of the checkpoint ``info`` describes (architecture, text encoder,
    preprocessing, orientation, threshold, components, name, example prompts); ``description`` and ``training``
    replace its own where given. For tools that rewrite a checkpoint's weights (an fp16 copy, a weight average)."""
    return save_checkpoint(
        path, model, architecture=info.architecture, text_encoder=info.text_encoder,
        preprocessing=info.preprocessing, orientation=info.orientation, threshold=info.threshold,
        components=info.components, name=info.name,
        description=info.description if description is None else description,
        example_prompts=info.example_prompts, training=info.training if training is None else training,
        weights_dtype=weights_dtype,
    )


_IMAGE_MAGIC = (b"NRRD", b"ObjectType", b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")


def _safetensors_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path` if it names a file that looks like a safetensors file (possibly cut short); else a
    :class:`CheckpointError` that says what it is instead (missing, a folder, a pickle, an image, ...)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Model file not found: {str(path)!r}.")
    problem = _what_else(path)
    if problem:
        raise CheckpointError(problem)
    return path


def _what_else(path: Path) -> str | None:
    """Why ``path`` is not a safetensors file at all (a folder, a pickle, an image, ...), or None when it looks like
    one (possibly cut short)."""
    if path.is_dir():
        return (f"{str(path)!r} is a folder, not a checkpoint; give the .safetensors file in it, or a catalogue id "
                "(`textseg models` lists them).")
    try:
        check_readable_file(path, "model")
    except TextSegError as error:  # a FIFO or a device: opening it could wait for ever
        return str(error)
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as error:
        return f"{str(path)!r} cannot be read ({error.strerror or error}); check the file and its permissions."
    if len(head) < 10 or (head[8:10] in (b'{"', b"{}")):
        return None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return (f"{str(path)!r} is a PyTorch pickle (torch.save), which TextSeg never loads because unpickling can "
                "run any code; save the model as a TextSeg checkpoint (TextSegLib.engine.checkpoints.save_checkpoint) "
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

    path = _safetensors_file(path)
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
            f"detected; if you trust the file, sign it: textseg sign {str(path)!r}"
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
    except (TypeError, ValueError) as error:  # the networks check their configs as they are built
        raise CheckpointError(f"{_where(info.path)} has a config this TextSeg cannot build: {error}") from error
    _load_state(model, state, info)
    return model.to(device).eval(), info


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


def sign_checkpoint(path: str | os.PathLike[str], target: str | os.PathLike[str] | None = None) -> CheckpointInfo:
    """Record the digests of a checkpoint's current weights and settings (format version 2) in ``target`` (default:
    the file itself, replaced atomically). For checkpoints saved before version 2, and after a deliberate edit of
    a checkpoint's settings (``textseg sign``). Refuses files whose weights do not match the weights digest they
    record, and files of a format version this TextSeg does not know."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = _safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            data = json.loads((handle.metadata() or {})[METADATA_KEY])
        state = load_file(str(path))
    except Exception as error:  # safetensors, JSON and key errors: not a readable TextSeg checkpoint
        raise CheckpointError(f"{_where(path)} is not a readable TextSeg checkpoint ({error}).") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{_where(path)} is not a TextSeg checkpoint.")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{_where(path)} uses checkpoint format version {version!r}, which this TextSeg "
                              f"({__version__}) cannot read; update TextSeg.")
    digest = weights_digest(state)
    if data.get("weights_sha256") and data["weights_sha256"] != digest:
        raise CheckpointError(f"{_where(path)}: its weights do not match the checksum recorded in it; not signed.")
    data.update(format_version=FORMAT_VERSION, weights_sha256=digest)
    info = CheckpointInfo.from_metadata(data, path)
    problem = _settings_problem(info)
    if problem:
        raise CheckpointError(f"{_where(path)} cannot be signed: {problem}.")
    try:
        metadata = {METADATA_KEY: json.dumps(info.to_metadata())}
    except ValueError as error:  # NaN or infinity in the config: no digest can be computed
        raise CheckpointError(f"{_where(path)} cannot be signed: its settings hold a value that is not a finite "
                              "number.") from error
    target = Path(target) if target is not None else path
    atomic_write(target, lambda temporary: save_file(state, temporary, metadata=metadata))
    return read_checkpoint_info(target)
