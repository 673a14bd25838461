import pytest
import torch

from requant import accounting
from requant.quantizers import RTNQuantizer, SqueezeLLMQuantizer
from requant.sparse import SparseResidual


def test_lut_per_row_bits():
    w = torch.randn(32, 96)
    q = SqueezeLLMQuantizer(4).fit(w)
    bc = q.bit_count()
    assert bc.bits_per_weight == pytest.approx(4 + 16 * 16 / 96)


@pytest.mark.parametrize(("sym", "extra"), [(False, 32 / 32), (True, 16 / 32)])
def test_uniform_group_bits(sym, extra):
    q = RTNQuantizer(3, 32, sym=sym).fit(torch.randn(8, 64))
    assert q.bit_count().bits_per_weight == pytest.approx(3 + extra)


def test_sparse_entries_cost_48_bits_and_totals_add():
    q = RTNQuantizer(4, 64).fit(torch.randn(10, 64))
    a = q.bit_count(sparse_entries=5)
    assert a.total_bits == 10 * 64 * 4 + 10 * 32 + 5 * 48
    b = accounting.total([a, a])
    assert b.total_bits == 2 * a.total_bits and b.bits_per_weight == pytest.approx(a.bits_per_weight)
    # docs/method.md, "Bit accounting": AWQ g256 3-bit + 0.25% outliers = 3.245
    assert pytest.approx(3.245) == 3 + 32 / 256 + 0.0025 * accounting.SPARSE_ENTRY_BITS


def test_stored_table_bytes_equal_accounting():
    q = SqueezeLLMQuantizer(3).fit(torch.randn(16, 48))
    s = SparseResidual.restore(torch.randn(16, 48), q.dequantize(), torch.rand(16, 48) < 0.1)
    bc = q.bit_count(s.nnz)
    stored_tables = sum(t.numel() * t.element_size() for t in q.tables().values())
    stored_sparse = s.nnz * (4 + 2)  # int32 index + fp16 value as saved
    assert bc.table_bits == 8 * stored_tables and bc.sparse_bits == 8 * stored_sparse
