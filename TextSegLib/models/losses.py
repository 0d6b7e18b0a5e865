"""Segmentation losses shared by the networks' training recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - Dice`` of ``sigmoid(logits)`` against a binary target, per sample, averaged over the batch.

    Shapes: ``logits`` and ``target`` ``(B, 1, H, W)`` -> scalar. ``smooth`` keeps empty slices defined
    (an all-background prediction on an all-background slice has loss 0).
    """
    probability = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (probability * target).sum(1)
    total = probability.sum(1) + target.sum(1)
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).mean()


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float, dice_weight: float
) -> dict[str, torch.Tensor]:
    """Weighted sum of binary cross-entropy (on logits) and soft Dice loss.

    Shapes: ``(B, 1, H, W)`` each. Returns ``{"loss", "bce", "dice"}`` (scalars).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    dice = soft_dice_loss(logits, target)
    return {"loss": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}
