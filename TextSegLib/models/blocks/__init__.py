"""Building blocks shared by the TextSeg networks. Each documents its tensor shapes."""

from .attention import PartialConv, TextImageAgentAttention
from .convs import ConvNormAct, DoubleConv, LayerNorm2d
from .frequency import AdaptiveFrequencyFilter, SpatialFrequencyPerceptionF, StarReLU
from .rolling import DORMLP, ORMLP, DORMLPBlock, channel_roll
from .spatial import SpatialFrequencyPerceptionS

__all__ = [
    "DORMLP",
    "ORMLP",
    "AdaptiveFrequencyFilter",
    "ConvNormAct",
    "DORMLPBlock",
    "DoubleConv",
    "LayerNorm2d",
    "PartialConv",
    "SpatialFrequencyPerceptionF",
    "SpatialFrequencyPerceptionS",
    "StarReLU",
    "TextImageAgentAttention",
    "channel_roll",
]
