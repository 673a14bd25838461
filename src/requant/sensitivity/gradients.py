"""Gradient engine: gradients of the LM loss with respect to the quantizable weights only.

Every sensitivity measure (Fisher, Taylor terms, PQI) is built from `window_gradients`, so the rules live
in one place: only the listed weights require grad, accumulators are fp32, non-finite values are named.
Sums over windows go through `gradient_sums`, the one place that splits the batches across torch.distributed
ranks and all-reduces the fp32 totals (requant.distributed); with one process it is a plain sum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..errors import NumericalError
from ..loss import token_nll
from ..model import UnitRef, unit_ref
from ..progress import bar

# (model, windows) -> (differentiable summed loss, number of terms it sums); token_nll by default.
LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, int]]


@contextlib.contextmanager
def grads_only_for(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, UnitRef]]:
    """Within the block, only the parameters holding the named units require grad (a fused 3-D expert
    parameter as a whole: autograd gives its gradient, each expert unit reads its slice through its UnitRef)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    refs = {n: unit_ref(model, n) for n in names}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for r in refs.values():
            r.param.requires_grad_(True)
        yield refs
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
    sharded: bool = False,
) -> Iterator[tuple[int, float, int, dict[str, torch.Tensor]]]:
    """For each batch of windows yield (first window index, summed NLL, token count, fp32 grads of the sum).

    The caller scales: the gradient of the mean loss over all windows is Σ grads / Σ tokens. With `sharded`,
    only this rank's batches (requant.distributed.shard over batch indices); the caller must all-reduce.
    """
    starts = list(range(0, len(windows), batch_size))
    if sharded:
        starts = [starts[i] for i in distributed.shard(len(starts))]
    with grads_only_for(model, names) as refs:
        params = list({id(r.param): r.param for r in refs.values()}.values())
        pbar = bar(total=sum(len(windows[s : s + batch_size]) for s in starts), desc=desc, unit="win")
        with contextlib.closing(pbar):  # also when the caller stops early: the stage's line must still end
            for start in starts:
                batch = windows[start : start + batch_size]
                for p in params:
                    p.grad = None
                nll, count = loss_fn(model, batch)
                if not math.isfinite(nll.item()):
                    raise NumericalError(f"loss is not finite on calibration window {start}")
                nll.backward()
                grads = {}
                for n, r in refs.items():
                    assert r.param.grad is not None
                    g = r.of(r.param.grad).float()
                    if g._base is not None:  # a slice of a fused parameter's grad: its own contiguous copy
                        g = g.contiguous() if not g.is_contiguous() else g.clone()
                    # A finite sum implies finite entries (inf/NaN propagate); the full check runs only when the
                    # sum is not finite, which an fp32 overflow of finite entries could also cause.
                    if not torch.isfinite(g.sum()) and not torch.isfinite(g).all():
                        raise NumericalError(f"gradient of {n} is not finite on calibration window {start}")
                    grads[n] = g
                yield start, nll.item(), count, grads
                pbar.update(len(batch))


@dataclass
class GradientSums:
    """Totals over all windows (all ranks): summed token NLL, token count, Σ over batches of f(grad, count)."""

    nll: float
    tokens: int
    grads: dict[str, torch.Tensor]  # fp32, on the model's device


def gradient_sums(
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    desc: str = "gradients",
    loss_fn: LossFn = token_nll,
    per_batch: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> GradientSums:
    """Σ over batches of `per_batch(grad of the batch's summed NLL, its token count)` (default: the grad itself),
    with the NLL and token totals; batches are split across ranks and the fp32 sums all-reduced, so every
    rank returns the same totals (equal to one process's up to fp32 summation order)."""
    acc: dict[str, torch.Tensor] = {}
    nll_total, tokens = 0.0, 0
    for _, nll, count, grads in window_gradients(
        model, names, windows, batch_size=batch_size, desc=desc, loss_fn=loss_fn, sharded=True
    ):
        nll_total += nll
        tokens += count
        for n, g in grads.items():
            term = g if per_batch is None else per_batch(g, count)
            # window_gradients hands out a fresh tensor per batch, so the first term can be kept.
            if n in acc:
                acc[n] += term
            else:
                acc[n] = term
    for n in names:  # a rank with no batches (fewer batches than ranks) still joins the reduction
        if n not in acc:
            acc[n] = torch.zeros_like(unit_ref(model, n).weight, dtype=torch.float32)
    distributed.all_reduce_(acc)
    nll_total, total_tokens = distributed.all_reduce_scalars(nll_total, tokens)
    return GradientSums(nll_total, int(total_tokens), {n: acc[n] for n in names})


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
    sums = gradient_sums(model, names, windows, batch_size=batch_size, desc=desc, loss_fn=loss_fn)
    return sums.nll / sums.tokens, {n: g / sums.tokens for n, g in sums.grads.items()}
