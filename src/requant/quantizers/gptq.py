"""GPTQ (arXiv 2210.17323): column-by-column quantization with OBS error feedback on the layer Hessian.

H = Σ x xᵀ of the layer's calibration inputs (GPTQ's 2XXᵀ up to a factor: same argmin), damped by
`damp` · mean(diag H). Columns are quantized in order; each one's error is spread over the columns not yet
quantized by the optimal (OBS) update. GPTQ writes this with the Cholesky factor of H⁻¹; it is the same
update as LDLQ's feedback from H = (I + U) D (I + U)ᵀ (QuIP, arXiv 2307.13304), so the loop and the
factorisation are QTIP's (`qtip.ldlq`, block size 1), with GPTQ's lazy batches of 128 columns.

Grids:
  * `uniform`: min-max integer grid per group of `group_size` inputs (per row by default), asymmetric with
    fp16 scale and zero, or symmetric. A group's scale and zero are set when its first column is reached,
    from the group's columns as updated by the feedback so far (GPTQ's default). With `act_order` (columns
    in order of decreasing diag H) groups are *static*: set from the original weights before the loop, on
    the original column groups (GPTQ's static_groups), so each group keeps contiguous inputs.
  * `lut`: a per-row table of 2^bits fp16 values (SqueezeLLM's grid), fitted first by weighted 1-D k-means
    with diag(H) as sample weights; GPTQ then rounds each column to the nearest table entry, with feedback.

`exclude` (entries stored sparse, restored exactly): such an entry ends at its original value w, so the
loop "quantizes" it to w: its deviation from the feedback-updated target is fed forward like any rounding
error, and it sets no group range and no k-means weight. The fit of the kept entries is then independent of
the excluded values.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import BaseQuantizer, LayerInputs, LUTTensor, UniformTensor, layer_hessian, output_error_rows
from .kmeans import kmeans_sample_weights, weighted_kmeans_1d
from .qtip.ldlq import block_ldl, block_ldlq, damp_hessian
from .rtn import minmax_quantize

GRIDS = ("uniform", "lut")
_BLOCK = 128  # GPTQ's lazy-batch width (block_ldlq's super-block for column blocks of 1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    *,
    group_size: int | None = None,
    sym: bool = False,
    grid: str = "uniform",
    act_order: bool = False,
    static_groups: bool | None = None,
    damp: float = 0.01,
    exclude: torch.Tensor | None = None,
    lut: torch.Tensor | None = None,
) -> UniformTensor | LUTTensor:
    """GPTQ of `weight` (out, in) on H = Σ x xᵀ (in, in); see the module docstring for the options. `lut`
    (out, 2^bits) fixes the `lut` grid's tables (e.g. SqueezeLLM's Fisher-weighted fit) instead of fitting them."""
    out, n = weight.shape
    g = group_size or n
    if grid not in GRIDS:
        raise ConfigError(f"gptq grid {grid!r} is not allowed; use one of {', '.join(GRIDS)}")
    if n % g:
        raise ConfigError(f"group size {g} does not divide the input width {n}")
    if static_groups is None:
        static_groups = act_order
    if act_order and g < n and not static_groups:
        raise ConfigError(
            "gptq act-order with dynamic groups is not supported (a group's columns would be quantized far "
            "apart); use static groups (static_groups=True) or no act-order"
        )
    if grid == "lut" and group_size is not None:
        raise ConfigError("gptq with the lut grid uses one table per output row; --group-size is not allowed")
    w = weight.double()
    keep = torch.ones_like(w, dtype=torch.bool) if exclude is None else ~exclude
    h = damp_hessian(hessian, damp)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n)
    wp, keep_p = w[:, perm], keep[:, perm]
    u, _ = block_ldl(h[perm][:, perm], 1)
    codes = torch.empty(out, n, dtype=torch.uint8)  # in permuted column order
    eta = torch.zeros_like(wp)  # x − ŵ per column done: the rounding error GPTQ feeds forward

    if grid == "lut":
        if lut is None:
            sw = kmeans_sample_weights(torch.diagonal(h).float().expand(out, n), exclude, (out, n))
            lut = weighted_kmeans_1d(w.float(), sw, 2**bits, round_centroids_to=torch.float16).centroids.half()
        elif tuple(lut.shape) != (out, 2**bits):
            raise ConfigError(f"gptq: a given LUT must be {(out, 2**bits)}, not {tuple(lut.shape)}")
        lut64 = lut.double()

        def rounded(k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = (x[:, None] - lut64).abs().argmin(1)
            return lut64.gather(1, c[:, None])[:, 0], c

    else:
        maxq = 2**bits - 1
        scale = torch.empty(out, n // g, dtype=torch.float16)
        zero = None if sym else torch.empty(out, n // g, dtype=torch.float16)
        if static_groups:
            ref = minmax_quantize(w.float(), bits, g, sym=sym, exclude=exclude)
            scale.copy_(ref.scale)
            if zero is not None:
                zero.copy_(ref.zero)  # type: ignore[arg-type]

        # GPTQ's partial update of a later column j after columns < k is W_j − Σ_{i<k} η_i R_ij / R_ii, with
        # R the upper Cholesky factor of H⁻¹; R_ij / R_ii = [(I + U)⁻¹]_ij.
        eye = torch.eye(n, dtype=u.dtype)
        a = torch.linalg.solve_triangular(eye + u, eye, upper=True) if not static_groups and g < n else None

        def set_group(k: int) -> None:
            # The group's columns as updated by the feedback from every column before it.
            cols = slice(k, k + g)
            upd = wp[:, cols] if a is None else wp[:, cols] - eta[:, :k] @ a[:k, cols]
            q = minmax_quantize(upd.float(), bits, g, sym=sym, exclude=~keep_p[:, cols])
            scale[:, k // g] = q.scale[:, 0]
            if zero is not None:
                zero[:, k // g] = q.zero[:, 0]  # type: ignore[index]

        def rounded(k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not static_groups and k % g == 0:
                set_group(k)
            grp = int(perm[k]) // g  # static groups follow the original column order
            s = scale[:, grp].double()
            z = zero[:, grp].double() if zero is not None else torch.full_like(s, float(2 ** (bits - 1)))
            c = torch.clamp(torch.round(x / s) + z, 0, maxq)
            return (c - z) * s, c

    def column(k: int, x: torch.Tensor) -> torch.Tensor:
        recon, c = rounded(k, x[:, 0])
        codes[:, k] = c.to(torch.uint8)
        # An excluded entry is restored to its own value; its deviation from x is fed forward.
        recon = torch.where(keep_p[:, k], recon, wp[:, k])
        eta[:, k] = x[:, 0] - recon
        return recon[:, None]

    block_ldlq(wp, u, 1, column)
    codes = codes[:, torch.argsort(perm)].contiguous()
    if grid == "lut":
        assert lut is not None
        return LUTTensor(codes=codes, lut=lut.half(), bits=bits)
    return UniformTensor(codes, scale, zero, bits, g)


class GPTQQuantizer(BaseQuantizer):
    """GPTQ on the layer's calibration Hessian; fitted block by block on the quantized model's inputs."""

    name = "gptq"
    uses_inputs = True
    sequential = True
    row_independent = True  # each row sees the same H and its own grid, so a row subset refits exactly

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        *,
        sym: bool = False,
        grid: str = "uniform",
        act_order: bool = False,
        static_groups: bool | None = None,
        damp: float = 0.01,
    ) -> None:
        super().__init__(bits, group_size)
        if grid not in GRIDS:
            raise ConfigError(f"gptq grid {grid!r} is not allowed; use one of {', '.join(GRIDS)}")
        if grid == "lut" and group_size is not None:
            raise ConfigError("gptq with the lut grid uses one table per output row; --group-size is not allowed")
        if act_order and group_size is not None and static_groups is False:
            raise ConfigError(
                "gptq act-order with dynamic groups is not supported (a group's columns would be quantized far "
                "apart); use static groups (static_groups=True) or no act-order"
            )
        if not damp >= 0:
            raise ConfigError(f"Hessian damping {damp} must be non-negative")
        self.sym, self.grid, self.act_order, self.damp = sym, grid, act_order, damp
        self.static_groups = act_order if static_groups is None else static_groups

    def fit(
        self,
        weight: torch.Tensor,
        *,
        importance: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> UniformTensor | LUTTensor:
        self.check_shape("(unnamed)", tuple(weight.shape))  # type: ignore[arg-type]
        h = layer_hessian(self.name, weight, inputs)
        return gptq_quantize(
            weight,
            h,
            self.bits,
            group_size=self.group_size,
            sym=self.sym,
            grid=self.grid,
            act_order=self.act_order,
            static_groups=self.static_groups,
            damp=self.damp,
            exclude=exclude,
        )

    def objective(
        self, weight: torch.Tensor, recon: torch.Tensor, keep: torch.Tensor, inputs: LayerInputs | None
    ) -> torch.Tensor | None:
        """Layer output error tr(ΔW H ΔWᵀ) per row, ΔW on the kept entries."""
        return output_error_rows((weight.float() - recon.float()) * keep, layer_hessian(self.name, weight, inputs))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "sym": self.sym,
            "grid": self.grid,
            "act_order": self.act_order,
            "static_groups": self.static_groups,
            "damp": self.damp,
        }
