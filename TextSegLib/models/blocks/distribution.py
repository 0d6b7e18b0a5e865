"""Diagonal Gaussians fitted to feature sets, their KL divergence, reparameterised sampling, and MMRDL's
distribution fusion of text and vision features with learnable features (Sec. 3.2, Eq. 3-11)."""

from __future__ import annotations

import torch
from torch import nn

FUSED_STATISTICS = ("joint", "learnable")


def gaussian_from_set(members: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of a diagonal Gaussian fitted to a set of features (Eq. 5-8).

    The mean is the set average; the variance is the biased average ``1/M sum (x - mu)^2`` of Eq. 6 and 8, taken
    element-wise (the diagonal of their covariance: with ``M`` members in ``D >> M`` dimensions the full
    covariance is singular, and Eq. 10 is written for one dimension). ``eps`` is added to the variance before the
    square root, so the deviation stays positive and differentiable when all members agree.

    Shapes: ``members`` ``(..., M, ...)`` with the set along ``dim`` -> mean and std with ``dim`` removed.
    """
    mean = members.mean(dim)
    variance = (members - mean.unsqueeze(dim)).square().mean(dim)
    return mean, (variance + eps).sqrt()


def gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(p || q)`` of the univariate Gaussians ``p = N(mean_p, std_p^2)``, ``q = N(mean_q, std_q^2)``
    (Eq. 9-10): ``log(std_q / std_p) + (std_p^2 + (mean_p - mean_q)^2) / (2 std_q^2) - 1/2``.

    Eq. 10 as printed divides by ``2 sigma_p^2``; that expression is not the integral of Eq. 9 (it is unbounded
    below), so the closed form of Eq. 9 is used, which equals ``torch.distributions.kl_divergence``.

    Shapes: four tensors of one shape -> that shape; zero where ``p = q``, positive elsewhere.
    """
    ratio = (std_p / std_q).square()
    return 0.5 * (ratio + ((mean_p - mean_q) / std_q).square() - 1.0) - torch.log(std_p / std_q)


def reparameterise(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample ``mean + omega * std`` with ``omega ~ N(0, I)`` (Eq. 11); differentiable in ``mean`` and ``std``.

    Shapes: ``mean`` and ``std`` of one shape -> that shape.
    """
    omega = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + omega * std


class DistributionFusion(nn.Module):
    """MMRDL's multi-modal feature fusion with ``K`` learnable features (Sec. 3.2).

    The learnable features ``F_L`` (``K`` copies of one token map of the joint space) start as ``F_P + 0.1 N(0, I)``
    with ``F_P`` the encoded initialising prompt (Eq. 3-4, :meth:`initialise`). For text features ``F_T`` and
    vision features ``F_V`` of a sample:

    * ``p``: the Gaussian of ``{F_T, F_L^1..F_L^K}`` (Eq. 5-6), ``q``: the Gaussian of ``{F_V, F_L^1..F_L^K}``
      (Eq. 7-8), diagonal (see :func:`gaussian_from_set`);
    * ``KL(p || q)`` (Eq. 9-10), averaged over the elements of the token map: one value per sample;
    * the fused distribution ``r = N(mu_r, sigma_r)`` and ``F = mu_r + omega sigma_r`` (Eq. 11).

    The paper writes ``mu_r = mu(F_L)``, ``sigma_r = sigma(F_L)``. Taken literally (``statistics="learnable"``)
    ``r`` does not depend on the input: the fused feature is the same for every image and prompt, and the text
    acts on training only through the KL term. The default ``statistics="joint"`` estimates ``r`` from the
    learnable features the way ``p`` and ``q`` are estimated, with both observed features in the set:
    ``{F_T, F_V, F_L^1..F_L^K}``, so ``r`` holds the modality-common part through ``F_L`` and the modality-specific
    parts through ``F_T`` and ``F_V``.

    ``sample=False`` returns the mean ``mu_r`` (no randomness; MMRDL uses it in eval mode).

    Shapes: text and vision ``(B, N, C)`` -> fused ``(B, N, C)`` and KL ``(B,)``.
    """

    def __init__(self, num_features: int, tokens: int, channels: int, statistics: str = "joint",
                 eps: float = 1e-6) -> None:
        super().__init__()
        if statistics not in FUSED_STATISTICS:
            raise ValueError(f"unknown fused statistics {statistics!r}; use one of {', '.join(FUSED_STATISTICS)}")
        if num_features < 1:
            raise ValueError("the distribution fusion needs at least one learnable feature")
        self.statistics = statistics
        self.eps = eps
        self.learnable = nn.Parameter(torch.zeros(num_features, tokens, channels))
        self.initialise(torch.zeros(tokens, channels))

    @torch.no_grad()
    def initialise(self, prompt_feature: torch.Tensor, noise: float = 0.1,
                   generator: torch.Generator | None = None) -> None:
        """Set ``F_L^i = F_P + noise * N(0, I)`` for ``i = 1..K`` (Eq. 4).

        Shapes: ``prompt_feature`` ``(N, C)`` (``F_P``, the encoded initialising prompt in the joint space).
        """
        if prompt_feature.shape != self.learnable.shape[1:]:
            raise ValueError(f"the prompt feature must be {tuple(self.learnable.shape[1:])}, "
                             f"got {tuple(prompt_feature.shape)}")
        omega = torch.randn(self.learnable.shape, generator=generator, dtype=self.learnable.dtype)
        self.learnable.copy_(prompt_feature.to(self.learnable) + noise * omega.to(self.learnable.device))

    def forward(self, text: torch.Tensor, vision: torch.Tensor, sample: bool,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=vision.device.type, enabled=False):
            text, vision = text.float(), vision.float()
            batch = vision.shape[0]
            learnable = self.learnable.float().unsqueeze(0).expand(batch, -1, -1, -1)  # (B, K, N, C)
            mean_p, std_p = gaussian_from_set(torch.cat([text.unsqueeze(1), learnable], 1), eps=self.eps)
            mean_q, std_q = gaussian_from_set(torch.cat([vision.unsqueeze(1), learnable], 1), eps=self.eps)
            kl = gaussian_kl(mean_p, std_p, mean_q, std_q).flatten(1).mean(1)
            if self.statistics == "joint":
                members = torch.cat([text.unsqueeze(1), vision.unsqueeze(1), learnable], 1)
                mean_r, std_r = gaussian_from_set(members, eps=self.eps)
            else:
                mean_r, std_r = (t.expand(batch, -1, -1) for t in gaussian_from_set(learnable[:1], eps=self.eps))
            fused = reparameterise(mean_r, std_r, generator) if sample else mean_r
        return fused, kl
