"""AWQ (arXiv 2306.00978): activation-aware per-input-channel scales, then group-wise asymmetric INT.

On the layer's calibration statistics (H = Σ x xᵀ and the mean |x| of each input channel):
  1. scale search: s = mean|x|^α, normalised to √(max s · min s) = 1 and rounded to fp16, for α on the grid
     {0, 1/n, ..., (n−1)/n} (AWQ's n = 20; α = 0 is plain RTN); keep the α with the least layer output error
     ‖(W − Q(W diag s) diag s⁻¹) X‖² = tr(ΔW H ΔWᵀ);
  2. clipping search (AWQ's auto-clip): per (row, group), shrink the range of W diag s to the fraction
     {1, 1 − 1/n, ..., 1 − max_shrink} of its largest |value| with the least output error of that group,
     δ H_gg δᵀ (H's diagonal block, as AWQ scores each group on its own);
  3. Q = min-max asymmetric uniform quantization per group with fp16 scale and zero (rtn.minmax_quantize).

AWQ folds 1/s into the operation before the layer at inference. Which operation that is depends on the
architecture, so here the per-channel scale is stored with the codes (`ScaledUniformTensor`, one fp16 per
input, counted in the bits) and the dequantized weight Q(W diag s) diag s⁻¹ is reconstructed exactly.

`exclude` (outliers to be stored sparse; removed before the scale search, docs/method.md "Choices"): excluded
entries set no group range and no clipping range, and their error does not count in either objective (they
are restored exactly). The fit of the kept entries is therefore independent of the excluded values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .base import BaseQuantizer, LayerInputs, UniformTensor, layer_hessian, output_error_rows
from .rtn import minmax_quantize


@dataclass
class ScaledUniformTensor(UniformTensor):
    """Uniform group codes of W diag(s) plus the fp16 per-input-channel scale s: value = uniform value / s."""

    in_scale: torch.Tensor = None  # type: ignore[assignment]  # fp16 (in,)
    kind: ClassVar[str] = "awq"
    TABLES: ClassVar[tuple[str, ...]] = ("scale", "zero", "in_scale")

    def dequantize(self) -> torch.Tensor:
        return super().dequantize() / self.in_scale.float()

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ScaledUniformTensor:
        return cls(
            codes=tensors["codes"],
            scale=tensors["scale"],
            zero=tensors.get("zero"),
            bits=int(meta["bits"]),
            group_size=int(meta["group_size"]),
            in_scale=tensors["in_scale"],
        )


def awq_scale(act: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale act^α (floored at 1e-4), normalised to √(max·min) = 1, as fp16."""
    s = act.float().pow(alpha).clamp(min=1e-4)
    return (s / (s.max() * s.min()).sqrt()).half()


def scaled_quantize(
    weight: torch.Tensor,
    in_scale: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    exclude: torch.Tensor | None = None,
    clip: torch.Tensor | float | None = None,
) -> ScaledUniformTensor:
    """Min-max asymmetric group quantization of W diag(s); `clip` (scalar or (out, groups)) shrinks each
    group's range to that fraction of its largest |value| over the kept entries."""
    out, n = weight.shape
    ws = weight.float() * in_scale.float()
    if clip is not None:
        v = ws.view(out, n // group_size, group_size)
        mag = v.abs() if exclude is None else v.abs().masked_fill(exclude.view_as(v), 0.0)
        bound = mag.amax(-1, keepdim=True) * (clip if isinstance(clip, float) else clip[..., None])
        ws = torch.maximum(torch.minimum(v, bound), -bound).view(out, n)
    q = minmax_quantize(ws, bits, group_size, exclude=exclude)
    return ScaledUniformTensor(q.codes, q.scale, q.zero, bits, group_size, in_scale=in_scale)


@dataclass(frozen=True)
class AWQSearch:
    """What the searches chose: α, the output error of every α on the grid, the scale s, clip per group."""

    alpha: float
    alphas: list[float]
    errors: list[float]  # tr(ΔW H ΔWᵀ) per α, no clipping
    in_scale: torch.Tensor  # fp16 (in,)
    clip: torch.Tensor | None  # (out, groups) fraction of each group's range kept, or None


def _kept_delta(weight: torch.Tensor, q: ScaledUniformTensor, keep: torch.Tensor | None) -> torch.Tensor:
    d = weight.float() - q.dequantize()
    return d if keep is None else d * keep


def awq_search(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    act: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    exclude: torch.Tensor | None = None,
    n_grid: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
) -> AWQSearch:
    """AWQ's scale grid search, then its per-group clipping search, on H = Σ x xᵀ and act = mean |x|."""
    out, n = weight.shape
    keep = None if exclude is None else ~exclude
    h = hessian.float()
    alphas = [i / n_grid for i in range(n_grid)]
    errors = []
    for a in alphas:
        q = scaled_quantize(weight, awq_scale(act, a), bits, group_size, exclude=exclude)
        errors.append(float(output_error_rows(_kept_delta(weight, q, keep), h).sum()))
    best = min(range(n_grid), key=errors.__getitem__)
    s = awq_scale(act, alphas[best])
    ratios = None
    if clip:
        groups = n // group_size
        hb = torch.stack([h[i : i + group_size, i : i + group_size] for i in range(0, n, group_size)])
        best_err = torch.full((out, groups), torch.inf, dtype=torch.float64)
        ratios = torch.ones(out, groups)
        for i in range(int(max_shrink * n_grid)):
            r = 1 - i / n_grid
            d = _kept_delta(weight, scaled_quantize(weight, s, bits, group_size, exclude=exclude, clip=r), keep)
            d = d.view(out, groups, group_size)
            err = torch.einsum("ogi,gij,ogj->og", d, hb, d).double()
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            ratios = torch.where(better, r, ratios)
    return AWQSearch(alphas[best], alphas, errors, s, ratios)


class AWQQuantizer(BaseQuantizer):
    """AWQ on the layer's calibration statistics; uniform asymmetric INT with fp16 scale + zero per group."""

    name = "awq"
    uses_inputs = True

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        *,
        n_grid: int = 20,
        clip: bool = True,
        max_shrink: float = 0.5,
    ) -> None:
        super().__init__(bits, group_size)
        if not isinstance(n_grid, int) or n_grid < 1:
            raise ConfigError(f"AWQ grid size {n_grid!r} must be a positive integer")
        if not 0 <= max_shrink < 1:
            raise ConfigError(f"AWQ max_shrink {max_shrink} must lie in [0, 1)")
        self.n_grid, self.clip, self.max_shrink = n_grid, clip, max_shrink

    def search(
        self, weight: torch.Tensor, *, exclude: torch.Tensor | None = None, inputs: LayerInputs | None = None
    ) -> AWQSearch:
        """The scale and clipping choices `fit` uses."""
        self.check_shape("(unnamed)", tuple(weight.shape))  # type: ignore[arg-type]
        h = layer_hessian(self.name, weight, inputs)
        assert inputs is not None
        act = inputs.extra.get("abs_mean")
        if act is None:  # no mean |x| gathered: the RMS of each input channel
            act = (h.diagonal().float() / max(inputs.tokens, 1)).sqrt()
        g = self.group_size or weight.shape[1]
        return awq_search(
            weight,
            h,
            act,
            self.bits,
            g,
            exclude=exclude,
            n_grid=self.n_grid,
            clip=self.clip,
            max_shrink=self.max_shrink,
        )

    def fit(
        self,
        weight: torch.Tensor,
        *,
        importance: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> ScaledUniformTensor:
        found = self.search(weight, exclude=exclude, inputs=inputs)
        g = self.group_size or weight.shape[1]
        return scaled_quantize(weight, found.in_scale, self.bits, g, exclude=exclude, clip=found.clip)

    def objective(
        self, weight: torch.Tensor, recon: torch.Tensor, keep: torch.Tensor, inputs: LayerInputs | None
    ) -> torch.Tensor | None:
        """Layer output error tr(ΔW H ΔWᵀ) per row, ΔW on the kept entries."""
        return output_error_rows((weight.float() - recon.float()) * keep, layer_hessian(self.name, weight, inputs))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_grid": self.n_grid, "clip": self.clip, "max_shrink": self.max_shrink}
