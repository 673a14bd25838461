"""Per-layer code widths: spend a bits budget on codes one bit wider where they lower the loss most per bit.

A layer's gain from the wider code is its drop in the Fisher-weighted squared error Σ F (w − ŵ)² (the diagonal
second-order estimate of the loss increase that SqueezeLLM's k-means minimises), its cost the extra bits of its
codes and tables; layers are taken greedily by gain per extra bit while they fit in the budget (a 0/1 knapsack
read greedily: a layer that does not fit is passed over and a smaller one after it may still fit).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def fisher_error(weight: torch.Tensor, recon: torch.Tensor, fisher: torch.Tensor) -> float:
    """Σ F (w − ŵ)² over the layer."""
    return float((fisher.double() * (weight.double() - recon.double()).square()).sum())


def plan_widths(gain: Mapping[str, float], cost: Mapping[str, int], room: int) -> list[str]:
    """The layers to widen, in the order taken: by gain per extra bit (ties: the earlier layer, as the sort is
    stable), each only if its positive gain comes at a cost that still fits in `room` bits."""
    chosen = []
    for n in sorted(gain, key=lambda n: -gain[n] / max(cost[n], 1)):
        if gain[n] > 0 and cost[n] <= room:
            chosen.append(n)
            room -= cost[n]
    return chosen
