"""FreqMedCLIP's configuration: every constructor argument of the network, its presets' building blocks and the
ablations of the paper's Table 4. The network is in :mod:`TextSegLib.models.freqmedclip`."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

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
        freq_model, freq_depths, freq_dims: the ConvNeXt v1 (its timm name, whose ImageNet weights
            ``freq_pretrained`` loads) and its stage depths and widths.
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
