"""Training configuration: a TOML file with sections, overridable from the command line.

Example (``Training/configs/texlivernet.toml`` holds the paper's recipe)::

    [model]
    architecture = "texlivernet"
    preset = "paper"

    [data]
    manifest = "data/manifest.csv"     # relative to this file

    [optim]
    lr = 3e-4
    min_lr = 1e-4

    [train]
    epochs = 200
    batch_size = 32                    # global: per process = batch_size / (processes x accumulation)

Every field is listed, with its default, in the dataclasses below. ``--set section.key=value`` overrides a field
(the value is read as TOML: ``--set train.epochs=3``, ``--set model.overrides={dropout=0.0}``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from TextSegLib.core.configs import lists_as_tuples
from TextSegLib.core.messages import unknown_keys

__all__ = ["TrainConfig", "load_config"]


@dataclass
class ModelSection:
    architecture: str = "texlivernet"
    preset: str = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str = ""  # start from this checkpoint's weights (fresh optimizer and schedule): a second training stage


@dataclass
class TextSection:
    encoder: str = ""  # default: the architecture's paper encoder (ModelSpec.default_text_encoder)
    max_tokens: int | None = None  # default: the network's max_text_tokens when it has one


@dataclass
class DataSection:
    manifest: str = ""  # CSV/JSONL manifest of 3D volumes (TextSegLib.io.manifests)
    lvit_images: str = ""  # or LViT's 2D layout: image folder, mask folder, text table
    lvit_masks: str = ""
    lvit_texts: str = ""
    lvit_mask_name: str = "{name}"  # mask file name from the image's: "{name}", "mask_{name}", "{stem}_mask.png"
    lvit_mask_rule: str = "majority"  # or "lvit": masks shrunk as LViT's loader does (Training.data.MASK_RULES)
    # LViT's own validation split (MoNuSeg's Val_Folder): with lvit_val_images, validation reads these and the
    # whole of lvit_images trains (val_fraction is not used); without, val_fraction of the patients is held out.
    lvit_val_images: str = ""
    lvit_val_masks: str = ""
    lvit_val_texts: str = ""
    val_fraction: float = 0.2
    test_fraction: float = 0.0  # patients held out of training and validation (listed in the checkpoint)
    stratify: str = ""  # "modality": every modality gives its share of each split
    split_seed: int = 0
    # Training slices: "lesion" (those showing the target, so no slice is trained with a description of a lesion it
    # does not show) or "all" (empty targets on the rest: say in the recipe why). Validation always uses every slice.
    slices: str = "lesion"
    empty_fraction: float = 1.0  # share of lesion-free training slices kept when slices = "all"
    min_content: float = 0.0  # training slices with less visible content than this share are dropped
    sampling: str = "uniform"  # or "balanced": as many slices with the target as without, every epoch
    samples_per_epoch: int | None = None  # slices drawn per epoch (default: all): short epochs on a large dataset
    orientation: str = "LPS"
    preprocessing: dict[str, Any] = field(default_factory=dict)  # default: the architecture's


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    t_max: int | None = None  # cosine period in epochs (default: train.epochs)
    restarts: bool = False  # restart the cosine every t_max epochs (SGDR) instead of staying at min_lr after it


@dataclass
class TrainSection:
    epochs: int = 200
    batch_size: int = 32
    accumulation: int = 1
    amp: bool = True  # autocast to bf16 on CUDA and on CPUs with native bf16 (trainer.amp_dtype); false: fp32
    clip_grad_norm: float | None = 1.0
    seed: int = 0
    early_stop_patience: int | None = None
    num_workers: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, profiling)
    device: str = "auto"


@dataclass
class AugmentSection:
    scale: tuple[float, float] | None = (0.8, 1.2)
    rotate_degrees: float = 0.0
    intensity_shift: float = 0.0
    text_noise: float = 0.0  # Gaussian noise on each prompt's features, this share of their norm (Training/data.py)


@dataclass
class ExportSection:
    name: str = ""
    description: str = ""
    example_prompts: list[str] = field(default_factory=list)
    threshold: float = 0.5
    components: str = "all"  # or "largest": inference keeps the mask's largest connected part by default
    select: str = "best"  # "best" validation Dice, or "last" epoch (also used when there is no validation set)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    text: TextSection = field(default_factory=TextSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    export: ExportSection = field(default_factory=ExportSection)
    base_dir: Path = Path(".")  # folder that relative data paths are read from (the config file's)

    def resolve(self, relative: str) -> Path:
        return (self.base_dir / relative).resolve() if relative else Path()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("base_dir")
        return data


def _section(cls, values: dict[str, Any], name: str):
    problem = unknown_keys(values, (f.name for f in dataclasses.fields(cls)), f"[{name}] has unknown keys")
    if problem:
        raise ValueError(problem)
    return cls(**lists_as_tuples(cls, values))


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, separator, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not separator or not dot:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return section, name, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config (missing sections and keys take their defaults) and apply ``section.key=value``
    overrides."""
    raw: dict[str, dict[str, Any]] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        base = path.resolve().parent
    for override in overrides or []:
        section, name, value = _parse_override(override)
        raw.setdefault(section, {})[name] = value
    sections = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "base_dir"}
    problem = unknown_keys(raw, sections, "unknown config sections")
    if problem:
        raise ValueError(problem)
    values = {name: _section(type(getattr(TrainConfig(), name)), raw.get(name, {}), name) for name in sections}
    return TrainConfig(**values, base_dir=base)
