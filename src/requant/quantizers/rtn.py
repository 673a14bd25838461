"""Round-to-nearest on a uniform min-max grid, per output row or per group of inputs."""

from __future__ import annotations

from typing import Any

import torch

from .base import BaseQuantizer, LayerInputs, UniformTensor


def minmax_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    sym: bool = False,
    exclude: torch.Tensor | None = None,
) -> UniformTensor:
    """Uniform min-max quantization per group of `group_size` inputs; excluded entries don't set the range.

    The scale is rounded to fp16 before rounding the codes, so codes are optimal for the stored scale.
    """
    out, inp = weight.shape
    maxq = 2**bits - 1
    w = weight.float().view(out, inp // group_size, group_size)
    keep = None if exclude is None else ~exclude.view_as(w)
    if keep is None:
        xmin, xmax = w.amin(-1), w.amax(-1)
    else:
        xmin = torch.where(keep, w, torch.inf).amin(-1)
        xmax = torch.where(keep, w, -torch.inf).amax(-1)
        empty = ~keep.any(-1)  # a fully excluded group: any grid will do
        xmin = torch.where(empty, 0.0, xmin)
        xmax = torch.where(empty, 0.0, xmax)
    if sym:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        scale = 2 * amax / maxq
        scale = torch.where(scale > 0, scale, 1.0).half()
        zero_f = float(2 ** (bits - 1))
        codes = torch.clamp(torch.round(w / scale.float()[..., None]) + zero_f, 0, maxq)
        return UniformTensor(codes.to(torch.uint8).view(out, inp), scale, None, bits, group_size)
    # A constant group gets a range that includes 0, so the constant itself is on the grid.
    flat = xmax == xmin
    xmin = torch.where(flat, xmin.clamp(max=0), xmin)
    xmax = torch.where(flat, xmax.clamp(min=0), xmax)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, 1.0).half().float()
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, maxq)
    return UniformTensor(codes.to(torch.uint8).view(out, inp), scale.half(), zero.half(), bits, group_size)


class RTNQuantizer(BaseQuantizer):
    """Plain round-to-nearest; ignores importance."""

    name = "rtn"
    row_independent = True

    def __init__(self, bits: int, group_size: int | None = None, sym: bool = False) -> None:
        super().__init__(bits, group_size)
        self.sym = sym

    def fit(
        self,
        weight: torch.Tensor,
        *,
        importance: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> UniformTensor:
        return minmax_quantize(weight, self.bits, self.group_size or weight.shape[1], sym=self.sym, exclude=exclude)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sym": self.sym}
