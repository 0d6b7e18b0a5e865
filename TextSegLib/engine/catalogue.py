"""The catalogue: the models a user can pick, shipped with TextSeg (``TextSegLib/weights``) or imported into the
user's models folder (:func:`TextSegLib.core.settings.user_models_dir`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from TextSegLib.core.files import atomic_write, check_writable
from TextSegLib.core.settings import user_models_dir
from TextSegLib.engine.checkpoints import CheckpointError, CheckpointInfo, load_checkpoint, read_checkpoint_info
from TextSegLib.models.registry import architectures, config_from_dict, get_spec

__all__ = [
    "SHIPPED_MODELS_DIR",
    "Catalogue",
    "CatalogueEntry",
    "check_model_id",
]

log = logging.getLogger("textseg")

SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[1] / "weights"


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
        target = self.user_dir / f"{entry_id}.safetensors"
        check_writable(target, "model")  # a read-only or blocked models folder: said before the check of the file
        load_checkpoint(path)
        if any(entry.id == entry_id for entry in self.entries()) or target.exists():
            raise CheckpointError(f"The catalogue already has a model {entry_id!r}; import it under another id.")
        atomic_write(target, lambda temporary: shutil.copyfile(path, temporary), overwrite=False)
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
