"""MMRDL: multimodal representation distribution learning for medical image segmentation.

Huang, Cai, Jiang, Wang, "Multimodal Representation Distribution Learning for Medical Image Segmentation"
(``../shared/papers/001_b14368e5435f2456.txt``). The paper defers the layouts of Enc_I, Dec and P_CM to its
supplement and says only that they are U-shaped "like LViT" (Sec. 3.4); this file reads them as LViT's two
branches, with MMRDL's fusion in place of LViT's addition of the text. For an input of side ``S`` (224), widths
``w1..w5`` of Enc_I, widths ``v1..v4`` of P_CM and a token grid of ``g = S / 16`` per side::

    x1 = ConvBNReLU(I)                       w1 x S        Enc_I (LViT's CNN branch): stem, then 4 down stages
    x2..x5 = DownStage(x1..x4)               w2..w5        (max pooling + 2 ConvBNReLU); F_V^M = x5 at S / 16
    F_V = Embedding(x_e)                     g*g x v1      Eq. 2: patch convolution + position embedding of the
                                                           Enc_I stage ``embed_stage`` (LViT fuses text at stage 1)
    F_T = ConvB(Enc_T(T))                    g*g x v1      Eq. 1-2: frozen CLIP tokens -> joint space H
    F, KL = DistributionFusion(F_T, F_V)     g*g x v1      Eq. 3-11 (see blocks/distribution.py)
    e_j = Embedding_j(x_j), j = 2..4         g*g x v_j     Enc_I stages 2-4 as tokens (patches 8, 4, 2)
    u1..u4 = P_CM(F; e2, e3, e4)             g*g x v1..v4  U-shaped transformer over the tokens (LViT's ViT branch,
                                                           levels joined by ConvTransBN; see blocks/tokens.py)
    s_j = x_j + Reconstruct_j(u_j)           w_j at S/2^(j-1)   LViT's skip enhancement, j = 1..4
    s_1 = s_1 + F_pha,  F_pha = Enc_P(I)     w1 x S        Eq. 13-15 on the FFT phase spectrum
    O = Dec(x5; s4, s3, s2, s1)              1 x S         Eq. 16: LViT's up stages (PLAM on skips), 1x1 head

P_CM follows LViT's ViT branch: its levels 2-4 have their own inputs, Enc_I's stages 2-4 embedded as tokens (each
through its own patch embedding), and its levels are joined by LViT's ``ConvTransBN`` (a convolution along the
tokens with BatchNorm); only level 1 reads the fused feature ``F``. What this file takes from LViT's code: 8
attention heads, attention weights not dropped, dropout 0.1 after the patch embeddings and in the MLPs, GELU after
both MLP layers, ConvTransBN with kernel 3 (also for ConvB), nearest-neighbour upsampling in ``Reconstruct`` and
the up stages.

Eq. 16, ``O = Dec(F_V^M, F_pha + P_CM(F))``: the decoder starts from the last Enc_I layer ``F_V^M`` and receives
the processed fused feature and the frequency prompt through its skip connections; as in any U-shape (and LViT)
the skips also carry Enc_I's stage outputs. ``F'_V`` of Eq. 1 is taken at ``embed_stage`` (1 by default, where
LViT adds its text), which is why Eq. 16 names the last layer ``F_V^M`` separately.

Enc_T, the frozen pre-trained CLIP text encoder, is not part of this module: ``TextSegLib.text`` loads it
(``open_clip:...``, the spec's default is CLIP ViT-B/16; the paper does not name the variant), keeps it frozen and
hands its token features to :meth:`MMRDL.forward` as :class:`TextFeatures`.

Reading of the fusion (Sec. 3.2): ``T`` is the prompt's CLIP token sequence; ConvB maps it onto the ``g x g`` token
grid of ``F_V`` so that ``F_T``, ``F_V`` and each learnable feature ``F_L^i`` are token maps of the same shape and
Eq. 5-8 can add them. Gaussians are diagonal (Eq. 10 is univariate), the KL is averaged over the token map's
elements, and the fused distribution ``r`` is estimated from ``{F_T, F_V, F_L}`` (``fused_statistics="joint"``)
because the literal ``mu(F_L)`` (``"learnable"``) does not depend on the input.

Training samples ``F = mu_r + omega sigma_r`` (Eq. 11); inference uses ``F = mu_r`` so that eval-mode outputs are
deterministic, unless ``sample_at_inference`` (or ``forward(..., sample=True)``) asks for a sample.

What the text does, as the code stands: the prompt reaches the output only through ``F``. With ``"joint"`` (the
default) ``mu_r`` is the mean of ``K + 2`` members, so ``F_T`` enters ``F`` with weight ``1 / (K + 2)`` (1/34 for
K = 32) beside ``F_V`` and the ``K`` learnable features; the prompt changes the output, by as much as training
makes that share matter. With ``"learnable"`` (the paper read literally) ``r`` is fitted to ``F_L`` alone and the
prompt changes nothing at inference; it acts in training only, through the KL term. Either way MMRDL is trained
for one fixed target per dataset, with the text as training-time knowledge: it is not a network that picks its
target from the prompt.

Binary segmentation: one logit channel; the paper's cross-entropy (Eq. 18) over two softmax classes equals the
binary cross-entropy of this logit. Loss ``0.5 Dice + 0.5 CE + kl_weight * KL`` (Eq. 19).

Ablation switches: ``use_text`` (Table 2; off: ``F = F_V``, no ConvB, no KL), ``use_frequency_prompt``
(Table 2), ``fusion="addition"`` (Table 3: ``F = F_V + F_T`` as LViT, no learnable features, no KL),
``spectrum`` = ``"phase"`` / ``"amplitude"`` / ``"both"`` (Table 4), ``kl_weight`` (Table 5).

The paper's recipe (Sec. 4.3), for ``Training/``: AdamW, learning rate 1e-3 with cosine annealing, 224 x 224
inputs, batch 2 (MoNuSeg, GlaS) or 24 (MosMedData+), early stopping after 50 epochs without improvement
(``Training/configs/mmrdl*.toml``, with LViT's cosine restarted every 10 epochs). The trainer's hook
:meth:`MMRDL.prepare_training` initialises the learnable features from ``init_prompt``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from TextSegLib.models.blocks.convs import ConvNormAct
from TextSegLib.models.blocks.distribution import DistributionFusion
from TextSegLib.models.blocks.fourier import FrequencyPromptEncoder
from TextSegLib.models.blocks.tokens import PatchEmbedding, TextTokenProjection, TokenUNet
from TextSegLib.models.blocks.ushape import DownStage, TokenReconstruct, UpStage
from TextSegLib.models.losses import bce_dice_loss
from TextSegLib.models.registry import ModelSpec, register
from TextSegLib.text.features import TextFeatures

FUSIONS = ("distribution", "addition")


@dataclass(frozen=True)
class MMRDLConfig:
    """Every constructor argument of :class:`MMRDL` (stored verbatim in checkpoints).

    Attributes:
        widths: channels of Enc_I's stem and its four down stages (LViT: ``64, 128, 256, 512, 512``).
        conv_depth: 3x3 ConvBNReLU layers per down and up stage (LViT's ``nb_Conv = 2``).
        in_channels: image channels (3 as LViT; the engine repeats a grey slice).
        image_size: input side; the learnable features live on its ``image_size / 16`` token grid, so the network
            takes exactly this side.
        text_dim: width of the text encoder's token features (512 for CLIP ViT-B).
        max_text_tokens: prompt positions ConvB reads (77, CLIP's context); longer prompts are rejected.
        embed_stage: the Enc_I stage (1-5) whose output ``F'_V`` the Embedding maps into the joint space.
        processor_widths: widths of P_CM's four levels, increasing; the first is the joint space's width
            (LViT doubles them, the Enc_I widths).
        processor_depth: transformer blocks per P_CM level and path.
        processor_heads: attention heads in P_CM (LViT: 8).
        mlp_ratio: hidden width of P_CM's MLPs relative to the level width.
        prompt_widths: Enc_P1's stage widths (``n = len(prompt_widths)``, 2 in the paper); Enc_P2 mirrors them.
        num_learnable: ``K``, the number of learnable features (32).
        init_prompt: ``T_P``, the prompt whose encoding initialises the learnable features (Eq. 3).
        init_noise: the factor of ``N(0, I)`` in Eq. 4 (0.1).
        fusion: ``"distribution"`` (the paper) or ``"addition"`` (LViT's, Table 3).
        fused_statistics: ``"joint"`` (``r`` from ``F_T``, ``F_V`` and ``F_L``) or ``"learnable"`` (from ``F_L``
            only, the literal text; the prompt then cannot reach the output).
        spectrum: what Enc_P reads: ``"phase"``, ``"amplitude"`` or ``"both"`` (Table 4).
        use_text, use_frequency_prompt: module switches of Table 2.
        pixel_attention: LViT's pixel-level attention on the decoder's skip connections.
        sample_at_inference: draw ``F`` from ``r`` also in eval mode (outputs then vary between runs).
        kl_weight: ``lambda_3`` of Eq. 19 (Table 5).
        dropout: dropout after the patch embeddings and in P_CM's MLPs (LViT: 0.1; its attention weights are not
            dropped).
    """

    widths: tuple[int, int, int, int, int] = (64, 128, 256, 512, 512)
    conv_depth: int = 2
    in_channels: int = 3
    image_size: int = 224
    text_dim: int = 512
    max_text_tokens: int = 77
    embed_stage: int = 1
    processor_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    processor_depth: int = 1
    processor_heads: int = 8
    mlp_ratio: float = 4.0
    prompt_widths: tuple[int, ...] = (16, 32)
    num_learnable: int = 32
    init_prompt: str = "a lesion in a medical image"
    init_noise: float = 0.1
    fusion: str = "distribution"
    fused_statistics: str = "joint"
    spectrum: str = "phase"
    use_text: bool = True
    use_frequency_prompt: bool = True
    pixel_attention: bool = True
    sample_at_inference: bool = False
    kl_weight: float = 1.0
    dropout: float = 0.1


class MMRDL(nn.Module):
    """MMRDL (see the module docstring for the layout and the choices made).

    Shapes: image ``(B, in_channels, S, S)`` with ``S = image_size``, text tokens ``(B or 1, L, text_dim)`` with
    ``L <= max_text_tokens`` -> logits ``(B, 1, S, S)``.
    """

    def __init__(self, config: MMRDLConfig) -> None:
        super().__init__()
        if config.fusion not in FUSIONS:
            raise ValueError(f"unknown MMRDL fusion {config.fusion!r}; use one of {', '.join(FUSIONS)}")
        if config.image_size % 16:
            raise ValueError(f"MMRDL needs an image size divisible by 16, got {config.image_size}")
        if not 1 <= config.embed_stage <= 5:
            raise ValueError(f"embed_stage must name an Enc_I stage from 1 to 5, got {config.embed_stage}")
        self.config = config
        widths, levels = config.widths, config.processor_widths
        grid = config.image_size // 16
        joint = levels[0]
        self.stem = ConvNormAct(config.in_channels, widths[0])
        self.down = nn.ModuleList(DownStage(a, b, config.conv_depth) for a, b in itertools.pairwise(widths))
        patch = 2 ** (5 - config.embed_stage)
        self.embedding = PatchEmbedding(widths[config.embed_stage - 1], joint, patch, grid, config.dropout)
        self.text_projection = (
            TextTokenProjection(config.text_dim, config.max_text_tokens, joint, grid * grid)
            if config.use_text else None
        )
        self.fusion = (
            DistributionFusion(config.num_learnable, grid * grid, joint, config.fused_statistics)
            if config.use_text and config.fusion == "distribution" else None
        )
        self.level_embeddings = nn.ModuleList(
            PatchEmbedding(widths[j], levels[j], 16 // 2**j, grid, config.dropout) for j in range(1, 4))
        self.processor = TokenUNet(levels, config.processor_depth, config.processor_heads, config.mlp_ratio,
                                   config.dropout)
        self.reconstruct = nn.ModuleList(TokenReconstruct(levels[j], widths[j], 16 // 2**j) for j in range(4))
        self.prompt_encoder = (
            FrequencyPromptEncoder(config.in_channels, widths[0], config.prompt_widths, config.spectrum)
            if config.use_frequency_prompt else None
        )
        ups, channels = [], widths[4]
        for j in range(3, -1, -1):
            out = widths[max(j - 1, 0)]
            ups.append(UpStage(channels, widths[j], out, config.conv_depth, config.pixel_attention))
            channels = out
        self.up = nn.ModuleList(ups)  # deepest first
        self.head = nn.Conv2d(channels, 1, 1)

    def initialise_learnable_features(self, features: TextFeatures, generator: torch.Generator | None = None) -> None:
        """Set the learnable features to ``ConvB(Enc_T(T_P)) + init_noise * N(0, I)`` (Eq. 3-4).

        ``features`` is ``config.init_prompt`` encoded by the model's text encoder (one prompt). ``F_P`` must be on
        the scale training sees ``F_T`` at (the paper's premise: ``F_L`` starts close to the text features), so
        ConvB's batch normalisation normalises with the prompt's own statistics, as in training mode; it runs on a
        copy of ConvB, so its running statistics are left as they are. (Eval mode would use the fresh running
        statistics, mean 0 and variance 1, and give ``F_P`` a tenth of ``F_T``'s spread, drowned by the 0.1
        noise.) :meth:`prepare_training` calls it.
        """
        if self.fusion is None or self.text_projection is None:
            raise ValueError("this MMRDL has no learnable features (text is off or the fusion is by addition)")
        if len(features) != 1:
            raise ValueError(f"the learnable features are initialised from one prompt, got {len(features)}")
        device = self.fusion.learnable.device
        projection = copy.deepcopy(self.text_projection).train()
        with torch.no_grad():
            prompt = projection(features.tokens.to(device).clone(), features.mask.to(device).clone())
        self.fusion.initialise(prompt[0], self.config.init_noise, generator)

    def prepare_training(self, encode: Callable[[str], TextFeatures]) -> None:
        """The training hook (called by ``Training/`` before the first step, never when a checkpoint is loaded):
        encode ``config.init_prompt`` with the frozen text encoder and initialise the learnable features from it
        (Eq. 3-4). Without learnable features (text off, or fusion by addition) there is nothing to prepare."""
        if self.fusion is not None:
            self.initialise_learnable_features(encode(self.config.init_prompt))

    def _fuse(self, vision: torch.Tensor, text: TextFeatures | None, sample: bool) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """Fused tokens ``F`` and the KL term (0 without text or with addition)."""
        kl = vision.new_zeros(())
        if self.text_projection is None:
            return vision, kl
        if text is None:
            raise ValueError("MMRDL with text needs text features")
        text = text.expand(vision.shape[0])
        features = self.text_projection(text.tokens.to(vision.dtype), text.mask)
        if self.fusion is None:
            return vision + features, kl
        fused, kl = self.fusion(features, vision, sample)
        return fused.to(vision.dtype), kl.mean()

    def forward_train(self, image: torch.Tensor, text: TextFeatures | None,
                      sample: bool | None = None) -> dict[str, torch.Tensor]:
        """Logits ``(B, 1, S, S)`` and the KL term of Eq. 10 (a scalar, the batch mean).

        ``sample`` chooses between drawing ``F`` from ``r`` (Eq. 11) and its mean; by default the network samples
        in training mode and uses the mean in eval mode (unless ``config.sample_at_inference``).
        """
        side = self.config.image_size
        if tuple(image.shape[-2:]) != (side, side):
            raise ValueError(f"this MMRDL takes {side} x {side} images (its learnable features live on the "
                             f"{side // 16} x {side // 16} token grid), got {tuple(image.shape[-2:])}")
        if sample is None:
            sample = self.training or self.config.sample_at_inference
        features = [self.stem(image)]
        for stage in self.down:
            features.append(stage(features[-1]))
        vision = self.embedding(features[self.config.embed_stage - 1])
        fused, kl = self._fuse(vision, text, sample)
        levels = self.processor(fused, [embed(features[j]) for j, embed in enumerate(self.level_embeddings, 1)])
        skips = [features[j] + self.reconstruct[j](levels[j]) for j in range(4)]
        if self.prompt_encoder is not None:
            skips[0] = skips[0] + self.prompt_encoder(image)
        x = features[4]
        for stage, skip in zip(self.up, reversed(skips), strict=True):
            x = stage(x, skip)
        return {"logits": self.head(x), "kl": kl}

    def forward(self, image: torch.Tensor, text: TextFeatures | None, sample: bool | None = None) -> torch.Tensor:
        return self.forward_train(image, text, sample)["logits"]


def mmrdl_loss(
    config: MMRDLConfig, dice_weight: float = 0.5, ce_weight: float = 0.5
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]:
    """The paper's loss (Eq. 19): ``0.5 Dice + 0.5 CE + kl_weight * KL`` (``lambda_3 = config.kl_weight``).

    CE is the binary cross-entropy of the single logit (equal to the two-class softmax cross-entropy of Eq. 18);
    Dice is the soft Dice of the foreground. Returns ``{"loss", "bce", "dice", "kl"}``.
    """

    def loss(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = bce_dice_loss(outputs["logits"], target, ce_weight, dice_weight)
        kl = outputs["kl"].float()
        return {**parts, "loss": parts["loss"] + config.kl_weight * kl, "kl": kl}

    return loss


def describe_mmrdl_text(config: MMRDLConfig) -> str:
    """What the prompt does in an MMRDL of ``config`` (for the catalogue)."""
    if not config.use_text:
        return "The prompt is ignored (text is switched off)."
    if config.fusion == "addition":
        return "The prompt's features are added to the image tokens (LViT's fusion), so it changes the output."
    if config.fused_statistics == "learnable":
        return ("The prompt changes nothing at inference: the fused feature comes from the learned features alone "
                "(the paper read literally); the text acts only in training, through the KL term.")
    return (f"The prompt is one of {config.num_learnable + 2} equal members of the fused feature's mean (weight "
            f"1/{config.num_learnable + 2}, beside the image and {config.num_learnable} learned features). The "
            "network is trained for one fixed target per dataset, with the text as training-time knowledge; it does "
            "not pick its target from the prompt.")


register(
    ModelSpec(
        name="mmrdl",
        title="MMRDL (multimodal representation distribution learning)",
        config_class=MMRDLConfig,
        builder=MMRDL,
        presets={
            "paper": {},
            "small": {
                "widths": (16, 32, 64, 128, 128),
                "processor_widths": (16, 32, 64, 128),
                "processor_heads": 2,
                "prompt_widths": (8, 16),
            },
        },
        default_preprocessing={
            "size": [224, 224],
            "intensity": {
                "CT": {"kind": "window", "low": -1350.0, "high": 150.0},  # lung window (MosMedData+ is lung CT)
                "MR": {"kind": "percentile", "low": 0.5, "high": 99.5},
            },
        },
        loss=mmrdl_loss,
        default_text_encoder="open_clip:ViT-B-16@openai",
        describe_text=describe_mmrdl_text,
    )
)
