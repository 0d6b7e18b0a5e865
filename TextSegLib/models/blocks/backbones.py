"""Pretrained backbones from open_clip and timm, cut down to what a segmentation network reads.

* :func:`load_open_clip_vision_tower` builds the image tower of an open_clip model named by a source string (for
  ``local-dir:`` and ``hf-hub:`` the tower alone, so the text tower's files are never needed);
  :func:`build_open_clip_vision_tower` builds one from its recorded config, without any source.
* :class:`ViTTokenEncoder` exposes that tower's patch embedding and transformer blocks one by one, so a network
  can read (and modify) the hidden states between blocks. Both kinds of open_clip image tower are supported:
  open_clip's own ``VisionTransformer`` (OpenAI CLIP, local configs with ``layers``/``width``) and a timm ViT
  wrapped by ``TimmModel`` (BiomedCLIP's ``vit_base_patch16_224``). :func:`vit_token_encoder` builds one from a
  recorded config, a plain ViT with TextSeg's own blocks (:mod:`.vit`) and without importing open_clip.
* :class:`ConvNeXtPyramid` is a ConvNeXt (TextSeg's own stages, timm's ImageNet weights when asked for) whose
  patchify stem is replaced by a stride-1 convolution for inputs with any number of channels, returning the four
  stage outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from TextSegLib.core.errors import PretrainedUnavailableError
from TextSegLib.core.messages import first_line
from TextSegLib.text.sources import _WEIGHT_SUFFIXES, open_clip_source_has_weights

from .convnext import CONVNEXT_V1, NORM_EPS, ConvNeXtStage, init_convnext_weights
from .convs import LayerNorm2d
from .vit import PlainViTConfig, TokenLayerNorm, TransformerBlock, plain_vit_config

__all__ = [
    "BackboneUnavailableError",
    "ConvNeXtPyramid",
    "ViTTokenEncoder",
    "build_open_clip_vision_tower",
    "load_open_clip_vision_tower",
    "vit_token_encoder",
]

# open_clip's own preference among the weight files of a folder
_PREFERRED_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


class BackboneUnavailableError(PretrainedUnavailableError):
    """A pretrained backbone that cannot be built (not downloaded, no hub access, unknown name)."""


def _unavailable(source: str, error: BaseException) -> BackboneUnavailableError:
    return BackboneUnavailableError(
        f"The open_clip image tower {source!r} could not be loaded ({first_line(error)}). Give 'local-dir:<folder>' "
        "with open_clip_config.json and weights, or download it once on a machine with access to the hub."
    )


def build_open_clip_vision_tower(tower_cfg: dict) -> nn.Module:
    """An open_clip image tower with random weights from ``{"embed_dim", "vision_cfg", "quick_gelu"}`` (what
    :func:`load_open_clip_vision_tower` returns as the tower's config). Nothing is fetched: a timm tower is built
    without its ImageNet weights."""
    from open_clip.model import _build_vision_tower  # open_clip builds CLIP's image tower with it

    vision_cfg = {**tower_cfg["vision_cfg"], "timm_model_pretrained": False}
    return _build_vision_tower(int(tower_cfg["embed_dim"]), vision_cfg, bool(tower_cfg.get("quick_gelu", False)))


def vit_token_encoder(tower_cfg: dict, depth: int) -> ViTTokenEncoder:
    """A :class:`ViTTokenEncoder` of ``depth`` blocks, random weights, for the tower ``tower_cfg`` describes (as
    :func:`load_open_clip_vision_tower` records it): a plain ViT from TextSeg's own modules (open_clip is not
    imported), any other tower through :func:`build_open_clip_vision_tower`."""
    plain = plain_vit_config(tower_cfg)
    return ViTTokenEncoder(plain if plain is not None else build_open_clip_vision_tower(tower_cfg), depth)


def _tower_config(model_cfg: dict) -> dict:
    return {"embed_dim": model_cfg["embed_dim"], "vision_cfg": dict(model_cfg["vision_cfg"]),
            "quick_gelu": bool(model_cfg.get("quick_gelu", False))}


def _vision_only(source: str, model_cfg: dict, checkpoint: str | None) -> nn.Module:
    """The image tower alone, its weights the ``visual.`` tensors of ``checkpoint`` (the text tower, whose config
    may live on the hub, is never built)."""
    from open_clip.factory import load_state_dict

    tower = build_open_clip_vision_tower(_tower_config(model_cfg))
    if checkpoint is not None:
        state = {key[len("visual."):]: value for key, value in load_state_dict(checkpoint).items()
                 if key.startswith("visual.")}
        problems = tower.load_state_dict(state, strict=False)
        if not state or problems.missing_keys or problems.unexpected_keys:
            raise BackboneUnavailableError(
                f"The weights {checkpoint!r} do not fit the image tower that {source!r} describes "
                f"({len(problems.missing_keys)} tensors missing, {len(problems.unexpected_keys)} unexpected); "
                "the folder mixes files of different models."
            )
    return tower


def _local_dir(source: str, folder: Path, weights: bool) -> tuple[dict, str | None]:
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise BackboneUnavailableError(
            f"The open_clip image tower {source!r} could not be loaded: {str(config_path)!r} does not exist. "
            "A local-dir folder holds open_clip_config.json and the weights (open_clip_pytorch_model.bin or "
            "open_clip_model.safetensors)."
        )
    try:
        model_cfg = json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]
    except (ValueError, KeyError) as error:
        raise BackboneUnavailableError(f"{str(config_path)!r} is not an open_clip config (no model_cfg).") from error
    checkpoint = None
    if weights:
        found = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES),
                       key=lambda p: (_PREFERRED_WEIGHTS.index(p.name) if p.name in _PREFERRED_WEIGHTS
                                      else len(_PREFERRED_WEIGHTS), p.suffix != ".safetensors", p.name))
        checkpoint = str(found[0]) if found else None
    return model_cfg, checkpoint


def load_open_clip_vision_tower(source: str, weights: bool = True) -> tuple[nn.Module, bool, dict]:
    """The image tower of the open_clip model ``source``, whether pretrained weights were loaded into it, and its
    config ``{"embed_dim", "vision_cfg", "quick_gelu"}`` (enough for :func:`build_open_clip_vision_tower`).

    ``source`` is an open_clip model name as :mod:`TextSegLib.text` takes it without the ``open_clip:`` prefix:
    ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (fetched once into the Hugging Face
    cache), ``local-dir:<folder>`` (``open_clip_config.json`` and weights), ``ViT-B-16@openai``, or a bare
    architecture name for random weights. ``local-dir:`` and ``hf-hub:`` build the image tower alone from the
    config and the ``visual.`` tensors of the weights file, so a folder never needs the text tower's files (for
    BiomedCLIP, the config of ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``, which open_clip would ask
    the hub for) and works offline. ``weights=False`` builds the architecture only (a checkpoint that stores the
    tower's weights). When the source names weights and ``weights`` is true they must load, or this raises
    :class:`BackboneUnavailableError` (a silently random "pretrained" tower would be wrong and hard to notice).
    """
    import open_clip

    weighted = weights and open_clip_source_has_weights(source)
    try:
        if source.startswith("local-dir:"):
            folder = Path(source[len("local-dir:"):])
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {str(folder)!r}")
            model_cfg, checkpoint = _local_dir(source, folder, weighted)
            return _vision_only(source, model_cfg, checkpoint), checkpoint is not None, _tower_config(model_cfg)
        if source.startswith("hf-hub:"):
            from open_clip.pretrained import download_pretrained_from_hf

            repo = source[len("hf-hub:"):]
            config_path = download_pretrained_from_hf(repo, filename="open_clip_config.json")
            model_cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))["model_cfg"]
            checkpoint = download_pretrained_from_hf(repo) if weighted else None
            return _vision_only(source, model_cfg, checkpoint), weighted, _tower_config(model_cfg)
        name, _, tag = source.partition("@")
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"open_clip knows no model {name!r}")
        model = open_clip.create_model(name, pretrained=(tag if weighted else None) or None, device="cpu",
                                       require_pretrained=weighted)
    except BackboneUnavailableError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise _unavailable(source, error) from error
    return model.visual, weighted, _tower_config(model_cfg)


class ViTTokenEncoder(nn.Module):
    """Patch embedding and the first ``depth`` blocks of a ViT image tower.

    ``tower`` is an open_clip image tower (its modules are taken over) or the sizes of a plain ViT
    (:class:`~.vit.PlainViTConfig`: TextSeg's own modules with fresh weights, the parameter names open_clip's, for
    a checkpoint that stores the tower to load into). :meth:`embed` gives the token sequence entering block 1
    (class token first, positional embedding added, pre-norm applied); ``blocks[i]`` is block ``i + 1``. The final
    norm, the pooling head, the projection and the blocks after ``depth`` are dropped; so is patch dropout (the
    patch grid must stay complete).

    Shapes: :meth:`embed` ``(B, 3, S, S) -> (B, 1 + g * g, width)`` with ``g = grid_size``; every block
    ``(B, T, width) -> (B, T, width)``.
    """

    prefix_tokens = 1

    def __init__(self, tower: nn.Module | PlainViTConfig, depth: int) -> None:
        super().__init__()
        if isinstance(tower, PlainViTConfig):
            scale = tower.width ** -0.5
            self.patch_embed = nn.Conv2d(3, tower.width, tower.patch_size, stride=tower.patch_size, bias=False)
            self.patch_norm = nn.Identity()
            self.class_token = nn.Parameter(scale * torch.randn(tower.width))
            grid = tower.grid_size
            self.position_embedding = nn.Parameter(scale * torch.randn(grid[0] * grid[1] + 1, tower.width))
            self.norm_pre = TokenLayerNorm(tower.width)
            available = tower.layers
            blocks = [TransformerBlock(tower.width, tower.heads, tower.mlp_width, tower.quick_gelu)
                      for _ in range(min(depth, available))]  # only the blocks kept
        else:
            blocks, grid = self._take_over(tower)
            available = len(blocks)
        if not 1 <= depth <= available:
            raise ValueError(f"the ViT has {available} blocks; cannot take the first {depth}")
        self.blocks = nn.ModuleList(blocks[:depth])
        self.grid_size = grid
        self.width = self.class_token.shape[-1]
        self.patch_size = tuple(self.patch_embed.kernel_size)
        self.image_size = (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])

    def _take_over(self, tower: nn.Module) -> tuple[list[nn.Module], tuple[int, int]]:
        """Take the embedding modules of an open_clip image tower; return its blocks and patch grid."""
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if isinstance(tower, VisionTransformer):
            if not tower.transformer.batch_first:
                raise ValueError("ViTTokenEncoder needs a batch-first open_clip transformer")
            self.patch_embed = tower.conv1
            self.patch_norm = nn.Identity()
            self.class_token = tower.class_embedding
            self.position_embedding = tower.positional_embedding
            self.norm_pre = tower.ln_pre
            return list(tower.transformer.resblocks), tuple(tower.grid_size)
        if isinstance(tower, TimmModel) and hasattr(tower.trunk, "blocks"):
            trunk = tower.trunk
            unsupported = (trunk.cls_token is None or getattr(trunk, "reg_token", None) is not None
                           or getattr(trunk, "no_embed_class", False) or getattr(trunk, "dynamic_img_size", False))
            if unsupported:
                raise ValueError("ViTTokenEncoder supports timm ViTs with one class token and a fixed grid")
            self.patch_embed = trunk.patch_embed.proj
            self.patch_norm = trunk.patch_embed.norm
            self.class_token = trunk.cls_token
            self.position_embedding = trunk.pos_embed
            self.norm_pre = trunk.norm_pre
            return list(trunk.blocks), tuple(trunk.patch_embed.grid_size)
        raise ValueError(f"not an open_clip ViT image tower: {type(tower).__name__}")

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Token sequence entering the first block: ``(B, 3, S, S) -> (B, 1 + g * g, width)``."""
        if tuple(image.shape[-2:]) != self.image_size:
            raise ValueError(f"the ViT takes {self.image_size} images, got {tuple(image.shape[-2:])}")
        patches = self.patch_norm(self.patch_embed(image).flatten(2).transpose(1, 2))
        cls = self.class_token.reshape(1, 1, -1).expand(patches.shape[0], -1, -1).to(patches.dtype)
        tokens = torch.cat([cls, patches], dim=1) + self.position_embedding.reshape(1, -1, self.width)
        return self.norm_pre(tokens)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states after every kept block: ``(B, 3, S, S) -> [(B, 1 + g * g, width)] * depth``."""
        tokens = self.embed(image)
        states = []
        for block in self.blocks:
            tokens = block(tokens)
            states.append(tokens)
        return states


class ConvNeXtPyramid(nn.Module):
    """A ConvNeXt (v1, stages built by :mod:`.convnext`) as a four-level pyramid, its 4x4 stride-4 patchify stem
    replaced by a stride-1 convolution.

    The new stem (``stem_kernel`` x ``stem_kernel`` convolution from ``in_channels``, then ConvNeXt's stem
    LayerNorm) keeps the input resolution, so the stages give features at 1, 1/2, 1/4 and 1/8 of the input side.
    ``pretrained`` (or :meth:`load_pretrained` later) loads timm's ImageNet weights for ``model_name`` into the
    stages and the stem norm (timm fetches them once into the Hugging Face cache; timm is imported for nothing
    else); the new stem convolution always starts from ConvNeXt's initialisation.

    Shapes: ``(B, in_channels, H, W)`` -> ``[(B, dims[0], H, W), (B, dims[1], H/2, W/2), (B, dims[2], H/4, W/4),
    (B, dims[3], H/8, W/8)]`` (``H`` and ``W`` divisible by 8).
    """

    def __init__(
        self,
        in_channels: int,
        model_name: str = "convnext_tiny",
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        stem_kernel: int = 1,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        if stem_kernel % 2 == 0:
            raise ValueError(f"the stride-1 stem needs an odd kernel size, got {stem_kernel}")
        if model_name not in CONVNEXT_V1:
            raise ValueError(f"the frequency encoder is a ConvNeXt v1 ({', '.join(CONVNEXT_V1)}), not {model_name!r}")
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"a ConvNeXt has four stages: depths {tuple(depths)}, dims {tuple(dims)}")
        self.model_name, self.depths = model_name, tuple(depths)
        self.dims = tuple(dims)
        conv = nn.Conv2d(in_channels, dims[0], stem_kernel, padding=stem_kernel // 2)
        self.stem = nn.Sequential(conv, LayerNorm2d(dims[0], NORM_EPS))
        self.stages = nn.ModuleList(ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0)
                                    for i in range(4))
        self.apply(init_convnext_weights)
        if pretrained:
            self.load_pretrained()

    def load_pretrained(self) -> None:
        """Copy timm's ImageNet weights into the stages and the stem norm (the stride-1 stem conv is new)."""
        import timm

        try:
            convnext = timm.create_model(self.model_name, pretrained=True, num_classes=0, depths=self.depths,
                                         dims=self.dims)
        except (OSError, RuntimeError, ValueError) as error:
            raise BackboneUnavailableError(
                f"The timm model {self.model_name!r} could not be built with ImageNet weights ({first_line(error)})."
            ) from error
        self.stem[1].load_state_dict(convnext.stem[1].state_dict())
        self.stages.load_state_dict(nn.ModuleList(convnext.stages).state_dict())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"ConvNeXtPyramid needs sides divisible by 8, got {tuple(x.shape[-2:])}")
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
