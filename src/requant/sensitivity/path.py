"""The straight path w(t) = w + t·Δw between original and quantized weights, set in the model in place.

Every measure (actual ΔF, Taylor terms, PQI) moves the model along this path; the rules live here once:
points are formed in fp32 from fp32 master copies and cast to the model's dtype, nothing but the named
layers' weight tensors is touched, and the model holds `original` again when the block exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, NumericalError
from ..model import unit_ref

SetPoint = Callable[..., None]


def check_path(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    subset: Sequence[str] | None = None,
) -> None:
    """Refuse a path that names no layers, names something that is not a quantizable unit, lacks a weight or
    has NaN/Inf."""
    if not names:
        raise ConfigError("no quantizable layers given (the list of layer names is empty)")
    for n in names:
        try:
            ref = unit_ref(model, n)
        except ConfigError:
            try:
                mod = model.get_submodule(n)
            except AttributeError:
                raise ConfigError(f"layer {n!r} is not a module of the model") from None
            raise ConfigError(f"layer {n!r} is a {type(mod).__name__}, not a quantizable unit") from None
        shape = tuple(ref.weight.shape)
        for what, weights in (("original", original), ("quantized", quantized)):
            if n not in weights:
                raise ConfigError(f"the {what} weights have no entry for layer {n!r}")
            if tuple(weights[n].shape) != shape:
                raise ConfigError(f"{what} weight of {n!r} has shape {tuple(weights[n].shape)}, the layer has {shape}")
            if not torch.isfinite(weights[n]).all():
                raise NumericalError(f"{what} weight of layer {n!r} contains NaN or Inf")
    if subset is not None:
        if not subset:
            raise ConfigError("the subset of layers to move is empty")
        unknown = sorted(set(subset) - set(names))
        if unknown:
            raise ConfigError(f"subset layer(s) {', '.join(unknown)} are not among the path's layers")


def weight_delta(
    original: Mapping[str, torch.Tensor], quantized: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Δw = w̃ − w in fp32 for each named layer."""
    return {n: quantized[n].float() - original[n].float() for n in names}


@contextlib.contextmanager
def weights_on_path(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
) -> Iterator[SetPoint]:
    """Yield set_point(t, subset=None): write w + t·Δw into the named layers (only `subset` moves, if given).

    The point is torch.lerp in fp32 (fp64 for a fp64 model), exact at both ends (t = 1 gives w̃ bit for
    bit), then cast to the model dtype. On exit, normal or not, every named layer holds `original`.
    """
    check_path(model, names, original, quantized)
    params = {n: unit_ref(model, n).weight for n in names}  # (out, in) views of the live parameters

    def set_point(t: float, subset: Sequence[str] | None = None) -> None:
        moving = set(names) if subset is None else set(subset)
        with torch.no_grad():
            for n, p in params.items():
                work = torch.promote_types(p.dtype, torch.float32)  # fp32, or fp64 for a fp64 model
                w = original[n].to(p.device, work)
                if n not in moving or t == 0.0:
                    p.copy_(w)
                elif p.dtype == work:
                    torch.lerp(w, quantized[n].to(p.device, work), float(t), out=p)  # no temporary
                else:
                    p.copy_(torch.lerp(w, quantized[n].to(p.device, work), float(t)))

    try:
        yield set_point
    finally:
        set_point(0.0)
