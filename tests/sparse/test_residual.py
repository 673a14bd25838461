import pytest
import torch

from requant.sparse import SparseResidual


def test_restore_gives_the_masked_entries_back_within_fp16_and_leaves_the_rest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    dense = (w * 4).round() / 4
    mask = torch.rand(8, 16, generator=g) < 0.2
    s = SparseResidual.restore(w, dense, mask)
    rec = s.add_to(dense)
    assert torch.equal(rec[~mask], dense[~mask])
    assert torch.allclose(rec[mask], w[mask], atol=1e-3)  # fp16 residual
    assert torch.equal(s.mask(), mask)
    other = SparseResidual.restore(w, dense, ~mask & (torch.rand(8, 16, generator=g) < 0.1))
    merged = s.merge(other)
    assert merged.nnz == s.nnz + other.nnz and bool((merged.index[1:] > merged.index[:-1]).all())
    with pytest.raises(ValueError):
        s.merge(s)


def test_empty_adds_nothing_and_masks_nothing():
    e = SparseResidual.empty((3, 5))
    d = torch.randn(3, 5)
    assert e.nnz == 0 and torch.equal(e.add_to(d), d) and not e.mask().any()
