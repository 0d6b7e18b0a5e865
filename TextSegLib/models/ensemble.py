"""Several trained networks of one architecture and config as one network (FreqMedCLIP's "3-checkpoint ensemble").

The ensemble's logit is the logit of the mean of the members' probabilities, computed stably as
``logsumexp_i log sigmoid(l_i) - logsumexp_i log sigmoid(-l_i)`` (the ``log N`` of both means cancels), so the
engine's sigmoid and threshold give the averaged probability. The engine resizes logits to each slice's size before
its sigmoid; an ensemble file therefore averages at the network's resolution, where ``textseg segment -m A -m B``
averages after resizing: the two agree up to the resampling of the probabilities.

Frozen pretrained weights that every member builds from the same source (``external_weights``, FreqMedCLIP's
ViT) are shared: the ensemble holds one copy, and checkpoints store none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from TextSegLib.text.features import TextFeatures

__all__ = [
    "Ensemble",
]


class Ensemble(nn.Module):
    """Members averaged in probability.

    Shapes: image ``(B, C, H, W)``, text as the members take it -> logits ``(B, 1, H, W)``.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two networks, got {len(members)}")
        first = members[0]
        if any(type(m) is not type(first) or m.config != first.config for m in members[1:]):
            raise ValueError("the networks of an ensemble must share architecture and config (they differ only in "
                             "their trained weights)")
        external = tuple(getattr(first, "external_weights", ()))
        for member in members[1:]:
            for prefix in external:  # one copy of the frozen pretrained modules
                parent, _, name = prefix.rstrip(".").rpartition(".")
                setattr(member.get_submodule(parent) if parent else member, name,
                        first.get_submodule(prefix.rstrip(".")))
        self.members = nn.ModuleList(members)
        self.config = first.config
        self.external_weights = tuple(f"members.{i}.{prefix}" for i in range(len(members)) for prefix in external)

    def forward(self, image: torch.Tensor, text: TextFeatures | None) -> torch.Tensor:
        logits = torch.stack([member(image, text) for member in self.members])
        return torch.logsumexp(F.logsigmoid(logits), dim=0) - torch.logsumexp(F.logsigmoid(-logits), dim=0)
