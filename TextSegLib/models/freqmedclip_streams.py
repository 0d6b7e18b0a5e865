"""FreqMedCLIP's two streams and its decoder (see :mod:`TextSegLib.models.freqmedclip` for the paper's design):
the semantic stream (a CLIP ViT with text-conditioned adapters and an FPN), the frequency stream (a ConvNeXt on the
Haar wavelet sub-bands) and the LFFI decoder with its fusion head. Each block documents its tensor shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.models.blocks.backbones import (
    ConvNeXtPyramid,
    ViTTokenEncoder,
    load_open_clip_vision_tower,
    vit_token_encoder,
)
from TextSegLib.models.blocks.conditioning import FiLM, TextConditionedAdapter
from TextSegLib.models.blocks.convs import ConvNormAct, DoubleConv
from TextSegLib.models.blocks.wavelets import haar_dwt2
from TextSegLib.models.freqmedclip_config import FreqMedCLIPConfig
from TextSegLib.models.registry import checkpoint_external_weights
from TextSegLib.text.features import TextFeatures


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class FPNAdapter(nn.Module):
    """Semantic pyramid from four isotropic ViT grids (Eq. 7).

    ``S1 = phi_12(U12)``; ``S_k = phi_l(Up2(S_{k-1}) + psi_l(U_l))`` for ``l = 9, 6, 3``, where ``psi_l`` is a 1x1
    projection to ``C_{k-1}`` (then resized bilinearly to the level's grid) and ``phi_l`` a 3x3 conv-BN-ReLU.

    Shapes: grids ``[U3, U6, U9, U12]`` (shallow to deep), each ``(B, D, g, g)`` -> ``[S1 (B, C1, g, g),
    S2 (B, C2, 2g, 2g), S3 (B, C3, 4g, 4g), S4 (B, C4, 8g, 8g)]``.
    """

    def __init__(self, vit_dim: int, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.refine = nn.ModuleList([ConvNormAct(vit_dim, widths[0])] + [
            ConvNormAct(widths[k - 1], widths[k]) for k in range(1, 4)
        ])
        self.lateral = nn.ModuleList(nn.Conv2d(vit_dim, widths[k - 1], 1) for k in range(1, 4))

    def forward(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        deepest, *shallower = grids[::-1]
        level = self.refine[0](deepest)
        pyramid = [level]
        for refine, lateral, grid in zip(self.refine[1:], self.lateral, shallower, strict=True):
            upsampled = upsample2(level)
            side = F.interpolate(lateral(grid), size=upsampled.shape[-2:], mode="bilinear", align_corners=False)
            level = refine(upsampled + side)
            pyramid.append(level)
        return pyramid


class SemanticStream(nn.Module):
    """BiomedCLIP's ViT with Text-Conditioned Adapters and the FPN adapter (Sec. 3.4).

    The image is normalised with the ViT's mean/std, embedded, and run through the ViT blocks; after each block
    of ``vit_layers`` a TCA (or FiLM-on-tokens) adapter updates the tokens, which go on to the next block and,
    without the class token and reshaped to the patch grid, to the FPN.

    Shapes: image ``(B, in_channels, S, S)`` in ``[0, 1]``, text with ``B`` rows -> ``[S1 (B, C1, g, g), ...,
    S4 (B, C4, 8g, 8g)]`` with ``g = S / 16``.
    """

    def __init__(self, config: FreqMedCLIPConfig) -> None:
        super().__init__()
        external = checkpoint_external_weights()
        if external is not None and "semantic.backbone." not in external:  # the checkpoint stores the tower
            if config.vision_tower is not None:  # a plain ViT is built without importing open_clip
                self.backbone = vit_token_encoder(config.vision_tower, config.vit_layers[-1])
                self.pretrained, self.tower_config = False, config.vision_tower
            else:  # checkpoints from before the tower config was recorded
                tower, self.pretrained, self.tower_config = load_open_clip_vision_tower(config.vision_source, False)
                self.backbone = ViTTokenEncoder(tower, depth=config.vit_layers[-1])
        else:
            tower, self.pretrained, self.tower_config = load_open_clip_vision_tower(config.vision_source)
            self.backbone = ViTTokenEncoder(tower, depth=config.vit_layers[-1])
        side, grid = config.image_size, config.image_size // 16
        if self.backbone.image_size != (side, side) or self.backbone.grid_size != (grid, grid):
            raise ValueError(
                f"the image tower of {config.vision_source!r} takes {self.backbone.image_size} images in a "
                f"{self.backbone.grid_size} grid; FreqMedCLIP needs {config.image_size} with 16-pixel patches"
            )
        self.trainable_backbone = not config.freeze_backbone
        if config.freeze_backbone:
            self.backbone.requires_grad_(False).eval()
        self.layers = tuple(config.vit_layers)
        self.mode = config.tca_mode
        width = self.backbone.width
        if not config.use_tca:
            self.adapters = None
        elif config.tca_mode == "film":
            self.adapters = nn.ModuleList(FiLM(config.pooled_dim, width, config.film_hidden) for _ in self.layers)
        else:
            self.adapters = nn.ModuleList(
                TextConditionedAdapter(width, config.text_dim, config.tca_dim, config.tca_heads, config.tca_ffn_dim)
                for _ in self.layers
            )
        self.fpn = FPNAdapter(width, config.fpn_widths)
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> SemanticStream:
        """Train or evaluate the adapters and the FPN; a frozen ViT stays in eval mode (fixed features)."""
        super().train(mode)
        if not self.trainable_backbone:
            self.backbone.eval()
        return self

    def forward(self, image: torch.Tensor, text: TextFeatures | None) -> list[torch.Tensor]:
        x = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and (self.trainable_backbone or x.requires_grad)):
            tokens = self.backbone.embed(x)
        grids = []
        for number, block in enumerate(self.backbone.blocks, start=1):
            # a frozen ViT builds no autograd graph until an adapter (or the input) needs gradients through it
            with torch.set_grad_enabled(grad and (self.trainable_backbone or tokens.requires_grad)):
                tokens = block(tokens)
            if number not in self.layers:
                continue
            if self.adapters is not None:
                adapter = self.adapters[self.layers.index(number)]
                if self.mode == "film":
                    tokens = adapter(tokens, text.pooled)
                else:
                    tokens = adapter(tokens, text.tokens, text.mask)
            patches = tokens[:, self.backbone.prefix_tokens:]
            grids.append(patches.transpose(1, 2).unflatten(-1, self.backbone.grid_size))
        return self.fpn(grids)


class FrequencyStream(nn.Module):
    """Haar DWT sub-bands into a ConvNeXt with a stride-1 stem (Sec. 3.5, Eq. 8-9).

    Shapes: image ``(B, C, S, S)`` -> ``[F_stem (B, C_s, S/2, S/2), F1 (B, C'1, S/4, S/4), F2 (B, C'2, S/8, S/8),
    F3 (B, C'3, S/16, S/16)]``.
    """

    def __init__(self, config: FreqMedCLIPConfig) -> None:
        super().__init__()
        # Frozen ImageNet stages are external weights, loaded here; trained ones start from ImageNet through
        # FreqMedCLIP.prepare_training and are then stored in checkpoints, so loading one fetches nothing.
        frozen_pretrained = config.freq_pretrained and not config.train_freq_encoder
        self.encoder = ConvNeXtPyramid(4 * config.in_channels, config.freq_model, config.freq_depths,
                                       config.freq_dims, config.freq_stem_kernel, frozen_pretrained)
        if not config.train_freq_encoder:
            self.encoder.stages.requires_grad_(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(haar_dwt2(image))


class ConcatFusion(nn.Module):
    """The "w/o FFBI" bottleneck: both maps projected to ``dim`` (1x1), concatenated and upsampled 2x.

    Shapes: ``(B, C_s, h, w)``, ``(B, C_f, h, w)`` -> ``(B, 2 dim, 2h, 2w)``.
    """

    def __init__(self, semantic_channels: int, frequency_channels: int, dim: int) -> None:
        super().__init__()
        self.project_semantic = nn.Conv2d(semantic_channels, dim, 1)
        self.project_frequency = nn.Conv2d(frequency_channels, dim, 1)

    def forward(self, semantic: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
        return upsample2(torch.cat([self.project_semantic(semantic), self.project_frequency(frequency)], dim=1))


class DecoderStage(nn.Module):
    """One decoder stage (Eq. 15): ``Y = ConvBlock(concat(X, skip))``, ``Y' = FiLM(Y, t)`` (LFFI), ``Up2(Y')``.

    Shapes: ``x`` ``(B, C_x, h, w)``, ``skip`` ``(B, C_skip, h, w)``, ``pooled`` ``(B, P)`` (only with LFFI)
    -> ``(B, C_out, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, pooled_dim: int | None,
                 film_hidden: int) -> None:
        super().__init__()
        self.block = DoubleConv(in_channels + skip_channels, out_channels)
        self.film = FiLM(pooled_dim, out_channels, film_hidden) if pooled_dim else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        y = self.block(torch.cat([x, skip], dim=1))
        if self.film is not None:
            y = self.film(y, pooled)
        return upsample2(y)


class LFFIDecoder(nn.Module):
    """A text-conditioned decoder branch: stages at 28, 56 and 112 (Eq. 16-17), then a 1x1 head.

    Shapes: ``x`` ``(B, C_in, 2g, 2g)``, skips ``[(B, k1, 2g, 2g), (B, k2, 4g, 4g), (B, k3, 8g, 8g)]``, ``pooled``
    ``(B, P)`` or None -> logits ``(B, 1, 16g, 16g)``.
    """

    def __init__(self, in_channels: int, skip_channels: tuple[int, int, int], widths: tuple[int, int, int],
                 pooled_dim: int | None, film_hidden: int) -> None:
        super().__init__()
        inputs = (in_channels, *widths[:-1])
        self.stages = nn.ModuleList(
            DecoderStage(i, s, o, pooled_dim, film_hidden) for i, s, o in zip(inputs, skip_channels, widths,
                                                                               strict=True)
        )
        self.head = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], pooled: torch.Tensor | None) -> torch.Tensor:
        for stage, skip in zip(self.stages, skips, strict=True):
            x = stage(x, skip, pooled)
        return self.head(x)


class FusionHead(nn.Sequential):
    """Learnable fusion of the two branch logits (Eq. 18): a small two-layer conv block.

    Shapes: ``(B, 2, H, W)`` (``[L_s, L_f]``) -> ``(B, 1, H, W)``.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__(nn.Conv2d(2, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))
