"""Gradient engine: gradients of the LM loss with respect to the quantizable weights only.

Every sensitivity measure (Fisher, Taylor terms, PQI) is built from `window_gradients`, so the rules live
in one place: only the listed weights require grad, accumulators are fp32, non-finite values are named.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import NumericalError
from ..loss import token_nll
from ..progress import bar

# (model, windows) -> (differentiable summed loss, number of terms it sums); token_nll by default.
LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, int]]


@contextlib.contextmanager
def grads_only_for(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, nn.Parameter]]:
    """Within the block, only the weights of the named linear layers require grad."""
    saved = {p: p.requires_grad for p in model.parameters()}
    weights = {n: model.get_submodule(n).weight for n in names}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        yield weights
    finally:
        for p, flag in saved.items():
            p.grad = None
            p.requires_grad_(flag)


def window_gradients(
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    desc: str = "gradients",
    loss_fn: LossFn = token_nll,
) -> Iterator[tuple[int, float, int, dict[str, torch.Tensor]]]:
    """For each batch of windows yield (first window index, summed NLL, token count, fp32 grads of the sum).

    The caller scales: the gradient of the mean loss over all windows is Σ grads / Σ tokens.
    """
    with grads_only_for(model, names) as weights:
        pbar = bar(total=len(windows), desc=desc, unit="win")
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            for w in weights.values():
                w.grad = None
            nll, count = loss_fn(model, batch)
            if not math.isfinite(nll.item()):
                raise NumericalError(f"loss is not finite on calibration window {start}")
            nll.backward()
            grads = {}
            for n, w in weights.items():
                g = w.grad.float()
                if not torch.isfinite(g).all():
                    raise NumericalError(f"gradient of {n} is not finite on calibration window {start}")
                grads[n] = g
            yield start, nll.item(), count, grads
            pbar.update(len(batch))
        pbar.close()


def mean_loss_gradient(
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    desc: str = "gradient",
    loss_fn: LossFn = token_nll,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean token NLL F over the windows and its fp32 gradient for the named layers' weights."""
    acc: dict[str, torch.Tensor] = {}
    nll_total, tokens = 0.0, 0
    for _, nll, count, grads in window_gradients(
        model, names, windows, batch_size=batch_size, desc=desc, loss_fn=loss_fn
    ):
        nll_total += nll
        tokens += count
        for n, g in grads.items():
            if n in acc:
                acc[n] += g
            else:
                acc[n] = g.clone()
    return nll_total / tokens, {n: g / tokens for n, g in acc.items()}
