"""Model registry: architecture names mapped to a config dataclass, presets and a builder.

Each network lives in its own file and registers itself with :func:`register` when it is imported; importing any
module of ``TextSegLib.models`` first runs the package's ``__init__``, which imports the three networks, so the
registry is always complete. Everything outside this package
builds networks through :func:`create_model` from a plain config dict (as stored in checkpoints), so a new
architecture needs no change to the engine, the checkpoint format or the command line.

Every registered network follows one interface:

* ``forward(image, text) -> logits``: ``image`` is ``(B, C_in, H, W)``, ``text`` a
  :class:`TextSegLib.text.features.TextFeatures` with ``B`` rows (or 1 row, broadcast); ``logits`` is ``(B, 1, H, W)``.
* ``forward_train(image, text) -> dict``: ``"logits"`` plus whatever the architecture's loss needs
  (auxiliary heads, divergence terms).
* ``config``: the dataclass it was built from.
* optionally ``external_weights``: state-dict prefixes of frozen pretrained weights that the builder loads
  itself from a source named in the config (a CLIP vision tower, say). Checkpoints leave those tensors out and
  loading takes them from the freshly built network; without the attribute checkpoints are self-contained.
  While a checkpoint is loaded, :func:`checkpoint_external_weights` tells a builder which prefixes the file leaves
  out, so it never fetches pretrained weights the file stores (a fine-tuned backbone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from TextSegLib.core.configs import lists_as_tuples
from TextSegLib.core.errors import TextSegError
from TextSegLib.core.messages import unknown_keys

__all__ = [
    "ModelSpec",
    "RegistryError",
    "architectures",
    "building_from_checkpoint",
    "checkpoint_external_weights",
    "config_from_dict",
    "create_model",
    "get_spec",
    "preset_config",
    "register",
]


class RegistryError(TextSegError, KeyError):
    """A name the registry does not know: an architecture, or a preset of one (the message lists the known ones)."""

    def __str__(self) -> str:  # the message as given, not quoted as KeyError quotes a missing key
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture.

    Attributes:
        name: registry key, also stored in checkpoints (``"texlivernet"``).
        config_class: dataclass holding every constructor argument of the network.
        builder: ``config -> nn.Module``.
        presets: named configs (``"paper"``, ``"small"``) as keyword overrides of the dataclass defaults.
        default_preprocessing: preprocessing metadata written into checkpoints of this architecture.
        loss: ``config -> callable(outputs, target) -> dict`` building the paper's training loss.
        title: human-readable name of the paper's network.
        default_text_encoder: the text encoder source the paper uses (see ``TextSegLib.text``).
        describe_text: ``config -> str``, what the prompt does in a network of that config, in plain words (shown
            by ``textseg models`` and the Slicer module); None when the architecture does not say.
        checkpoint_defaults: config values for keys that checkpoints saved before the key existed lack: what
            those networks were built and trained with (checkpoints store every key, so a missing one means an
            older checkpoint).
        input_range: the intensity range every modality must be normalised into, when a pretrained tower fixes
            it (FreqMedCLIP's ViT: ``(0, 1)``); training refuses preprocessing that leaves it.
    """

    name: str
    config_class: type
    builder: Callable[[Any], nn.Module]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_preprocessing: Mapping[str, Any] = field(default_factory=dict)
    loss: Callable[[Any], Callable[..., dict]] | None = None
    title: str = ""
    default_text_encoder: str = ""
    describe_text: Callable[[Any], str] | None = None
    checkpoint_defaults: Mapping[str, Any] = field(default_factory=dict)
    input_range: tuple[float, float] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add an architecture to the registry (called once by each model file at import)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def architectures() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; a :class:`RegistryError` (a ``KeyError``) lists the known names
    otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise RegistryError(f"unknown architecture {name!r}; this TextSeg knows: {known}") from None


def config_from_dict(name: str, values: Mapping[str, Any] | None = None):
    """Build the config dataclass of ``name`` from a dict, rejecting unknown keys with a readable error."""
    spec = get_spec(name)
    values = dict(values or {})
    known = (f.name for f in dataclasses.fields(spec.config_class))
    problem = unknown_keys(values, known, f"unknown {name} config keys")
    if problem:
        raise ValueError(problem)
    return spec.config_class(**lists_as_tuples(spec.config_class, values))


def preset_config(name: str, preset: str = "paper", **overrides: Any):
    """Config of a named preset (``"paper"`` widths or ``"small"`` for CPU use) with optional overrides."""
    spec = get_spec(name)
    if preset not in spec.presets:
        raise RegistryError(f"{name} has no preset {preset!r}; presets: {', '.join(sorted(spec.presets))}")
    return config_from_dict(name, {**spec.presets[preset], **overrides})


def create_model(name: str, config: Mapping[str, Any] | Any | None = None) -> nn.Module:
    """Build an untrained network of architecture ``name`` from a config dataclass or dict."""
    spec = get_spec(name)
    if config is None or isinstance(config, Mapping):
        config = config_from_dict(name, config)
    return spec.builder(config)


_CHECKPOINT_EXTERNAL: ContextVar[tuple[str, ...] | None] = ContextVar("checkpoint_external", default=None)


@contextmanager
def building_from_checkpoint(external_weights: tuple[str, ...] | list[str]) -> Iterator[None]:
    """Networks built inside this block get their weights from a checkpoint that stores every tensor except those
    under ``external_weights``: builders then skip loading pretrained weights the checkpoint holds (a fine-tuned
    backbone), so loading such a checkpoint needs nothing but its file."""
    token = _CHECKPOINT_EXTERNAL.set(tuple(external_weights))
    try:
        yield
    finally:
        _CHECKPOINT_EXTERNAL.reset(token)


def checkpoint_external_weights() -> tuple[str, ...] | None:
    """Inside :func:`building_from_checkpoint`: the prefixes the checkpoint leaves out; outside: None."""
    return _CHECKPOINT_EXTERNAL.get()
