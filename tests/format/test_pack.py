import pytest
import torch

from requant.format.pack import from_csr, pack_codes, packed_row_bytes, to_csr, unpack_codes
from requant.sparse import SparseResidual


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("width", [1, 7, 8, 13, 33, 64, 100])
def test_pack_unpack_round_trip(bits, width):
    g = torch.Generator().manual_seed(bits * 1000 + width)
    codes = torch.randint(0, 2**bits, (5, width), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(width, bits))
    assert torch.equal(unpack_codes(packed, bits, width), codes)


def test_three_bit_codes_waste_no_bits():
    assert packed_row_bytes(576, 3) * 8 == 576 * 3
    assert packed_row_bytes(1536, 3) * 8 == 1536 * 3
    assert packed_row_bytes(9, 3) == 6  # a partial chunk of 8 codes is padded to whole bytes


def test_bit_order_is_little_endian_stream():
    # code i occupies bits [3i, 3i+3) of the row's little-endian bit stream
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    value = sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    assert pack_codes(codes, 3)[0].tolist() == [(value >> (8 * k)) & 0xFF for k in range(3)]
    assert pack_codes(torch.tensor([[0x1, 0xF]], dtype=torch.uint8), 4)[0].tolist() == [0xF1, 0, 0, 0]


def test_padding_codes_are_zero():
    codes = torch.full((2, 3), 7, dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert torch.equal(unpack_codes(packed, 3, 8)[:, 3:], torch.zeros(2, 5, dtype=torch.uint8))


@pytest.mark.parametrize("nnz", [0, 1, 17, 60])
def test_csr_round_trip(nnz):
    shape = (6, 10)
    g = torch.Generator().manual_seed(nnz)
    index = torch.randperm(60, generator=g)[:nnz].sort().values
    value = torch.randn(nnz, generator=g).half()
    rowptr, col, val = to_csr(SparseResidual(index, value, shape))
    assert rowptr.dtype == col.dtype == torch.int32 and val.dtype == torch.float16
    assert rowptr.shape == (7,) and int(rowptr[0]) == 0 and int(rowptr[-1]) == nnz
    assert bool((rowptr[1:] >= rowptr[:-1]).all())
    back = from_csr(rowptr, col, val, shape)
    assert torch.equal(back.index, index) and torch.equal(back.value, value)
    dense = torch.zeros(shape)
    assert torch.equal(back.add_to(dense), SparseResidual(index, value, shape).add_to(dense))


def test_csr_sorts_unsorted_indices():
    s = SparseResidual(torch.tensor([13, 2, 7]), torch.tensor([1.0, 2.0, 3.0]).half(), (3, 5))
    rowptr, col, val = to_csr(s)
    assert rowptr.tolist() == [0, 1, 2, 3] and col.tolist() == [2, 2, 3] and val.tolist() == [2.0, 3.0, 1.0]
