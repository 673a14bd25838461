"""Sparse values fitted to the layer's inputs: with the dense part D and the sparse positions fixed, the fp16
values S that minimise the layer's output error over the calibration inputs, tr((W − D − S) H (W − D − S)ᵀ)
with H = Σ x xᵀ, instead of restoring the original weights there (S = W − D).

Row by row, with J the row's sparse positions and r = w − d its dense error, the minimiser is the solution of
H_JJ s_J = (H r)_J: the restored residual r_J plus the share of the row's remaining error that columns J can
absorb (OBS's compensation, here for free-valued sparse entries instead of quantized ones). Restoring is one
feasible S, so the (dampened) objective cannot rise beyond the rounding of the values to fp16, as they are stored.
"""

from __future__ import annotations

import torch

from ..errors import NumericalError
from ..quantizers.qtip.ldlq import damp_hessian
from .residual import SparseResidual

ROW_CHUNK = 64  # rows solved together, padded to the chunk's largest count (rows are sorted by count first)


def fit_sparse_values(
    weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, *, damp: float = 0.01
) -> SparseResidual:
    """The SparseResidual at `mask` minimising tr((W − D − S) H (W − D − S)ᵀ) for the dampened H
    (H + damp · mean(diag H) · I, as GPTQ dampens it)."""
    m, n = weight.shape
    h = damp_hessian(hessian, damp)
    r = weight.double() - dense.double()
    counts = mask.sum(1)
    rows = counts.nonzero().squeeze(1)
    index = mask.flatten().nonzero().squeeze(1)  # row-major: row i's positions are contiguous, ascending
    value = torch.empty(index.numel(), dtype=torch.float64)
    if rows.numel():
        starts = torch.cumsum(counts, 0) - counts  # row i's first slot in `index`
        order = torch.argsort(counts[rows], stable=True)
        for chunk in torch.split(rows[order], ROW_CHUNK):
            k = int(counts[chunk].max())
            # cols[c, j]: row chunk[c]'s j-th sparse column; padding repeats the row's first column with an
            # identity equation (s = 0), so every system in the batch is square and well posed.
            slot = starts[chunk, None] + torch.arange(k)
            valid = torch.arange(k) < counts[chunk, None]
            cols = torch.where(valid, index[slot.clamp_max(index.numel() - 1)] % n, 0)
            a = h[cols[:, :, None], cols[:, None, :]]
            eye = torch.eye(k, dtype=torch.float64).expand_as(a)
            pair = valid[:, :, None] & valid[:, None, :]
            a = torch.where(pair, a, eye)
            g = r[chunk] @ h  # (H r)ᵀ of the chunk's rows
            b = torch.where(valid, g.gather(1, cols), 0.0)
            s = torch.linalg.solve(a, b)
            value[slot[valid]] = s[valid]
    if not torch.isfinite(value).all():
        raise NumericalError("fitted sparse values are not finite (a degenerate input Hessian)")
    return SparseResidual(index, value.clamp(-65504, 65504).half(), (m, n))


def output_error(weight: torch.Tensor, recon: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the layer's summed squared output error over the calibration inputs."""
    e = weight.double() - recon.double()
    return float(((e @ hessian.double()) * e).sum())
