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

import torch
from torch import nn

from TextSegLib.models.blocks.conditioning import FFBI
from TextSegLib.models.freqmedclip_config import (
    BIOMEDCLIP,
    FreqMedCLIPConfig,
)
from TextSegLib.models.freqmedclip_streams import (
    ConcatFusion,
    FrequencyStream,
    FusionHead,
    LFFIDecoder,
    SemanticStream,
    upsample2,
)
from TextSegLib.models.losses import bce_dice_loss, soft_dice_loss
from TextSegLib.models.registry import ModelSpec, register
from TextSegLib.text.features import TextFeatures


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
            return {"logits": self.decoder(upsample2(s1), [s2, s3, s4], pooled)}
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
