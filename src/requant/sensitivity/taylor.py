"""Taylor terms of ΔF at w (docs/method.md): first order gᵀΔw, second order ½ΔwᵀHΔw (true and Fisher Hessian)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import distributed
from ..errors import ConfigError, NumericalError
from ..loss import token_nll
from ..model import unit_ref
from ..progress import bar
from .gradients import LossFn, grads_only_for, mean_loss_gradient
from .path import check_path, weights_on_path


def first_order(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    loss_fn: LossFn = token_nll,
) -> tuple[float, dict[str, torch.Tensor]]:
    """First-order term gᵀΔw at w (nats, fp64 sum) and its element-wise terms g ⊙ Δw (fp32, CPU)."""
    with weights_on_path(model, names, original, quantized) as set_point:
        set_point(0.0)
        _, grad = mean_loss_gradient(
            model, names, windows, batch_size=batch_size, desc="gradient at w", loss_fn=loss_fn
        )
    terms = {n: (quantized[n].float() - original[n].float()).mul_(grad[n].cpu()) for n in names}
    return sum(t.sum(dtype=torch.float64).item() for t in terms.values()), terms


def second_order_hvp(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    *,
    subset: Sequence[str] | None = None,
    batch_size: int = 1,
    loss_fn: LossFn = token_nll,
) -> float:
    """Second-order term ½ΔwᵀHΔw at w (nats) with the true Hessian H of the mean loss; may be negative.

    Hessian-vector product by double backward, per batch: Hv = ∇(∇Fᵀv), then vᵀHv. Only `subset` layers
    move if given (Δw = 0 elsewhere). Attention runs on the math SDPA kernel, the one that is twice
    differentiable on every device.
    """
    check_path(model, names, original, quantized, subset)
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    moving = list(names) if subset is None else [n for n in names if n in set(subset)]
    ref = unit_ref(model, names[0]).weight
    work = torch.promote_types(ref.dtype, torch.float32)
    delta = {n: quantized[n].to(ref.device, work) - original[n].to(ref.device, work) for n in moving}
    total, tokens = 0.0, 0
    with (
        weights_on_path(model, names, original, quantized) as set_point,
        grads_only_for(model, moving) as refs,
        sdpa_kernel(SDPBackend.MATH),
    ):
        set_point(0.0)
        # Units of one fused parameter share it: differentiate each parameter once, read each unit's slice.
        params = list({id(r.param): r.param for r in refs.values()}.values())
        slot = {n: next(i for i, p in enumerate(params) if p is refs[n].param) for n in moving}
        starts = range(0, len(windows), batch_size)
        # This rank's batches; the totals are all-reduced below.
        for start in bar([starts[i] for i in distributed.shard(len(starts))], desc="hessian-vector", unit="batch"):
            nll, count = loss_fn(model, windows[start : start + batch_size])
            if not math.isfinite(nll.item()):
                raise NumericalError(f"loss is not finite on calibration window {start}")
            grads = torch.autograd.grad(nll, params, create_graph=True)
            directional = sum((refs[n].of(grads[slot[n]]).to(work) * delta[n]).sum() for n in moving)
            hv = torch.autograd.grad(directional, params)
            quad = sum(
                torch.dot(refs[n].of(hv[slot[n]]).reshape(-1).double(), delta[n].reshape(-1).double()).item()
                for n in moving
            )
            if not math.isfinite(quad):
                raise NumericalError(f"Hessian-vector product is not finite on calibration window {start}")
            total += quad
            tokens += count
    total, tokens = distributed.all_reduce_scalars(total, tokens)
    return 0.5 * total / tokens


def fisher_second_order(
    fisher: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], *, samples: int = 1
) -> float:
    """½ Σ_i F_ii Δw_i² (nats) with the empirical Fisher F = (Σ_s g_s g_sᵀ) / samples as the Hessian.

    `fisher` is what fisher_information returns, a SUM over `samples` windows of squared per-window
    mean-loss gradients; dividing by `samples` makes it the mean per-window Fisher, the usual empirical
    approximation of the Hessian of the mean loss (PSD, so never negative). Only layers in `delta` count.
    """
    if samples < 1:
        raise ConfigError(f"number of Fisher samples {samples} must be at least 1")
    missing = sorted(set(delta) - set(fisher))
    if missing:
        raise ConfigError(f"no Fisher information for layer(s) {', '.join(missing)}")
    total = sum(
        torch.dot(fisher[n].reshape(-1).double().cpu(), delta[n].reshape(-1).double().square().cpu()).item()
        for n in delta
    )
    return 0.5 * total / samples
