"""The loss F and the actual quantization impact ΔF = F(w + λΔw) − F(w), by forward passes only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import distributed
from ..errors import ConfigError, NumericalError
from ..loss import token_nll
from ..progress import bar
from .gradients import LossFn
from .path import check_path, weights_on_path


def loss(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, loss_fn: LossFn = token_nll) -> float:
    """F: mean token NLL (nats) of the model as it is, over the windows (summed in fp64)."""
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    total, count = 0.0, 0
    starts = range(0, len(windows), batch_size)
    with torch.no_grad():
        # This rank's batches; the sums are all-reduced below.
        for start in bar([starts[i] for i in distributed.shard(len(starts))], desc="loss", unit="batch"):
            nll, n = loss_fn(model, windows[start : start + batch_size])
            value = nll.item()
            if not math.isfinite(value):
                raise NumericalError(f"loss is not finite on calibration window {start}")
            total += value
            count += n
    total, count = distributed.all_reduce_scalars(total, count)
    return total / count


def path_losses(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    ts: Sequence[float],
    *,
    subset: Sequence[str] | None = None,
    batch_size: int = 1,
    loss_fn: LossFn = token_nll,
) -> list[float]:
    """F(w + tΔw) (nats) for each t, moving only `subset` if given; the model holds `original` after."""
    check_path(model, names, original, quantized, subset)
    out = []
    with weights_on_path(model, names, original, quantized) as set_point:
        for t in ts:
            set_point(t, subset)
            try:
                out.append(loss(model, windows, batch_size=batch_size, loss_fn=loss_fn))
            except NumericalError as e:
                raise NumericalError(f"at path point t={t:.4g}: {e}") from None
    return out


def check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ConfigError(f"fraction λ = {fraction!r} of the way to the quantized weights must be in (0, 1]")


def actual_delta_f(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    *,
    fraction: float = 1.0,
    subset: Sequence[str] | None = None,
    batch_size: int = 1,
    base_loss: float | None = None,
    loss_fn: LossFn = token_nll,
) -> float:
    """Actual ΔF = F(w + λΔw on `subset`, others at w) − F(w), nats; `base_loss` reuses a known F(w)."""
    check_fraction(fraction)
    ts = [fraction] if base_loss is not None else [0.0, fraction]
    losses = path_losses(
        model, names, original, quantized, windows, ts, subset=subset, batch_size=batch_size, loss_fn=loss_fn
    )
    f0 = base_loss if base_loss is not None else losses[0]
    return losses[-1] - f0
