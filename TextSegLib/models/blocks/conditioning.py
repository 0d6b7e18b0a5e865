"""Text conditioning and cross-stream attention: FiLM, cross-attention, FreqMedCLIP's TCA and FFBI.

* :class:`FiLM`: ``[gamma, beta] = MLP(t)``, ``y = gamma * x + beta`` on feature maps or token sequences
  (FreqMedCLIP's LFFI, Eq. 14, its FFBI text gate, Eq. 12, and the FiLM-on-tokens form of TCA).
* :class:`CrossAttention`: multi-head attention of queries over a context with a padding mask.
* :class:`TextConditionedAdapter`: FreqMedCLIP's TCA (Eq. 5-6), cross-attention from image tokens to text tokens
  plus a residual FFN, inserted between the blocks of a frozen ViT.
* :class:`BidirectionalCrossAttention` and :class:`FFBI`: FreqMedCLIP's bottleneck fusion (Eq. 10-13).

Linear layers start as in ViTs (truncated normal, std 0.02, zero bias), so the adapters begin close to the
identity and leave a pretrained backbone's features nearly unchanged at the start of training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FFBI",
    "BidirectionalCrossAttention",
    "CrossAttention",
    "FiLM",
    "TextConditionedAdapter",
]


def _vit_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``[gamma, beta] = MLP(t)``, ``y = gamma * x + beta`` (Perez et al. 2018).

    The MLP is ``Linear(cond_dim, hidden) -> GELU -> Linear(hidden, 2C)``. Its last layer starts with small
    weights and the bias ``gamma = 1, beta = 0``, so the modulation starts near the identity while the condition
    already reaches the output.

    Shapes: ``x`` ``(B, C, H, W)`` (feature map, channels on axis 1) or ``(B, N, C)`` (tokens, channels last),
    ``cond`` ``(B, cond_dim)`` -> same shape as ``x``.
    """

    def __init__(self, cond_dim: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * channels))
        _vit_init(self)
        with torch.no_grad():
            self.mlp[-1].bias[:channels] = 1.0

    def coefficients(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma, beta)``, each ``(B, C)``."""
        gamma, beta = self.mlp(cond).chunk(2, dim=-1)
        return gamma, beta

    @staticmethod
    def modulate(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``gamma * x + beta`` broadcast over the spatial axes of a map or the token axis of a sequence."""
        if x.dim() == 4:
            return gamma[:, :, None, None] * x + beta[:, :, None, None]
        if x.dim() == 3:
            return gamma[:, None, :] * x + beta[:, None, :]
        raise ValueError(f"FiLM modulates (B, C, H, W) maps or (B, N, C) tokens, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.coefficients(cond.to(x.dtype))
        return self.modulate(x, gamma, beta)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a context: ``softmax(Q K^T / sqrt(d_h)) V``, then an output projection.

    ``Q = x W_Q``, ``K = c W_K``, ``V = c W_V`` map to ``inner_dim`` channels split into ``heads``; the output
    projection maps ``inner_dim`` back to ``query_dim``. Context positions where ``mask`` is False (padding) get no
    attention.

    Shapes: ``x`` ``(B, N, query_dim)``, ``context`` ``(B, L, context_dim)``, ``mask`` ``(B, L)`` bool or None
    -> ``(B, N, query_dim)``.
    """

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, heads: int) -> None:
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"attention width {inner_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(query_dim, inner_dim)
        self.key = nn.Linear(context_dim, inner_dim)
        self.value = nn.Linear(context_dim, inner_dim)
        self.out = nn.Linear(inner_dim, query_dim)
        _vit_init(self)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, inner) -> (B, heads, N, inner / heads)``."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, inner / heads)
        return self.out(out.transpose(1, 2).flatten(2))


class TextConditionedAdapter(nn.Module):
    """TCA (FreqMedCLIP Eq. 5-6): image tokens attend to the prompt's tokens, then a small residual FFN.

    ``X_ca = X + CA(X W_Q, T W_K, T W_V)`` and ``X_tca = X_ca + FFN(LN(X_ca))`` with the attention and the FFN
    working at reduced widths ``attention_dim`` and ``ffn_dim`` (a lightweight adapter beside a frozen ViT).

    Shapes: tokens ``(B, N, dim)``, text tokens ``(B, L, text_dim)``, text mask ``(B, L)`` bool
    -> ``(B, N, dim)``.
    """

    def __init__(self, dim: int, text_dim: int, attention_dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.attention = CrossAttention(dim, text_dim, attention_dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        _vit_init(self.ffn)

    def forward(self, x: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x, text_tokens.to(x.dtype), text_mask)
        return x + self.ffn(self.norm(x))


class BidirectionalCrossAttention(nn.Module):
    """Symmetric exchange between two token sets (FreqMedCLIP Eq. 11).

    ``A' = A + CA_a(A, B, B)`` and ``B' = B + CA_b(B, A, A)``, both computed from the inputs (neither update sees
    the other's result).

    Shapes: ``a`` ``(B, N_a, dim)``, ``b`` ``(B, N_b, dim)`` -> the same two shapes.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.a_from_b = CrossAttention(dim, dim, dim, heads)
        self.b_from_a = CrossAttention(dim, dim, dim, heads)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + self.a_from_b(a, b), b + self.b_from_a(b, a)


class FFBI(nn.Module):
    """FreqMedCLIP's Frequency-Feature Bridging Integration at the bottleneck (Eq. 10-13).

    Both maps are flattened to tokens and projected to a shared width ``dim`` (``Z_s = flat(S1) W_s``,
    ``Z_f = flat(F3) W_f``), exchange information by :class:`BidirectionalCrossAttention`, are optionally modulated
    by one text gate shared by both streams (``[gamma_b, beta_b] = MLP_b(t)``, Eq. 12), reshaped to maps and
    upsampled 2x bilinearly to initialise the two decoders (Eq. 13).

    Shapes: ``semantic`` ``(B, C_s, h, w)``, ``frequency`` ``(B, C_f, h', w')``, ``pooled`` ``(B, pooled_dim)``
    (needed only with the gate) -> ``((B, dim, 2h, 2w), (B, dim, 2h', 2w'))``.
    """

    def __init__(
        self,
        semantic_channels: int,
        frequency_channels: int,
        dim: int,
        heads: int,
        pooled_dim: int | None = None,
        gate_hidden: int = 256,
    ) -> None:
        super().__init__()
        self.project_semantic = nn.Linear(semantic_channels, dim)
        self.project_frequency = nn.Linear(frequency_channels, dim)
        _vit_init(self)
        self.exchange = BidirectionalCrossAttention(dim, heads)
        self.gate = FiLM(pooled_dim, dim, gate_hidden) if pooled_dim else None

    @staticmethod
    def _to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        grid = tokens.transpose(1, 2).unflatten(-1, (height, width))
        return F.interpolate(grid, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(
        self, semantic: torch.Tensor, frequency: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_s = self.project_semantic(semantic.flatten(2).transpose(1, 2))  # (B, h w, dim)
        z_f = self.project_frequency(frequency.flatten(2).transpose(1, 2))
        z_s, z_f = self.exchange(z_s, z_f)
        if self.gate is not None:
            if pooled is None:
                raise ValueError("FFBI with a text gate needs the pooled text embedding")
            gamma, beta = self.gate.coefficients(pooled.to(z_s.dtype))
            z_s, z_f = FiLM.modulate(z_s, gamma, beta), FiLM.modulate(z_f, gamma, beta)
        return self._to_map(z_s, *semantic.shape[-2:]), self._to_map(z_f, *frequency.shape[-2:])
