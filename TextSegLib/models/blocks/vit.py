"""The pieces of a plain ViT image tower (OpenAI CLIP's layout), built by TextSeg itself.

A checkpoint that stores its image tower (the shipped FreqMedCLIP models) only needs the tower's architecture to
load, and the architecture of a plain ViT is small: a patch convolution, a class token, learned positions, a
pre-norm and pre-norm transformer blocks. Building it here means that loading such a checkpoint does not import
open_clip, whose package import (with torchvision, transformers and torch's compiler stack) took about 3.5 s of a
fresh ``textseg segment`` (issue 25). The parameter names follow open_clip's, so weights move between the two
without renaming, and the arithmetic is the same operations in the same order, so the outputs are identical
(``Testing/models/test_freqmedclip.py`` compares the two on the same weights).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlainViTConfig", "TokenLayerNorm", "TransformerBlock", "plain_vit_config"]

# Settings of open_clip's CLIPVisionCfg that change the tower before its last block, with the values at which the
# tower is the plain one built here. A config that sets any of them otherwise is left to open_clip.
_PLAIN = {"ls_init_value": (None,), "no_ln_pre": (False,), "pos_embed_type": ("learnable",), "act_kwargs": (None,),
          "norm_kwargs": (None,), "block_type": (None, "default"), "qk_norm": (False,),
          "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
          "scale_fc": (False,), "timm_model_name": (None,)}
# Settings that only shape what a token encoder drops (pooling, projection, patch dropout) or only matter to timm.
_IGNORED = {"embed_dim", "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads",
            "final_ln_after_pool", "pool_type", "output_tokens", "timm_model_pretrained", "timm_pool", "timm_proj",
            "timm_proj_bias", "timm_drop", "timm_drop_path"}
_SIZES = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224}


class PlainViTConfig:
    """The sizes of a plain ViT: ``layers`` blocks of ``width`` channels in ``width // head_width`` heads, an MLP of
    ``mlp_ratio * width``, ``patch_size`` pixels per patch on ``image_size`` images, QuickGELU or exact GELU."""

    def __init__(self, layers: int, width: int, head_width: int, mlp_ratio: float, patch_size: int,
                 image_size: tuple[int, int], quick_gelu: bool) -> None:
        self.layers, self.width, self.heads = layers, width, width // head_width
        self.mlp_width = int(width * mlp_ratio)
        self.patch_size, self.image_size, self.quick_gelu = patch_size, image_size, quick_gelu
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)


def plain_vit_config(tower_cfg: Mapping[str, Any]) -> PlainViTConfig | None:
    """The sizes of the tower that ``tower_cfg`` (``{"embed_dim", "vision_cfg", "quick_gelu"}``, as
    :func:`~TextSegLib.models.blocks.backbones.load_open_clip_vision_tower` records it) describes, or ``None``
    when it is not a plain ViT (a timm tower, a ResNet, layer scale, custom attention, ...)."""
    vision = dict(tower_cfg["vision_cfg"])
    unknown = set(vision) - set(_PLAIN) - _IGNORED - set(_SIZES)
    if unknown or any(vision.get(key, plain[0]) not in plain for key, plain in _PLAIN.items()):
        return None
    sizes = {key: vision.get(key, default) for key, default in _SIZES.items()}
    if not isinstance(sizes["layers"], int):
        return None
    side = sizes["image_size"]
    image_size = (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))
    return PlainViTConfig(sizes["layers"], sizes["width"], sizes["head_width"], float(sizes["mlp_ratio"]),
                          int(sizes["patch_size"]), image_size, bool(tower_cfg.get("quick_gelu", False)))


class TokenLayerNorm(nn.LayerNorm):
    """Layer norm over the channels whose output keeps the input's dtype (under autocast ``layer_norm`` computes
    in float32; CLIP's towers hand the next layer the input's dtype). Shapes: ``(..., C) -> (..., C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation OpenAI's CLIP was trained with. Shapes: any."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

    Self-attention is :class:`torch.nn.MultiheadAttention` (batch first, ``heads`` heads, no mask); the MLP is
    ``c_fc`` (width to ``mlp_width``), GELU (exact, or QuickGELU), ``c_proj`` back to width.

    Shapes: ``(B, T, width) -> (B, T, width)``.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.ln_1 = TokenLayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = TokenLayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))
