import pytest
import torch

from requant.errors import CheckpointError
from requant.format.layout import LayerLayout, check_specs, check_values, decode_layer, encode_layer
from requant.format.names import COL, LUT, QWEIGHT, ROWPTR, SCALE, VALUE, ZERO
from requant.format.pack import to_csr
from requant.sparse import SparseResidual


def test_specs_are_functions_of_the_layout():
    lo = LayerLayout("lut", 10, 20, 3, nnz=7)
    specs = lo.tensors()
    assert list(specs) == [QWEIGHT, LUT, ROWPTR, COL, VALUE]
    assert specs[QWEIGHT].shape == (10, 3, 3) and specs[QWEIGHT].dtype == torch.uint8  # 20 codes → 3 chunks × 3 B
    assert specs[LUT].shape == (10, 8) and specs[ROWPTR].shape == (11,) and specs[COL].shape == (7,)
    uni = LayerLayout("uniform", 4, 64, 4, group_size=16, sym=True).tensors()
    assert list(uni) == [QWEIGHT, SCALE] and uni[SCALE].shape == (4, 4)
    assert ZERO in LayerLayout("uniform", 4, 64, 4, group_size=16).tensors()


@pytest.mark.parametrize(
    "args",
    [
        dict(kind="qtip", out_features=2, in_features=8, bits=3),
        dict(kind="lut", out_features=2, in_features=8, bits=5),
        dict(kind="uniform", out_features=2, in_features=10, bits=4, group_size=4),
        dict(kind="lut", out_features=2, in_features=8, bits=3, nnz=17),
    ],
)
def test_impossible_layouts_are_refused(args):
    with pytest.raises(CheckpointError):
        LayerLayout(**args)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kind="lut", bits=3, nnz=11),
        dict(kind="lut", bits=4),
        dict(kind="uniform", bits=2, group=8, nnz=5),
        dict(kind="uniform", bits=8, sym=True),
    ],
)
def test_encode_decode_round_trip_and_stored_bytes(kw, make_layer):
    q = make_layer(12, 40, **kw)
    layout, tensors = encode_layer(q)
    assert layout.to_meta() == LayerLayout.from_meta(layout.to_meta(), "x").to_meta()
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == layout.stored_bytes()
    back = decode_layer(layout, tensors, q.info)
    assert torch.equal(back.weight(), q.weight())
    assert back.bit_count() == q.bit_count() == layout.bit_count()
    # Stored bytes = the paper's accounting + CSR row pointers (widths here are multiples of 8: no padding).
    rowptr = (layout.out_features + 1) * 4 if layout.nnz else 0
    assert layout.stored_bytes() * 8 == q.bit_count().total_bits + rowptr * 8


def test_check_specs_names_the_tensor(make_layer):
    layout, tensors = encode_layer(make_layer(4, 16, 3, nnz=3))
    found = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    check_specs("f", "L", layout, found)
    with pytest.raises(CheckpointError, match=r"tensor L\.lut is F32 \[4, 8\], expected F16 \[4, 8\]"):
        check_specs("f", "L", layout, {**found, LUT: (torch.float32, (4, 8))})
    with pytest.raises(CheckpointError, match=r"tensor L\.weight is U8 \[4, 8\], expected U8 \[4, 2, 3\]"):
        check_specs("f", "L", layout, {**found, QWEIGHT: (torch.uint8, (4, 8))})
    with pytest.raises(CheckpointError, match=r"tensor L\.sparse_col is missing"):
        check_specs("f", "L", layout, {k: v for k, v in found.items() if k != COL})
    with pytest.raises(CheckpointError, match=r"unexpected tensor L\.zero"):
        check_specs("f", "L", layout, {**found, ZERO: (torch.float16, (4, 1))})


def test_check_values_rejects_malformed_csr_and_nan_tables(make_layer):
    q = make_layer(4, 16, 3, nnz=6, seed=3)
    layout, tensors = encode_layer(q)
    check_values("f", "L", layout, tensors)
    bad_ptr = tensors[ROWPTR].clone()
    bad_ptr[2] = 100
    with pytest.raises(CheckpointError, match="sparse_rowptr"):
        check_values("f", "L", layout, {**tensors, ROWPTR: bad_ptr})
    bad_col = tensors[COL].clone()
    bad_col[0] = 16
    with pytest.raises(CheckpointError, match=r"sparse_col.*outside"):
        check_values("f", "L", layout, {**tensors, COL: bad_col})
    # two entries in one row with the same column
    s = SparseResidual(torch.tensor([1, 2]), torch.ones(2).half(), (4, 16))
    rowptr, col, val = to_csr(s)
    col[1] = col[0]
    lo2 = LayerLayout("lut", 4, 16, 3, nnz=2)
    with pytest.raises(CheckpointError, match="strictly increasing"):
        check_values("f", "L", lo2, {ROWPTR: rowptr, COL: col, VALUE: val, LUT: tensors[LUT]})
    nan_lut = tensors[LUT].clone()
    nan_lut[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"L\.lut holds NaN"):
        check_values("f", "L", layout, {**tensors, LUT: nan_lut})
