"""Diagonal empirical Fisher as SqueezeLLM computes it: Σ over samples of per-sample squared gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .gradients import window_gradients


def fisher_information(model: nn.Module, names: Sequence[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_s g_s² (fp32) for each named layer's weight, g_s the gradient of window s's mean token NLL.

    Batch size 1 per sample, as in SqueezeLLM: the square must be taken per sample. A sum, not a mean;
    its scale does not matter to the weighted k-means that consumes it.
    """
    acc: dict[str, torch.Tensor] = {}
    for _, _, count, grads in window_gradients(model, names, windows, batch_size=1, desc="fisher"):
        for n, g in grads.items():
            sq = (g / count).square_()
            if n in acc:
                acc[n] += sq
            else:
                acc[n] = sq
    return acc
