"""The language-modelling loss F: next-token cross-entropy, summed so callers can weight windows exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_nll(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL (nats) over a batch of windows (b, L), and the number of predicted tokens.

    Position t predicts token t+1, so the first token of a window is never a target: a window that starts
    with BOS (requant.data.window_bos) scores all its L-1 text tokens and never the BOS itself. Logits are
    upcast to fp32 so a bf16 model still gets an fp32 loss. The sum is differentiable.
    """
    ids = ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits
    # The last position predicts nothing: ignore it rather than slice the logits, which would copy them
    # (vocab × tokens) and add a SliceBackward that scatters the gradient into a zeroed full-size buffer.
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return nll, ids.shape[0] * (ids.shape[1] - 1)
