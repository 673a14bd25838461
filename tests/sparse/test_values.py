import pytest
import torch

from requant.errors import NumericalError
from requant.quantizers.qtip.ldlq import damp_hessian
from requant.sparse import SparseResidual
from requant.sparse.values import ROW_CHUNK, fit_sparse_values, output_error


def _case(m: int = 150, n: int = 40, p: float = 0.08, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    dense = (w * 2).round() / 2
    x = torch.randn(300, n, generator=g) @ torch.randn(n, n, generator=g)  # correlated inputs
    mask = torch.rand(m, n, generator=g) < p
    mask[3] = False  # a row without sparse entries
    mask[5] = True  # a row that is all sparse
    mask[7, :30] = True  # a row with many
    return w, dense, mask, x.T @ x


def test_fitted_values_equal_a_row_by_row_solve():
    w, dense, mask, h = _case()
    assert mask.shape[0] > 2 * ROW_CHUNK  # several chunks, each padded to its own count
    sp = fit_sparse_values(w, dense, mask, h)
    hd = damp_hessian(h, 0.01)
    ref = torch.zeros(w.shape, dtype=torch.float64)
    for i in range(w.shape[0]):
        j = mask[i].nonzero().squeeze(1)
        if j.numel():
            r = (w[i] - dense[i]).double()
            ref[i, j] = torch.linalg.solve(hd[j][:, j], (hd @ r)[j])
    assert torch.equal(sp.mask(), mask)
    got = sp.add_to(torch.zeros(w.shape))
    assert torch.equal(got, ref.half().float())  # the same numbers, rounded to fp16 as stored


def test_fitting_lowers_the_output_error_and_a_full_row_is_restored():
    w, dense, mask, h = _case(seed=1)
    hd = damp_hessian(h, 0.01)
    fit = fit_sparse_values(w, dense, mask, h)
    restore = SparseResidual.restore(w, dense, mask)
    e_fit, e_restore = (output_error(w, s.add_to(dense), hd) for s in (fit, restore))
    assert e_fit < 0.95 * e_restore < output_error(w, dense, hd)
    # A row that is all sparse has every degree of freedom: its values bring it back to w.
    assert torch.allclose(fit.add_to(dense)[5], w[5], atol=2e-3)


def test_uncorrelated_inputs_give_the_restored_values():
    """With a diagonal H no column can absorb another's error: the fit is the restore."""
    w, dense, mask, _ = _case(seed=2)
    h = torch.diag(torch.rand(w.shape[1]) + 0.5)
    fit = fit_sparse_values(w, dense, mask, h)
    restore = SparseResidual.restore(w, dense, mask)
    assert torch.equal(fit.index, restore.index)
    assert torch.allclose(fit.value.float(), restore.value.float(), atol=1e-3, rtol=1e-3)


def test_no_sparse_entries_and_bad_hessians():
    w, dense, _, h = _case()
    empty = fit_sparse_values(w, dense, torch.zeros(w.shape, dtype=torch.bool), h)
    assert empty.nnz == 0 and empty.shape == tuple(w.shape)
    with pytest.raises(NumericalError, match="Hessian"):
        fit_sparse_values(w, dense, w > 0, h * float("nan"))
