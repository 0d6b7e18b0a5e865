"""TexLiverNet: text-guided liver tumour segmentation with agent attention and spatial-frequency perception.

Jiang, Zhou, Wang, Wang, Fang, "TexLiverNet: leveraging medical knowledge and spatial-frequency perception for
enhanced liver tumor segmentation" (``../shared/papers/000_7ddf8fea71f5ffff.txt``).

Layout (Fig. 1a), for an input of side ``S`` and widths ``w0..w4``::

    x1 = DoubleConv(x)                 w0 x S       encoder stages 1-3: 3x3 convolutions
    x2 = DoubleConv(pool(x1))          w1 x S/2
    x3 = DoubleConv(pool(x2))          w2 x S/4
    x4 = RollingStage(pool(x3))        w3 x S/8     stage 4: DOR-MLP block  +  SFPM-s in parallel
    b  = RollingStage(pool(x4))        w4 x S/16    bottleneck: DOR-MLP block  +  SFPM-s in parallel
    b  = TIA(b, text tokens)           w4 x S/16    text-image agent attention (Eq. 1-3)
    d  = up(Conv(b)) + SFPM-f(x4)      w3 x S/8     skip connections enhanced by SFPM-f (Eq. 4-5)
    d  = DOR-MLP block(d)              w3 x S/8     decoder stage 4
    d  = up(Conv(d)) + SFPM-f(x3) ...  down to      decoder stages 3-1: 3x3 convolutions
    logits = Conv1x1(DoubleConv(d))    1 x S

Choices where the paper is silent, kept configurable: skips are added (as in RollingUnet, the paper's base);
"paper" widths are RollingUnet-L's ``64..1024`` (the authors' released image branch uses them); SFPM-s works at
half width inside; SFPM-f sits on all four skip connections; TIA uses one attention head (``d = C`` as in Eq. 2)
and a 7 x 7 agent grid. ``use_tia``, ``use_sfpm_s`` and ``use_sfpm_f`` switch the modules off for the ablation of
Table 2 (base = all off; "+SFPM" = both SFPM switches on). With ``use_tia = False`` the text is ignored. The DOR-MLP
rolls in RollingUnet's directions (see ``blocks/rolling.py``).

What the text does: the prompt's tokens enter only through TIA, which adds the agents' reading of the text to the
bottleneck features of every slice, so the prompt changes the output at inference (the network is trained on one
target, liver tumours, with a description of the tumour on each training slice).

Two presets. ``paper`` (the default) is the paper's text read literally: two SFPM-s in parallel with DOR-MLP (stage
4 and bottleneck), SFPM-f on all four skips with G of Eq. 4 as ``Linear(StarReLU(Linear(.)))`` over each frequency's
channel values (a function of the spectrum's values at that frequency, not of its position). ``authors`` is the
image branch of the authors' public code (``sky-visionX/TexLiverNet``), written with this package's blocks:

* one SFPM-s in series, after the bottleneck's projection back to ``w3``: ``d + s * SFPM-s(d)`` with a learnable
  ``s`` starting at 0.01, the SFPM-s joining its dilated convolutions by concatenation
  (:class:`~.blocks.spatial.DenseSpatialPerception`); none at stage 4;
* SFPM-f on the three shallow skips only (``x1..x3``), as ``x + s * f(x)`` (``s`` from 0.01), ``f`` the
  :class:`~.blocks.frequency.PositionalFrequencyBranch`: 1x1 expansion to ``2C``, StarReLU, FFT, a filter made of
  four learnable complex filters per frequency position mixed per channel by weights computed from the global
  mean, inverse FFT, 1x1 projection (no max-pooled ``I_s``).

The ``authors`` preset also takes the authors' (and RollingUnet's) decoder double convolutions ``in -> in -> out``
(``paper`` keeps ``in -> out -> out``). What it does not copy (no change to the layout or the parameter count
beyond 0.01 M): biases before BatchNorm, the activation and normalisation of the bottleneck's projection back to
``w3`` (theirs GELU and LayerNorm, here BatchNorm and ReLU, as in ``paper``), LeakyReLU in the DOR-MLP block's
local branch (RollingUnet and this package use ReLU), the bottleneck's higher dropout (0.4) and a final sigmoid
(this package returns logits). TIA stays at the bottleneck (the authors' code has no text branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.models.blocks import (
    ConvNormAct,
    DenseSpatialPerception,
    DORMLPBlock,
    DoubleConv,
    LayerNorm2d,
    PositionalFrequencyBranch,
    ScaledResidual,
    SpatialFrequencyPerceptionF,
    SpatialFrequencyPerceptionS,
    TextImageAgentAttention,
)
from TextSegLib.models.losses import bce_dice_loss
from TextSegLib.models.registry import ModelSpec, register
from TextSegLib.text.features import TextFeatures

SFPM_S_LAYOUTS = ("parallel", "series")
SFPM_S_BLOCKS = ("residual", "dense")
SFPM_F_KINDS = ("adaptive", "positional")


@dataclass(frozen=True)
class TexLiverNetConfig:
    """Every constructor argument of :class:`TexLiverNet` (stored verbatim in checkpoints).

    Attributes:
        widths: channels of encoder stages 1-3, stage 4 and the bottleneck.
        head_width: channels of the last decoder stage before the 1x1 output conv.
        in_channels: image channels (1: one windowed CT slice).
        image_size: training input side; TIA's image positional encoding is created for ``image_size / 16``.
        text_dim: width of the text encoder's token features (768 for PubMedBERT, 384 for MiniLM).
        max_text_tokens: rows of the text positional encoding; longer prompts are truncated by the encoder.
        use_tia, use_sfpm_s, use_sfpm_f: module switches for the ablation of Table 2.
        tia_agent_grid: agents per side (``7`` gives 49 agents).
        tia_heads: attention heads in TIA (1 = the paper's formulation).
        sfpm_s_ratio: inner width of SFPM-s relative to its input.
        sfpm_f_ratio: hidden width of the filter G relative to ``2C``.
        dropout: dropout inside the DOR-MLP blocks (RollingUnet uses 0.1).
        head_bias: initial bias of the output logit. 0 starts at probability 0.5 everywhere; ``log(p / (1 - p))``
            starts at a foreground prior ``p`` (-4.6 for 1 %), which spares small-lesion training the long first
            phase of learning that almost everything is background.
        width_first_roll: direction of the width roll that opens the DOR-MLP's width-first OR-MLP: -1 as
            RollingUnet; +1 is the reading of earlier TextSeg versions, kept for checkpoints trained with it
            (a checkpoint whose config lacks the key is loaded with +1).
        sfpm_s_layout: ``"parallel"`` (the paper: beside DOR-MLP at stage 4 and the bottleneck, outputs added) or
            ``"series"`` (the authors' code: one SFPM-s after the bottleneck, ``d + s * SFPM-s(d)``).
        sfpm_s_block: ``"residual"`` (the paper's residual connections) or ``"dense"`` (the authors' concatenations).
        sfpm_f_levels: the skip connections (1 = full resolution .. 4 = stage 4) that get SFPM-f.
        sfpm_f_kind: ``"adaptive"`` (Eq. 4-5 read literally) or ``"positional"`` (the authors' code: learnable
            filters per frequency position, mixed by weights from the global mean, added as ``x + s * f(x)``).
        branch_scale: starting value of the learnable ``s`` of the series SFPM-s and the positional SFPM-f (0.01).
        decoder_narrow_first: the decoder's double convolutions go ``in -> out -> out`` (True) or ``in -> in -> out``
            (False, as RollingUnet and the authors' code).
    """

    widths: tuple[int, int, int, int, int] = (64, 128, 256, 512, 1024)
    head_width: int = 32
    in_channels: int = 1
    image_size: int = 256
    text_dim: int = 768
    max_text_tokens: int = 128
    use_tia: bool = True
    use_sfpm_s: bool = True
    use_sfpm_f: bool = True
    tia_agent_grid: int = 7
    tia_heads: int = 1
    sfpm_s_ratio: float = 0.5
    sfpm_f_ratio: float = 0.5
    dropout: float = 0.1
    head_bias: float = 0.0
    width_first_roll: int = -1
    sfpm_s_layout: str = "parallel"
    sfpm_s_block: str = "residual"
    sfpm_f_levels: tuple[int, ...] = (1, 2, 3, 4)
    sfpm_f_kind: str = "adaptive"
    branch_scale: float = 0.01
    decoder_narrow_first: bool = True


def spatial_perception(channels: int, config: TexLiverNetConfig) -> nn.Module:
    """The SFPM-s of ``config``: residual (the paper) or dense (the authors' code). ``(B, C, H, W) -> same``."""
    if config.sfpm_s_block == "dense":
        return DenseSpatialPerception(channels)
    return SpatialFrequencyPerceptionS(channels, config.sfpm_s_ratio)


class RollingStage(nn.Module):
    """Stage 4 / bottleneck: 3x3 conv embedding, then DOR-MLP block plus (optionally) SFPM-s, then LayerNorm.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, config: TexLiverNetConfig, parallel_sfpm_s: bool):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GELU(),
                                   LayerNorm2d(out_channels))
        self.mlp = DORMLPBlock(out_channels, drop=config.dropout, width_first_roll=config.width_first_roll)
        self.spatial = spatial_perception(out_channels, config) if parallel_sfpm_s else None
        self.norm = LayerNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        y = self.mlp(x)
        if self.spatial is not None:
            y = y + self.spatial(x)
        return self.norm(y)


class TexLiverNet(nn.Module):
    """TexLiverNet (see the module docstring for the layout).

    Shapes: image ``(B, in_channels, S, S)`` with ``S`` divisible by 16, text tokens ``(B or 1, L, text_dim)``
    -> logits ``(B, 1, S, S)``.
    """

    def __init__(self, config: TexLiverNetConfig) -> None:
        super().__init__()
        for name, value, allowed in (("sfpm_s_layout", config.sfpm_s_layout, SFPM_S_LAYOUTS),
                                     ("sfpm_s_block", config.sfpm_s_block, SFPM_S_BLOCKS),
                                     ("sfpm_f_kind", config.sfpm_f_kind, SFPM_F_KINDS)):
            if value not in allowed:
                raise ValueError(f"unknown TexLiverNet {name} {value!r}; use one of {', '.join(allowed)}")
        if not set(config.sfpm_f_levels) <= {1, 2, 3, 4}:
            raise ValueError(f"sfpm_f_levels name skip connections 1 to 4, got {config.sfpm_f_levels}")
        if config.width_first_roll not in (-1, 1):
            raise ValueError(f"width_first_roll is -1 or +1, got {config.width_first_roll}")
        self.config = config
        w0, w1, w2, w3, w4 = config.widths
        self.enc1 = DoubleConv(config.in_channels, w0)
        self.enc2 = DoubleConv(w0, w1)
        self.enc3 = DoubleConv(w1, w2)
        parallel = config.use_sfpm_s and config.sfpm_s_layout == "parallel"
        self.stage4 = RollingStage(w2, w3, config, parallel)
        self.bottleneck = RollingStage(w3, w4, config, parallel)
        grid = config.image_size // 16
        self.tia = (
            TextImageAgentAttention(w4, config.text_dim, (grid, grid), config.max_text_tokens,
                                    config.tia_agent_grid, config.tia_heads)
            if config.use_tia else None
        )
        self.skips = nn.ModuleList(
            self._frequency_skip(w, config.image_size // 2**level, config)
            if config.use_sfpm_f and level + 1 in config.sfpm_f_levels else nn.Identity()
            for level, w in enumerate((w0, w1, w2, w3))
        )
        self.up4 = ConvNormAct(w4, w3)
        self.series = (ScaledResidual(spatial_perception(w3, config), config.branch_scale)
                       if config.use_sfpm_s and config.sfpm_s_layout == "series" else nn.Identity())
        self.dec4 = nn.Sequential(DORMLPBlock(w3, drop=config.dropout, width_first_roll=config.width_first_roll),
                                  LayerNorm2d(w3))
        self.up3 = ConvNormAct(w3, w2)
        def mid(in_channels: int) -> int | None:
            return None if config.decoder_narrow_first else in_channels

        self.dec3 = DoubleConv(w2, w1, mid(w2))
        self.dec2 = DoubleConv(w1, w0, mid(w1))
        self.dec1 = DoubleConv(w0, config.head_width, mid(w0))
        self.head = nn.Conv2d(config.head_width, 1, 1)
        nn.init.constant_(self.head.bias, config.head_bias)

    @staticmethod
    def _frequency_skip(channels: int, side: int, config: TexLiverNetConfig) -> nn.Module:
        """SFPM-f for a skip of ``channels`` at ``side x side``: ``(B, C, side, side) -> (B, C, side, side)``."""
        if config.sfpm_f_kind == "positional":
            return ScaledResidual(PositionalFrequencyBranch(channels, side), config.branch_scale)
        return SpatialFrequencyPerceptionF(channels, config.sfpm_f_ratio)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, text: TextFeatures | None) -> torch.Tensor:
        side = image.shape[-1]
        if image.shape[-2] % 16 or side % 16:
            raise ValueError(f"TexLiverNet needs a height and width divisible by 16, got {tuple(image.shape[-2:])}")
        x1 = self.enc1(image)
        x2 = self.enc2(F.max_pool2d(x1, 2))
        x3 = self.enc3(F.max_pool2d(x2, 2))
        x4 = self.stage4(F.max_pool2d(x3, 2))
        b = self.bottleneck(F.max_pool2d(x4, 2))
        if self.tia is not None:
            if text is None:
                raise ValueError("TexLiverNet with TIA needs text features")
            b = self.tia(b, text.tokens.to(b.dtype), text.mask)
        d = self.dec4(self._up(self.series(self.up4(b))) + self.skips[3](x4))
        d = self._up(self.up3(d)) + self.skips[2](x3)
        d = self._up(self.dec3(d)) + self.skips[1](x2)
        d = self._up(self.dec2(d)) + self.skips[0](x1)
        return self.head(self.dec1(d))

    def forward_train(self, image: torch.Tensor, text: TextFeatures | None) -> dict[str, torch.Tensor]:
        """Training outputs: ``{"logits": (B, 1, S, S)}``."""
        return {"logits": self(image, text)}


def texlivernet_loss(config: TexLiverNetConfig, bce_weight: float = 0.8, dice_weight: float = 0.2):
    """The paper's loss: BCE and Dice in the ratio 8:2."""

    def loss(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        return bce_dice_loss(outputs["logits"], target, bce_weight, dice_weight)

    return loss


def describe_texlivernet_text(config: TexLiverNetConfig) -> str:
    """What the prompt does in a TexLiverNet of ``config`` (for the catalogue)."""
    if not config.use_tia:
        return "The prompt is ignored (TIA is switched off)."
    return ("The prompt steers the bottleneck through text-image agent attention on every slice, so it changes the "
            "output. The network segments the target it was trained on (the paper: liver tumours, each slice with "
            "its tumour's description); it picks other targets by name only if trained on several.")


register(
    ModelSpec(
        name="texlivernet",
        title="TexLiverNet",
        config_class=TexLiverNetConfig,
        builder=TexLiverNet,
        presets={
            "paper": {},
            "authors": {"sfpm_s_layout": "series", "sfpm_s_block": "dense", "sfpm_f_levels": (1, 2, 3),
                        "sfpm_f_kind": "positional", "decoder_narrow_first": False},
            "small": {"widths": (16, 32, 64, 128, 256), "head_width": 16},
        },
        default_preprocessing={
            "size": [256, 256],
            "intensity": {
                "CT": {"kind": "window", "low": -200.0, "high": 200.0},
                "MR": {"kind": "percentile", "low": 0.5, "high": 99.5},
            },
        },
        loss=texlivernet_loss,
        default_text_encoder="hf:microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext",  # PubMedBERT
        describe_text=describe_texlivernet_text,
        checkpoint_defaults={"width_first_roll": 1},  # checkpoints from before the DOR-MLP matched RollingUnet
    )
)
