"""Token blocks on a square grid: patch embedding, text-to-grid projection (MMRDL's ConvB), a pre-norm
transformer block, and the U-shaped token processor (MMRDL's P_CM, built like LViT's ViT branch)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens of a square grid as a feature map (row-major order, as ``flatten(2).transpose(1, 2)`` makes them).

    Shapes: ``(B, g * g, C) -> (B, C, g, g)``.
    """
    batch, count, channels = tokens.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(batch, channels, side, side)


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` convolution to ``dim`` channels, plus a learned position embedding per
    token, then dropout (LViT's ``Embeddings``; MMRDL's vision ``Embedding`` of Eq. 2).

    Shapes: ``(B, C, grid * patch, grid * patch) -> (B, grid * grid, dim)``.
    """

    def __init__(self, in_channels: int, dim: int, patch: int, grid: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.grid = grid
        self.project = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        if x.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"the patch embedding was built for a {self.grid} x {self.grid} token grid, "
                             f"got {x.shape[-2]} x {x.shape[-1]}")
        return self.dropout(x.flatten(2).transpose(1, 2) + self.position)


class TextTokenProjection(nn.Module):
    """MMRDL's ConvB (Eq. 2-3): prompt tokens into the joint feature space, on the vision token grid.

    A width projection ``Conv1d(D -> C, 3)`` along the token sequence (LViT's text convolution) brings the
    encoder's width to the joint width; ConvB proper is a convolution over the token axis that maps the
    ``max_tokens`` prompt positions to the ``N`` grid tokens (kernel 1, as LViT's ``ConvTransBN``), batch
    normalisation over the ``N`` outputs, and ReLU. Padding tokens (``mask`` False) are zeroed and sequences are
    zero-padded to ``max_tokens``, so the result does not depend on how much padding the text encoder produced.

    Shapes: tokens ``(B, L, D)`` with ``L <= max_tokens``, mask ``(B, L)`` bool -> ``(B, N, C)``.
    """

    def __init__(self, text_dim: int, max_tokens: int, channels: int, tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.width = nn.Conv1d(text_dim, channels, 3, padding=1)
        self.conv = nn.Conv1d(max_tokens, tokens, 1)
        self.norm = nn.BatchNorm1d(tokens)
        self.act = nn.ReLU(inplace=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.max_tokens:
            raise ValueError(f"the text projection takes at most {self.max_tokens} tokens, got {length}")
        x = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        x = F.pad(x, (0, 0, 0, self.max_tokens - length))  # (B, max_tokens, D)
        x = self.width(x.transpose(1, 2)).transpose(1, 2)  # (B, max_tokens, C)
        return self.act(self.norm(self.conv(x)))  # (B, N, C)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP).

    Shapes: ``(B, N, C) -> (B, N, C)``; ``C`` divisible by ``heads``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the token width ({dim}) must be divisible by the heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = round(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, count, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, count, dim))
        return x + self.mlp(self.norm2(x))


class TokenUNet(nn.Module):
    """U-shaped token processor (MMRDL's P_CM, laid out like LViT's ViT branch).

    Every level works on the same ``N`` tokens at its own width ``widths[j]``. Down path: level 1 reads the input,
    level ``j + 1`` reads a linear widening of level ``j``. Up path: the deepest level is processed again, and
    level ``j`` reads its down-path output plus a linear narrowing of level ``j + 1``'s up-path output (the
    skip connections of the U). Each level is ``depth`` transformer blocks.

    Shapes: ``(B, N, widths[0]) -> [(B, N, widths[j]) for each level j]`` (up-path outputs, finest first).
    """

    def __init__(self, widths: tuple[int, ...], depth: int = 1, heads: int = 4, mlp_ratio: float = 4.0,
                 dropout: float = 0.0) -> None:
        super().__init__()

        def stage(width: int) -> nn.Sequential:
            return nn.Sequential(*(TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(depth)))

        self.down = nn.ModuleList(stage(w) for w in widths)
        self.up = nn.ModuleList(stage(w) for w in widths)
        self.widen = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.narrow = nn.ModuleList(nn.Linear(b, a) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for level, stage in enumerate(self.down):
            x = stage(x if level == 0 else self.widen[level - 1](x))
            skips.append(x)
        outputs = [self.up[-1](skips[-1])]
        for level in range(len(skips) - 2, -1, -1):
            outputs.insert(0, self.up[level](skips[level] + self.narrow[level](outputs[0])))
        return outputs
