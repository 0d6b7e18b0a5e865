"""Pretrained backbones taken from open_clip and timm, cut down to what a segmentation network reads.

* :func:`load_open_clip_vision_tower` builds an open_clip model from a source string and keeps its image tower.
* :class:`ViTTokenEncoder` exposes that tower's patch embedding and transformer blocks one by one, so a network
  can read (and modify) the hidden states between blocks. Both kinds of open_clip image tower are supported:
  open_clip's own ``VisionTransformer`` (OpenAI CLIP, local configs with ``layers``/``width``) and a timm ViT
  wrapped by ``TimmModel`` (BiomedCLIP's ``vit_base_patch16_224``).
* :class:`ConvNeXtPyramid` is a timm ConvNeXt whose patchify stem is replaced by a stride-1 convolution for inputs
  with any number of channels, returning the four stage outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import PretrainedUnavailableError

__all__ = ["BackboneUnavailableError", "ConvNeXtPyramid", "ViTTokenEncoder", "load_open_clip_vision_tower"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class BackboneUnavailableError(PretrainedUnavailableError):
    """A pretrained backbone that cannot be built (not downloaded, no hub access, unknown name)."""


def open_clip_source_has_weights(source: str) -> bool:
    """Whether an open_clip source names pretrained weights (not just an architecture).

    ``hf-hub:<repo>`` and ``<name>@<tag>`` always do; ``local-dir:<folder>`` does when the folder holds a weights
    file; a bare built-in name (``ViT-B-16``) is an untrained architecture.
    """
    if source.startswith("hf-hub:"):
        return True
    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:"):])
        return folder.is_dir() and any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())
    return "@" in source


def load_open_clip_vision_tower(source: str) -> tuple[nn.Module, bool]:
    """The image tower of the open_clip model ``source`` and whether pretrained weights were loaded into it.

    ``source`` is an open_clip model name as :mod:`TextSegLib.text` takes it without the ``open_clip:`` prefix:
    ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (fetched once into the Hugging Face
    cache), ``local-dir:<folder>`` (``open_clip_config.json`` and weights), ``ViT-B-16@openai``, or a bare
    architecture name for random weights. When the source names weights they must load, or this raises
    :class:`BackboneUnavailableError` (a silently random "pretrained" tower would be wrong and hard to notice).
    """
    import open_clip

    name, _, tag = source.partition("@")
    weighted = open_clip_source_has_weights(source)
    try:
        model = open_clip.create_model(name, pretrained=tag or None, device="cpu", require_pretrained=weighted)
    except (OSError, RuntimeError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackboneUnavailableError(
            f"The open_clip image tower {source!r} could not be loaded ({message}). Give 'local-dir:<folder>' "
            "with open_clip_config.json and weights, or download it once on a machine with access to the hub."
        ) from error
    return model.visual, weighted


class ViTTokenEncoder(nn.Module):
    """Patch embedding and the first ``depth`` blocks of an open_clip ViT image tower.

    :meth:`embed` gives the token sequence entering block 1 (class token first, positional embedding added,
    pre-norm applied); ``blocks[i]`` is block ``i + 1``. The final norm, the pooling head, the projection and the
    blocks after ``depth`` are dropped; so is patch dropout (the patch grid must stay complete).

    Shapes: :meth:`embed` ``(B, 3, S, S) -> (B, 1 + g * g, width)`` with ``g = grid_size``; every block
    ``(B, T, width) -> (B, T, width)``.
    """

    prefix_tokens = 1

    def __init__(self, tower: nn.Module, depth: int) -> None:
        super().__init__()
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
            blocks = list(tower.transformer.resblocks)
            grid = tuple(tower.grid_size)
        elif isinstance(tower, TimmModel) and hasattr(tower.trunk, "blocks"):
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
            blocks = list(trunk.blocks)
            grid = tuple(trunk.patch_embed.grid_size)
        else:
            raise ValueError(f"not an open_clip ViT image tower: {type(tower).__name__}")
        if not 1 <= depth <= len(blocks):
            raise ValueError(f"the ViT has {len(blocks)} blocks; cannot take the first {depth}")
        self.blocks = nn.ModuleList(blocks[:depth])
        self.grid_size = grid
        self.width = self.class_token.shape[-1]
        self.patch_size = tuple(self.patch_embed.kernel_size)
        self.image_size = (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])

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
    """A timm ConvNeXt as a four-level pyramid, its 4x4 stride-4 patchify stem replaced by a stride-1 convolution.

    The new stem (``stem_kernel`` x ``stem_kernel`` convolution from ``in_channels``, then ConvNeXt's stem
    LayerNorm) keeps the input resolution, so the stages give features at 1, 1/2, 1/4 and 1/8 of the input side.
    ``pretrained`` (or :meth:`load_pretrained` later) loads timm's ImageNet weights into the stages and the stem
    norm (timm fetches them once into the Hugging Face cache); the new stem convolution always starts from timm's
    ConvNeXt initialisation.

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
        self.model_name, self.depths = model_name, tuple(depths)
        self.dims = tuple(dims)
        convnext = self._timm_model(pretrained)
        conv = nn.Conv2d(in_channels, dims[0], stem_kernel, padding=stem_kernel // 2)
        nn.init.trunc_normal_(conv.weight, std=0.02)
        nn.init.zeros_(conv.bias)
        self.stem = nn.Sequential(conv, convnext.stem[1])
        self.stages = nn.ModuleList(convnext.stages)

    def _timm_model(self, pretrained: bool) -> nn.Module:
        import timm

        try:
            return timm.create_model(self.model_name, pretrained=pretrained, num_classes=0, depths=self.depths,
                                     dims=self.dims)
        except (OSError, RuntimeError, ValueError) as error:
            raise BackboneUnavailableError(
                f"The timm model {self.model_name!r} could not be built"
                f"{' with ImageNet weights' if pretrained else ''} "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})."
            ) from error

    def load_pretrained(self) -> None:
        """Copy timm's ImageNet weights into the stages and the stem norm (the stride-1 stem conv is new)."""
        convnext = self._timm_model(pretrained=True)
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
