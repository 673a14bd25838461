"""Diagonal empirical Fisher as SqueezeLLM computes it: Σ over samples of per-sample squared gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .gradients import gradient_sums


def fisher_information(
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    *,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ_s g_s² (fp32) for each named layer's weight, g_s the gradient of window s's mean token NLL.

    Batch size 1 per sample, as in SqueezeLLM: the square must be taken per sample. A sum, not a mean;
    its scale does not matter to the weighted k-means that consumes it. `into`: the sums' fp32 storage (e.g.
    memory-mapped files), filled in place (requant.sensitivity.gradients.gradient_sums).
    """
    sums = gradient_sums(
        model, names, windows, batch_size=1, desc="fisher", per_batch=lambda g, count: (g / count).square_(), into=into
    )
    return sums.grads
