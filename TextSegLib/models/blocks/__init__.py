"""Building blocks shared by the TextSeg networks. Each documents its tensor shapes."""

from .attention import PartialConv, TextImageAgentAttention
from .convs import ConvNormAct, DoubleConv, LayerNorm2d, ScaledResidual
from .frequency import (
    AdaptiveFrequencyFilter,
    PositionalFrequencyBranch,
    PositionalFrequencyFilter,
    SpatialFrequencyPerceptionF,
    StarReLU,
)
from .rolling import DORMLP, ORMLP, DORMLPBlock, channel_roll
from .spatial import DenseSpatialPerception, SpatialFrequencyPerceptionS

__all__ = [
    "DORMLP",
    "ORMLP",
    "AdaptiveFrequencyFilter",
    "ConvNormAct",
    "DORMLPBlock",
    "DenseSpatialPerception",
    "DoubleConv",
    "LayerNorm2d",
    "PartialConv",
    "PositionalFrequencyBranch",
    "PositionalFrequencyFilter",
    "ScaledResidual",
    "SpatialFrequencyPerceptionF",
    "SpatialFrequencyPerceptionS",
    "StarReLU",
    "TextImageAgentAttention",
    "channel_roll",
]
