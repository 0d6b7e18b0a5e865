"""Token blocks on a square grid: patch embedding, LViT's ConvTransBN, text-to-grid projection (MMRDL's ConvB), a
pre-norm transformer block, and the U-shaped token processor (MMRDL's P_CM, built like LViT's ViT branch)."""

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


class TokenConvBN(nn.Module):
    """LViT's ``ConvTransBN`` on a token sequence: ``Conv1d`` (kernel 3, along the raster-ordered tokens) from
    ``C_in`` to ``C_out`` channels, BatchNorm over the channels, ReLU. P_CM joins its levels with it. The convolution
    has no bias (LViT's has one, which the BatchNorm right after it cancels).

    Shapes: ``(B, N, C_in) -> (B, N, C_out)``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm1d(out_dim)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x.transpose(1, 2)))).transpose(1, 2)


class TextTokenProjection(nn.Module):
    """MMRDL's ConvB (Eq. 2-3): prompt tokens into the joint feature space, on the vision token grid.

    A width projection ``Conv1d(D -> C, 3)`` along the token sequence (LViT's text convolutions) brings the
    encoder's width to the joint width; ConvB proper is LViT's ``ConvTransBN`` that maps the text onto the image
    tokens: a convolution whose input channels are the ``max_tokens`` prompt positions and whose output channels are
    the ``N`` grid tokens, with kernel 3 sliding along the feature axis (as LViT's), batch normalisation over the
    ``N`` outputs, and ReLU. Padding tokens (``mask`` False) are zeroed and sequences are zero-padded to
    ``max_tokens``, so the result does not depend on how much padding the text encoder produced.

    Shapes: tokens ``(B, L, D)`` with ``L <= max_tokens``, mask ``(B, L)`` bool -> ``(B, N, C)``.
    """

    def __init__(self, text_dim: int, max_tokens: int, channels: int, tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.width = nn.Conv1d(text_dim, channels, 3, padding=1)
        self.conv = nn.Conv1d(max_tokens, tokens, 3, padding=1)
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
    """Pre-norm transformer block as LViT's: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``, the MLP being
    ``GELU(Linear(Dropout(GELU(Linear(.)))))`` followed by dropout (LViT applies GELU after both layers);
    the attention weights are not dropped (LViT's attention dropout is 0).

    Shapes: ``(B, N, C) -> (B, N, C)``; ``C`` divisible by ``heads``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the token width ({dim}) must be divisible by the heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = round(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, count, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, count, dim))
        return x + self.mlp(self.norm2(x))


class TokenUNet(nn.Module):
    """U-shaped token processor (MMRDL's P_CM, laid out like LViT's ViT branch).

    Every level works on the same ``N`` tokens at its own width ``w_j`` (strictly increasing). Level 1 reads the
    fused feature ``F``; level ``j >= 2`` also has an input of its own, the patch-embedded Enc_I stage ``j``
    (``e_j``, given by the caller), as in LViT. Each level's transformer is ``depth`` blocks, joined by LViT's
    ``ConvTransBN`` (:class:`TokenConvBN`, with BatchNorm):

    * down path: ``y_1 = T_1(F)``; ``y_j = [CTBN(T_j(e_j)), y_(j-1)]``, the transformer output narrowed to
      ``w_j - w_(j-1)`` channels and concatenated with the level below (LViT halves it: ``w_j = 2 w_(j-1)``);
    * up path: ``u_4 = T'_4(y_4)``; ``u_j = T'_j(y_j) + CTBN(u_(j+1))`` (``w_(j+1) -> w_j``).

    Shapes: ``F`` ``(B, N, w_1)`` and ``[e_2, e_3, e_4]`` with ``e_j`` ``(B, N, w_j)``
    -> ``[u_1, .., u_4]`` with ``u_j`` ``(B, N, w_j)`` (finest first).
    """

    def __init__(self, widths: tuple[int, ...], depth: int = 1, heads: int = 8, mlp_ratio: float = 4.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if any(b <= a for a, b in itertools.pairwise(widths)):
            raise ValueError(f"P_CM's level widths must increase (each level adds channels), got {widths}")

        def stage(width: int) -> nn.Sequential:
            return nn.Sequential(*(TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(depth)))

        self.down = nn.ModuleList(stage(w) for w in widths)
        self.up = nn.ModuleList(stage(w) for w in widths)
        self.lift = nn.ModuleList(TokenConvBN(b, b - a) for a, b in itertools.pairwise(widths))
        self.narrow = nn.ModuleList(TokenConvBN(b, a) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.down) - 1:
            raise ValueError(f"P_CM takes one input per level after the first ({len(self.down) - 1}), "
                             f"got {len(inputs)}")
        skips = [self.down[0](x)]
        for level, tokens in enumerate(inputs, start=1):
            skips.append(torch.cat([self.lift[level - 1](self.down[level](tokens)), skips[-1]], dim=-1))
        outputs = [self.up[-1](skips[-1])]
        for level in range(len(skips) - 2, -1, -1):
            outputs.insert(0, self.up[level](skips[level]) + self.narrow[level](outputs[0]))
        return outputs
