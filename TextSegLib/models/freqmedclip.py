"""FreqMedCLIP: a frozen BiomedCLIP ViT and a Haar-wavelet ConvNeXt stream, fused and decoded under text guidance.

Ngo, Tran, Doan, "FreqMedCLIP: Frequency Information for Text-Guided Medical Image Segmentation"
(``../shared/papers/002_ef0b10ee23248525.txt``).

Layout (Fig. 1, Eq. 1-18) for a ``224 x 224`` input, widths ``C1..C4`` (FPN), ``C_s, C'1..C'3`` (ConvNeXt),
``d`` (FFBI) and ``E1..E3`` (decoders)::

    semantic stream   BiomedCLIP ViT-B/16 (frozen), TCA after blocks 3, 6, 9, 12      hidden states U(l), 768 x 14
                      FPN adapter (Eq. 7): S1 = phi(U12)                               C1 x 14
                                           S2 = phi(Up(S1) + psi(U9))                 C2 x 28
                                           S3 = phi(Up(S2) + psi(U6))                 C3 x 56
                                           S4 = phi(Up(S3) + psi(U3))                 C4 x 112
    frequency stream  Haar DWT (Eq. 8): [LL, LH, HL, HH] of each channel               4C x 112
                      ConvNeXt-Tiny, stride-1 stem (Eq. 9): F_stem, F1, F2, F3          96 x 112 ... 768 x 14
    FFBI (Eq. 10-13)  Z_s = flat(S1) W_s, Z_f = flat(F3) W_f; bidirectional cross-attention with residuals;
                      optional text gate gamma_b * Z + beta_b; reshape, Up -> D_s0, D_f0        d x 28
    decoders          Dec_28, Dec_56, Dec_112 per branch (Eq. 15-17): Y = ConvBlock([X, skip]),
                      Y' = FiLM(Y, t) (LFFI), X_next = Up(Y'); skips S2, S3, S4 / F2, F1, F_stem   -> E3 x 224
    heads (Eq. 18)    L_s, L_f = 1x1 conv; L = Head_fuse([L_s, L_f]) (two conv layers)            1 x 224

Choices where the paper is vague (each configurable):

* Preprocessing (checkpoint metadata): 224 x 224; CT min-max (Sec. 3.2: "min-max for CT"), the volume's own
  minimum and maximum mapped to ``[0, 1]``. For MR the paper z-scores, but the frozen ViT was trained on images in
  ``[0, 1]`` followed by CLIP's mean/std (about ``[-1.8, 2.1]``), and the z-scored brain1 MR reaches it at
  ``[-5.4, 21.2]``. Any per-volume map into ``[0, 1]`` after a z-score is a window on the raw intensities (affine
  maps compose), so MR takes the volume's 0.5 and 99.5 percentiles as its window: the z-score's purpose (the same
  scale for every volume) kept, the outliers clipped, background black as in the images BiomedCLIP saw. The
  architecture declares ``input_range = (0, 1)`` and training refuses a ``zscore`` normalisation for it.
* Input: the engine gives ``[0, 1]`` slices repeated to 3 channels; the model applies BiomedCLIP's mean/std (the
  OpenAI CLIP values) to the ViT's copy itself, so checkpoints carry it and callers need not know. The frequency
  stream sees the ``[0, 1]`` slice; its DWT concatenates the four sub-bands of every channel (``4C`` channels).
* TCA sits *inside* the encoder ("insert ... after selected ViT layers"): its output feeds the next ViT block and
  is the hidden state ``U(l)`` the FPN reads (``SemEnc(I, p)`` takes the prompt in Eq. 1). It acts on all tokens,
  class token included, before the class token is removed. Attention and FFN work at reduced widths
  (``tca_dim``, ``tca_ffn_dim``): "TCA adapter weights introduce fewer than 2% additional parameters relative to
  the total trainable parameter count" rules out full 768-wide projections (2.4 M per adapter).
* FPN: the laterals ``psi`` are 1x1 convolutions at 14 x 14 followed by bilinear resizing to the level's size (Eq. 7
  adds a 14 x 14 lateral to maps of 28 to 112); ``+`` is addition (so ``psi_l`` maps to ``C_{k-1}``); ``phi`` is a
  3x3 conv, BatchNorm, ReLU. ``Up`` is bilinear everywhere.
* ConvNeXt stem: the paper's sizes (``F_stem`` at 112 from the 112 x 112 sub-bands, ``F3`` at 14) need a stride-1
  stem; ``F_stem`` is stage 0's output (ConvNeXt's stage 0 does not downsample), ``F1..F3`` stages 1-3. The stem
  convolution is ``freq_stem_kernel`` wide (1 by default: after the 2 x 2 Haar transform a 1x1 convolution over the
  sub-bands equals ConvNeXt's non-overlapping patchify on 2 x 2 image patches).
* Decoders: every stage ends with ``Up`` (Eq. 15), so ``Dec_112`` returns 224 x 224 features and the logits come
  out at the input size. ``ConvBlock`` is two 3x3 conv-BN-ReLU layers; the fusion head is
  ``conv3x3(2 -> fuse_hidden), ReLU, conv1x1(-> 1)``.
* FiLM MLPs are ``Linear, GELU, Linear`` and start near ``gamma = 1, beta = 0``; they read the pooled embedding
  (the text tower's projected end/CLS token, ``pooled_dim`` wide), also in the FiLM-on-tokens form of TCA.
* The FFBI text gate is optional in the paper ("Optionally, a text gate is applied post-fusion"); it is on by
  default (``use_text_gate``) and uses one ``(gamma_b, beta_b)`` for both streams, as Eq. 12 writes.
* Widths: the paper gives none but "12 M trainable parameters" and TCA "fewer than 2%" of them. The "paper"
  widths (``C1..C4 = 384, 192, 96, 48``: half the ViT width, halved per level; ``d = 256``;
  ``E1..E3 = 256, 128, 64``; TCA attention 8 wide, FFN 16) give 11.8 M to the modules the paper lists as trained
  ("The FPN adapter, TCA adapters, FFBI, both decoders, and fusion head are trained end-to-end"), of which TCA is
  0.21 M (1.8 %). The frequency encoder is "learned" (abstract; Sec. 2: "a learned encoder ... end-to-end") and
  Table 2 freezes only BiomedCLIP, so ConvNeXt-Tiny is trained by default (``train_freq_encoder``): 39.6 M
  trainable in all. With ``train_freq_encoder = False`` only its new stem is trained: 11.8 M, the paper's figure.
  Whether ConvNeXt starts from ImageNet weights is not said ("ConvNeXt-Tiny serves as the frequency encoder
  backbone (first convolution modified ...)" suggests it); ``freq_pretrained`` loads timm's (off by default, so
  nothing is fetched). Trained stages start from them in :meth:`FreqMedCLIP.prepare_training` (training only) and
  are stored in checkpoints; with ``train_freq_encoder = False`` the frozen ImageNet stages are built with the
  network and left out of checkpoints like the frozen ViT (``external_weights``). ``train_freq_encoder = False``
  without ``freq_pretrained`` is refused (it would freeze random stages).
* Checkpoints: a frozen pretrained ViT is left out and rebuilt from ``vision_source``; a fine-tuned ViT
  (``freeze_backbone = False``) or a random one is stored, and loading rebuilds its architecture from the tower
  config the network records (``vision_tower``), so such a checkpoint loads from its own file alone.

Table 4's ablations are switches (:data:`TABLE4_ABLATIONS`): ``use_freq_encoder = False`` leaves the semantic
stream with one decoder; ``use_ffbi = False`` concatenates the projected bottleneck maps instead (both decoders
start from the concatenation; the text gate goes with FFBI); ``use_lffi = False`` drops the decoder FiLM layers;
``use_dual_decoder = False`` runs one decoder over both streams (skips concatenated) without the fusion head;
``use_tca = False`` runs the ViT unchanged. With TCA, the FFBI gate and LFFI all off, the prompt is not read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.models.blocks.backbones import (
    ConvNeXtPyramid,
    ViTTokenEncoder,
    build_open_clip_vision_tower,
    load_open_clip_vision_tower,
)
from TextSegLib.models.blocks.conditioning import FFBI, FiLM, TextConditionedAdapter
from TextSegLib.models.blocks.convs import ConvNormAct, DoubleConv
from TextSegLib.models.blocks.wavelets import haar_dwt2
from TextSegLib.models.losses import bce_dice_loss, soft_dice_loss
from TextSegLib.models.registry import ModelSpec, checkpoint_external_weights, register
from TextSegLib.text.features import TextFeatures

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TCA_MODES = ("cross_attention", "film")

#: Config overrides reproducing the columns of the paper's Table 4 (component removed from the full model).
TABLE4_ABLATIONS: dict[str, dict[str, bool]] = {
    "w/o FreqEnc": {"use_freq_encoder": False, "use_ffbi": False, "use_dual_decoder": False},
    "w/o FFBI": {"use_ffbi": False},
    "w/o LFFI": {"use_lffi": False},
    "w/o Dual Dec": {"use_dual_decoder": False},
    "w/o TCA": {"use_tca": False},
}


@dataclass(frozen=True)
class FreqMedCLIPConfig:
    """Every constructor argument of :class:`FreqMedCLIP` (stored verbatim in checkpoints).

    Attributes:
        vision_source: open_clip model whose image tower is the semantic encoder: ``hf-hub:<repo>``,
            ``local-dir:<folder>``, ``<name>@<tag>`` or a bare name (random weights).
        vision_tower: the image tower's open_clip config (``embed_dim``, ``vision_cfg``, ``quick_gelu``), recorded
            by the network when it is built (leave it None). A checkpoint that stores the tower's weights (a
            fine-tuned or random ViT) rebuilds the tower from it and never reads ``vision_source``.
        freeze_backbone: keep the ViT frozen (the paper's default). A frozen tower with pretrained weights is
            rebuilt from ``vision_source`` when a checkpoint is loaded and is not stored in it.
        vit_layers: the blocks (1-based, shallow to deep) read by the FPN, each followed by a TCA.
        image_size: input side; the ViT's grid is ``image_size / 16``.
        in_channels: image channels (3: the windowed slice repeated, as the ViT expects; 1 is repeated inside).
        image_mean, image_std: the ViT's input normalisation, applied inside the model to ``[0, 1]`` input.
        text_dim: width of the text tokens (768 for BiomedCLIP's PubMedBERT).
        pooled_dim: width of the pooled text embedding (512 for BiomedCLIP's projected CLS token).
        use_tca: insert Text-Conditioned Adapters after ``vit_layers``.
        tca_mode: ``"cross_attention"`` (Eq. 5-6) or ``"film"`` (FiLM on tokens from the pooled embedding).
        tca_dim, tca_heads, tca_ffn_dim: TCA attention width, heads and FFN width.
        fpn_widths: ``C1..C4`` of the semantic pyramid ``S1`` (14) to ``S4`` (112).
        use_freq_encoder: build the Haar DWT + ConvNeXt stream.
        freq_model, freq_depths, freq_dims: the timm ConvNeXt and its stage depths and widths.
        freq_stem_kernel: kernel of the stride-1 stem convolution over the sub-bands.
        train_freq_encoder: train the ConvNeXt stages (False: only its new stem is trained; needs
            ``freq_pretrained``, as frozen random stages would learn nothing).
        freq_pretrained: start ConvNeXt from timm's ImageNet weights (fetched once by timm).
        use_ffbi: bidirectional cross-attention fusion (False: concatenation).
        fusion_dim, fusion_heads: FFBI's shared width ``d`` and attention heads.
        use_text_gate: FFBI's optional text gate (Eq. 12).
        use_lffi: FiLM conditioning of every decoder stage (Eq. 14-15).
        decoder_widths: ``E1..E3``, output channels of the stages at 28, 56 and 112.
        film_hidden: hidden width of the FiLM MLPs.
        use_dual_decoder: one decoder per stream plus the fusion head (False: one decoder over both streams).
        fuse_hidden: channels of the fusion head's first layer.
    """

    vision_source: str = BIOMEDCLIP
    vision_tower: dict | None = None
    freeze_backbone: bool = True
    vit_layers: tuple[int, int, int, int] = (3, 6, 9, 12)
    image_size: int = 224
    in_channels: int = 3
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    text_dim: int = 768
    pooled_dim: int = 512
    use_tca: bool = True
    tca_mode: str = "cross_attention"
    tca_dim: int = 8
    tca_heads: int = 1
    tca_ffn_dim: int = 16
    fpn_widths: tuple[int, int, int, int] = (384, 192, 96, 48)
    use_freq_encoder: bool = True
    freq_model: str = "convnext_tiny"
    freq_depths: tuple[int, int, int, int] = (3, 3, 9, 3)
    freq_dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    freq_stem_kernel: int = 1
    train_freq_encoder: bool = True
    freq_pretrained: bool = False
    use_ffbi: bool = True
    fusion_dim: int = 256
    fusion_heads: int = 8
    use_text_gate: bool = True
    use_lffi: bool = True
    decoder_widths: tuple[int, int, int] = (256, 128, 64)
    film_hidden: int = 256
    use_dual_decoder: bool = True
    fuse_hidden: int = 16

    def __post_init__(self) -> None:
        layers = tuple(self.vit_layers)
        if len(layers) != 4 or layers[0] < 1 or any(b <= a for a, b in pairwise(layers)):
            raise ValueError(f"vit_layers must be four increasing 1-based block numbers, got {layers}")
        if self.tca_mode not in TCA_MODES:
            raise ValueError(f"tca_mode must be one of {', '.join(TCA_MODES)}, got {self.tca_mode!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be divisible by 16, got {self.image_size}")
        lengths = {"fpn_widths": 4, "freq_depths": 4, "freq_dims": 4, "decoder_widths": 3, "image_mean": 3,
                   "image_std": 3}
        for name, length in lengths.items():
            if len(getattr(self, name)) != length:
                raise ValueError(f"{name} needs {length} values, got {getattr(self, name)}")
        if not self.use_freq_encoder and (self.use_ffbi or self.use_dual_decoder):
            raise ValueError("without the frequency encoder there is nothing to fuse: set use_ffbi and "
                             "use_dual_decoder to False as well (TABLE4_ABLATIONS['w/o FreqEnc'])")
        if self.freq_stem_kernel % 2 == 0:
            raise ValueError(f"freq_stem_kernel must be odd, got {self.freq_stem_kernel}")
        if self.use_freq_encoder and not self.train_freq_encoder and not self.freq_pretrained:
            raise ValueError("train_freq_encoder = False freezes the ConvNeXt stages, and with freq_pretrained = False "
                             "they are random: frozen random weights learn nothing. Set freq_pretrained = True "
                             "(ImageNet weights, frozen) or train_freq_encoder = True.")

    @property
    def reads_text(self) -> bool:
        """Whether any module reads the prompt (TCA, the FFBI text gate or LFFI)."""
        return self.use_tca or self.use_lffi or (self.use_ffbi and self.use_text_gate)


def _up2(x: torch.Tensor) -> torch.Tensor:
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
            upsampled = _up2(level)
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
            if config.vision_tower is not None:
                tower, self.pretrained = build_open_clip_vision_tower(config.vision_tower), False
                self.tower_config = config.vision_tower
            else:  # checkpoints from before the tower config was recorded
                tower, self.pretrained, self.tower_config = load_open_clip_vision_tower(config.vision_source, False)
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
        return _up2(torch.cat([self.project_semantic(semantic), self.project_frequency(frequency)], dim=1))


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
        return _up2(y)


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


class FreqMedCLIP(nn.Module):
    """FreqMedCLIP (see the module docstring for the layout and the choices).

    Shapes: image ``(B, in_channels, S, S)`` in ``[0, 1]`` with ``S = image_size``, text with ``B`` rows or one
    (broadcast): tokens ``(., L, text_dim)``, mask ``(., L)``, pooled ``(., pooled_dim)`` -> logits
    ``(B, 1, S, S)``.
    """

    def __init__(self, config: FreqMedCLIPConfig) -> None:
        super().__init__()
        self.semantic = SemanticStream(config)
        self.config = dataclasses.replace(config, vision_tower=self.semantic.tower_config)
        c1, c2, c3, c4 = config.fpn_widths
        d = config.fusion_dim
        pooled = config.pooled_dim if config.use_lffi else None
        widths, hidden = tuple(config.decoder_widths), config.film_hidden
        self.frequency = FrequencyStream(config) if config.use_freq_encoder else None
        if self.frequency is None:
            self.fusion = None
            self.decoder = LFFIDecoder(c1, (c2, c3, c4), widths, pooled, hidden)
        else:
            f0, f1, f2, f3 = config.freq_dims
            if config.use_ffbi:
                gate = config.pooled_dim if config.use_text_gate else None
                self.fusion = FFBI(c1, f3, d, config.fusion_heads, gate, hidden)
            else:
                self.fusion = ConcatFusion(c1, f3, d)
            start = d if config.use_ffbi and config.use_dual_decoder else 2 * d
            if config.use_dual_decoder:
                self.decoder_semantic = LFFIDecoder(start, (c2, c3, c4), widths, pooled, hidden)
                self.decoder_frequency = LFFIDecoder(start, (f2, f1, f0), widths, pooled, hidden)
                self.fuse = FusionHead(config.fuse_hidden)
            else:
                self.decoder = LFFIDecoder(start, (c2 + f2, c3 + f1, c4 + f0), widths, pooled, hidden)
        external = []
        if config.freeze_backbone and self.semantic.pretrained:
            external.append("semantic.backbone.")
        if self.frequency is not None and config.freq_pretrained and not config.train_freq_encoder:
            external.append("frequency.encoder.stages.")
        self.external_weights = tuple(external)

    def prepare_training(self, encode) -> None:
        """Start a trained ConvNeXt from ImageNet weights when ``freq_pretrained`` asks for them (called by the
        trainer before the first step, never when a checkpoint is loaded). ``encode`` (prompt -> TextFeatures) is
        part of the training hook's signature and not needed here."""
        if self.frequency is not None and self.config.freq_pretrained and self.config.train_freq_encoder:
            self.frequency.encoder.load_pretrained()

    def forward(self, image: torch.Tensor, text: TextFeatures | None) -> torch.Tensor:
        return self.forward_train(image, text)["logits"]

    def forward_train(self, image: torch.Tensor, text: TextFeatures | None) -> dict[str, torch.Tensor]:
        """``{"logits"}`` plus, with two decoders, the branch logits ``"logits_semantic"`` and
        ``"logits_frequency"`` for deep supervision; all ``(B, 1, S, S)``."""
        config = self.config
        batch, channels, height, width = image.shape
        if channels != config.in_channels or (height, width) != (config.image_size, config.image_size):
            raise ValueError(f"FreqMedCLIP takes (B, {config.in_channels}, {config.image_size}, "
                             f"{config.image_size}) images, got {tuple(image.shape)}")
        pooled = None
        if config.reads_text:
            if text is None:
                raise ValueError("this FreqMedCLIP configuration reads the prompt and needs text features")
            text = text.expand(batch)
            pooled = text.pooled
        s1, s2, s3, s4 = self.semantic(image, text)
        if self.frequency is None:
            return {"logits": self.decoder(_up2(s1), [s2, s3, s4], pooled)}
        f_stem, f1, f2, f3 = self.frequency(image)
        if config.use_ffbi:
            start_s, start_f = self.fusion(s1, f3, pooled)
        else:
            start_s = start_f = self.fusion(s1, f3)
        if config.use_dual_decoder:
            logits_s = self.decoder_semantic(start_s, [s2, s3, s4], pooled)
            logits_f = self.decoder_frequency(start_f, [f2, f1, f_stem], pooled)
            logits = self.fuse(torch.cat([logits_s, logits_f], dim=1))
            return {"logits": logits, "logits_semantic": logits_s, "logits_frequency": logits_f}
        start = torch.cat([start_s, start_f], dim=1) if config.use_ffbi else start_s
        skips = [torch.cat(pair, dim=1) for pair in ((s2, f2), (s3, f1), (s4, f_stem))]
        return {"logits": self.decoder(start, skips, pooled)}


def freqmedclip_loss(config: FreqMedCLIPConfig, bce_weight: float = 1.0, semantic_weight: float = 0.4,
                     frequency_weight: float = 0.4):
    """The paper's objective (Eq. 19-20, Table 2 weights).

    ``L = Dice(M) + lambda BCE(M) + alpha Dice(sigmoid(L_s)) + beta Dice(sigmoid(L_f))`` with ``lambda =
    bce_weight``, ``alpha = semantic_weight``, ``beta = frequency_weight``; the deep-supervision terms apply when the
    outputs hold branch logits (two decoders). Returns ``{"loss", "dice", "bce"}`` plus ``"dice_semantic"`` and
    ``"dice_frequency"`` when present.
    """

    def loss(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = bce_dice_loss(outputs["logits"], target, bce_weight, 1.0)
        total = parts["loss"]
        for key, name, weight in (("logits_semantic", "dice_semantic", semantic_weight),
                                  ("logits_frequency", "dice_frequency", frequency_weight)):
            if key in outputs:
                parts[name] = soft_dice_loss(outputs[key], target)
                total = total + weight * parts[name]
        parts["loss"] = total
        return parts

    return loss


def describe_freqmedclip_text(config: FreqMedCLIPConfig) -> str:
    """What the prompt does in a FreqMedCLIP of ``config`` (for the catalogue)."""
    if not config.reads_text:
        return "The prompt is ignored (TCA, the FFBI text gate and LFFI are all switched off)."
    where = [name for name, used in (("the ViT adapters (TCA)", config.use_tca),
                                     ("FFBI's text gate", config.use_ffbi and config.use_text_gate),
                                     ("every decoder stage (LFFI)", config.use_lffi)) if used]
    listed = where[0] if len(where) == 1 else f"{', '.join(where[:-1])} and {where[-1]}"
    return (f"The prompt conditions {listed} on every slice, so it changes the output. The network "
            "segments what it was trained to find from such prompts; it picks other targets by name only if trained "
            "on several.")


register(
    ModelSpec(
        name="freqmedclip",
        title="FreqMedCLIP",
        describe_text=describe_freqmedclip_text,
        config_class=FreqMedCLIPConfig,
        builder=FreqMedCLIP,
        presets={
            "paper": {},
            "small": {"fpn_widths": (64, 32, 16, 8), "freq_depths": (1, 1, 1, 1), "freq_dims": (16, 32, 64, 128),
                      "fusion_dim": 64, "fusion_heads": 4, "decoder_widths": (32, 16, 8), "film_hidden": 64},
        },
        default_preprocessing={
            "size": [224, 224],
            "intensity": {  # Sec. 3.2 "min-max for CT"; MR in [0, 1] for the ViT (see the module docstring)
                "CT": {"kind": "minmax"},
                "MR": {"kind": "percentile", "low": 0.5, "high": 99.5},
            },
        },
        input_range=(0.0, 1.0),
        loss=freqmedclip_loss,
        default_text_encoder=f"open_clip:{BIOMEDCLIP}",
    )
)
