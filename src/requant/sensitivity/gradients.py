"""Gradient engine: gradients of the LM loss with respect to the quantizable weights only.

Every sensitivity measure (Fisher, Taylor terms, PQI) is built from `window_gradients`, so the rules live
in one place: only the listed weights require grad, accumulators are fp32, non-finite values are named.
Sums over windows go through `gradient_sums`, the one place that splits the batches across torch.distributed
ranks and all-reduces the fp32 totals (requant.distributed); with one process it is a plain sum.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
    into: Mapping[str, torch.Tensor] | None = None,
) -> GradientSums:
    """Σ over batches of `per_batch(grad of the batch's summed NLL, its token count)` (default: the grad itself),
    with the NLL and token totals; batches are split across ranks and the fp32 sums all-reduced, so every
    rank returns the same totals (equal to one process's up to fp32 summation order).

    Streaming: each parameter's gradient is folded into the fp32 sums as soon as backward has accumulated it
    (a post-accumulate-grad hook) and freed at once, so no whole-model gradient is ever held, only the sums.
    A fused 3-D expert parameter folds each expert's slice. `per_batch` gets an fp32 (out, in) tensor (possibly
    a view of the parameter's gradient) and must not write into it. `into` gives the sums' storage (fp32, shaped
    like the units, e.g. memory-mapped files; its contents are overwritten); default: fresh tensors on the
    model's device. Bit-identical to summing whole-model gradients window by window (same order per element).
    """
    starts = list(range(0, len(windows), batch_size))
    starts = [starts[i] for i in distributed.shard(len(starts))]
    acc: dict[str, torch.Tensor] = {}
    for n in names:
        w = unit_ref(model, n).weight
        acc[n] = into[n] if into is not None else torch.empty(w.shape, dtype=torch.float32, device=w.device)
    folded: set[str] = set()  # units whose sum holds a first term (the others are overwritten, not added to)
    state: dict[str, Any] = {"count": 0, "bad": None}
    nll_total, tokens = 0.0, 0
    with grads_only_for(model, names) as refs:
        units_of: dict[int, list[tuple[str, UnitRef]]] = {}
        params: dict[int, nn.Parameter] = {}
        for n, r in refs.items():
            units_of.setdefault(id(r.param), []).append((n, r))
            params[id(r.param)] = r.param

        def fold(p: torch.Tensor) -> None:
            full, p.grad = p.grad, None  # freed as soon as its units are folded in
            if full is None:
                return
            for n, r in units_of[id(p)]:
                g = r.of(full).float()  # no copy for an fp32 model
                # A finite sum implies finite entries (inf/NaN propagate); the full check runs only when the
                # sum is not finite, which an fp32 overflow of finite entries could also cause.
                if not torch.isfinite(g.sum()) and not torch.isfinite(g).all():
                    state["bad"] = state["bad"] or n
                    continue
                term = g if per_batch is None else per_batch(g, state["count"])
                if n in folded:
                    acc[n].add_(term)
                else:  # the first term is copied, not added to zeros: -0.0 stays -0.0, as in a plain sum
                    acc[n].copy_(term)
                    folded.add(n)

        handles = [p.register_post_accumulate_grad_hook(fold) for p in params.values()]
        pbar = bar(total=sum(len(windows[s : s + batch_size]) for s in starts), desc=desc, unit="win")
        try:
            with contextlib.closing(pbar):
                for start in starts:
                    batch = windows[start : start + batch_size]
                    nll, count = loss_fn(model, batch)
                    if not math.isfinite(nll.item()):
                        raise NumericalError(f"loss is not finite on calibration window {start}")
                    state["count"] = count
                    nll.backward()  # fold() runs for each parameter as its gradient is complete
                    if state["bad"] is not None:
                        raise NumericalError(f"gradient of {state['bad']} is not finite on calibration window {start}")
                    nll_total += nll.item()
                    tokens += count
                    pbar.update(len(batch))
        finally:
            for h in handles:
                h.remove()
    for n in names:  # a unit with no term (a rank with no batches, fewer batches than ranks) is zero
        if n not in folded:
            acc[n].zero_()
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
