"""Text-image agent attention (TexLiverNet's TIA, Eq. 1-3) and FasterNet's partial convolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PartialConv",
    "TextImageAgentAttention",
]


class PartialConv(nn.Module):
    """PConv (FasterNet): a 3x3 convolution over the first ``ratio * C`` channels; the rest pass unchanged.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, ratio: float = 0.25) -> None:
        super().__init__()
        self.part = max(1, int(channels * ratio))
        self.conv = nn.Conv2d(self.part, self.part, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head, tail = x.split([self.part, x.shape[1] - self.part], dim=1)
        return torch.cat([self.conv(head), tail], dim=1)


class TextImageAgentAttention(nn.Module):
    """TIA-attention: image queries attend to text tokens through a small set of image agents.

    Following TexLiverNet Eq. 1-3 with image features ``f_I`` (``C x H x W``) and text tokens ``f_T`` (``L x D``):

    * ``Q = f_I W_Q + P_I`` (1x1 conv, learnable image positional encoding ``P_I``, resized bilinearly when the
      feature grid differs from the one it was created for),
      ``K = f_T W_K + P_T``, ``V = f_T W_V + P_T`` (linear maps of the text tokens to ``C`` channels, learnable
      text positional encoding ``P_T`` of ``max_text_tokens`` rows);
    * agents ``A = AdaptiveAvgPool(Q)`` on an ``agent_grid x agent_grid`` grid;
    * ``O = softmax(Q A^T / sqrt(d)) softmax(A K^T / sqrt(d)) V``: agents gather text values, queries read the
      agents, so no ``HW x L`` similarity is ever formed; padded text tokens are masked out of the second softmax;
    * diversity recovery: ``f_S = O + PWConv(PConv(f_I))``.

    ``heads = 1`` is the paper's single attention with ``d = C``; more heads split the channels.

    Shapes: image ``(B, C, H, W)``, tokens ``(B or 1, L, D)``, mask ``(B or 1, L)`` bool (True = real token)
    ``-> (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        grid_size: tuple[int, int],
        max_text_tokens: int,
        agent_grid: int = 7,
        heads: int = 1,
        pconv_ratio: float = 0.25,
    ) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"TIA channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.max_text_tokens = max_text_tokens
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Linear(text_dim, channels)
        self.value = nn.Linear(text_dim, channels)
        self.pos_image = nn.Parameter(torch.zeros(1, channels, *grid_size))
        self.pos_text = nn.Parameter(torch.zeros(1, max_text_tokens, channels))
        nn.init.trunc_normal_(self.pos_image, std=0.02)
        nn.init.trunc_normal_(self.pos_text, std=0.02)
        self.agents = nn.AdaptiveAvgPool2d(agent_grid)
        self.recover = nn.Sequential(PartialConv(channels, pconv_ratio), nn.Conv2d(channels, channels, 1))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, heads, N, C / heads)``."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = image.shape
        length = tokens.shape[1]
        if length > self.max_text_tokens:
            raise ValueError(f"TIA takes at most {self.max_text_tokens} text tokens, got {length}")
        pos_image = self.pos_image
        if pos_image.shape[-2:] != (height, width):
            pos_image = F.interpolate(pos_image, size=(height, width), mode="bilinear", align_corners=False)
        query = self.query(image) + pos_image  # (B, C, H, W)
        agents = self.agents(query)  # (B, C, a, a)
        pos_text = self.pos_text[:, :length]
        key = self.key(tokens) + pos_text  # (B|1, L, C)
        value = self.value(tokens) + pos_text

        q = self._split_heads(query.flatten(2).transpose(1, 2))  # (B, h, HW, d)
        a = self._split_heads(agents.flatten(2).transpose(1, 2))  # (B, h, n, d)
        k = self._split_heads(key)  # (B|1, h, L, d)
        v = self._split_heads(value)
        scale = 1.0 / math.sqrt(q.shape[-1])

        logits = (a @ k.transpose(-2, -1)) * scale  # (B, h, n, L)
        logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
        agent_values = logits.softmax(dim=-1) @ v  # (B, h, n, d)
        query_attention = ((q @ a.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, h, HW, n)
        out = (query_attention @ agent_values).transpose(1, 2).reshape(batch, height * width, channels)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return out + self.recover(image)
