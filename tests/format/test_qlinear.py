import shutil

import pytest
import torch
import torch.nn.functional as F

from requant import native
from requant.format import kernels
from requant.format.qlinear import (
    DECODE_MAX_ROWS,
    FAST_PATH_RTOL,
    QuantLinear,
    replace_with_quant_linear,
    set_kernel_mode,
)

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason=f"C kernels unavailable: {kernels.status()}")

# widths not divisible by 8, 16, 32 or 64 included; 1100 spans two 1024-column decode blocks; from 256 columns
# the AVX2 single-row kernel reads interleaved blocks of 256 codes (rq_interleave), the rest from the packed row
SHAPES = [(1, 1), (3, 7), (5, 13), (17, 100), (33, 129), (8, 1100), (64, 64), (6, 512), (3, 256), (2, 775), (4, 72)]
KINDS = [
    dict(kind="lut"),
    dict(kind="uniform"),  # asymmetric, one group per row
    dict(kind="uniform", sym=True, group=8),  # groups of 8 where the width allows
]


def _kw(kind: dict, inp: int) -> dict:
    kw = dict(kind)
    if kw.get("group") and inp % kw["group"]:
        kw["group"] = None
    return kw


def assert_within_tolerance(y: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, x: torch.Tensor, bias=None):
    bound = x.abs() @ w.abs().T + (0 if bias is None else bias.abs())
    err = (y - ref).abs()
    assert bool((err <= FAST_PATH_RTOL * bound + 1e-30).all()), float((err / bound).max())


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", KINDS, ids=["lut", "affine", "sym-g8"])
def test_fast_path_matches_reference(bits, kind, make_layer):
    for i, (out, inp) in enumerate(SHAPES):
        nnz = (out * inp) // 20
        q = make_layer(out, inp, bits, nnz=nnz, seed=i, **_kw(kind, inp))
        bias = torch.randn(out) if i % 2 else None
        ql = QuantLinear.from_layer(q, bias)
        w = q.weight()
        assert torch.equal(ql.dequantize(), w)
        assert torch.equal(kernels.dequantize(kernels.library(), ql._prepare().desc), w)  # bit-exact decode
        for m in (1, 3, 4, 5, 64, 1):  # the second single row after the interleaved copy exists
            x = torch.randn(2, m, inp) if m == 64 else torch.randn(m, inp)
            ql.gemm_max_m = 64 if m == 5 else DECODE_MAX_ROWS  # the kernel on 5 rows too
            ref = F.linear(x, w, bias)
            with torch.no_grad():
                y = ql(x)
            assert y.shape == ref.shape
            if x.numel() // inp > ql.gemm_max_m:
                assert torch.equal(y, ref)  # prefill: dequantize + BLAS is bit-exact
            else:
                assert_within_tolerance(y, ref, w, x, bias)
        # after single-row calls (interleaved copy, if this build makes one) the decode is still bit-exact
        assert torch.equal(kernels.dequantize(kernels.library(), ql._prepare().desc), w)


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_single_row_calls_interleave_whole_blocks_once(bits, make_layer):
    ql = QuantLinear.from_layer(make_layer(5, 600, bits, nnz=40))
    desc = ql._prepare().desc
    assert not desc.qi
    x = torch.randn(1, 600)
    with torch.no_grad():
        ql(torch.randn(3, 600))  # several rows: no copy
        assert not desc.qi
        y = ql(x)
    if "avx2" in kernels.status():  # the build whose kernel reads the copy (AVX-512 decodes the packed form)
        assert desc.qi and desc.nblk == 2 and desc.keep_qi.numel() == 5 * (2 * 32 * bits + -(-11 * bits // 32) * 32)
    w = ql.dequantize()
    assert_within_tolerance(y, F.linear(x, w), w, x)
    # every later decode reads whole chunks from the copy: still bit-exact (600 = 75 chunks, no partial one)
    assert torch.equal(kernels.dequantize(kernels.library(), desc), w)
    x3 = torch.randn(9, 600)
    with torch.no_grad():
        assert torch.equal(ql(x3), F.linear(x3, w))


@needs_kernels
def test_thread_pool_splits_big_layers_and_stays_deterministic(make_layer):
    """A layer big enough for the pool (≥ 4M weights): same bits with 1 and 2 threads, equal to the reference."""
    q = make_layer(2048, 2056, 3, nnz=5000)
    ql = QuantLinear.from_layer(q)
    lib = kernels.library()
    x = torch.randn(4, 2056)
    threads = torch.get_num_threads()
    chunks_before = lib.rq_pool_chunks(0) + lib.rq_pool_chunks(1)
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                runs.append((ql(x), ql(x[:1]), kernels.dequantize(lib, ql._prepare().desc)))
    finally:
        torch.set_num_threads(threads)
    assert lib.rq_pool_chunks(0) + lib.rq_pool_chunks(1) > chunks_before  # the 2-thread runs went parallel
    w = q.weight()
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][2], w)
    assert_within_tolerance(runs[0][0], F.linear(x, w), w, x)


def test_without_kernels_falls_back_to_the_reference(make_layer, monkeypatch):
    q = make_layer(16, 24, 3, nnz=10)
    ql = QuantLinear.from_layer(q)
    monkeypatch.setattr(kernels, "library", lambda: None)
    x = torch.randn(1, 24)
    with torch.no_grad():
        assert torch.equal(ql(x), F.linear(x, q.weight()))
    ql.mode = "fast"
    with pytest.raises(RuntimeError, match="unavailable"):
        ql(x)


def test_kernels_can_be_switched_off(make_layer, monkeypatch):
    monkeypatch.setenv("REQUANT_KERNELS", "0")
    assert kernels.library() is None and "disabled" in kernels.status()
    q = make_layer(4, 8, 2)
    x = torch.randn(1, 8)
    with torch.no_grad():
        assert torch.equal(QuantLinear.from_layer(q)(x), F.linear(x, q.weight()))


def test_gradients_flow_through_the_reference_path(make_layer):
    q = make_layer(6, 10, 4, nnz=3)
    ql = QuantLinear.from_layer(q, torch.zeros(6))
    lin = torch.nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.copy_(q.weight())
        lin.bias.zero_()
    x1 = torch.randn(3, 10, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    ql(x1).square().sum().backward()
    lin(x2).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)


@needs_kernels
def test_half_precision_inputs_keep_their_dtype(make_layer):
    q = make_layer(8, 32, 3)
    ql = QuantLinear.from_layer(q)
    x = torch.randn(1, 32).bfloat16()
    with torch.no_grad():
        y = ql(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.float(), q.weight()), rtol=2e-2, atol=2e-2)


def test_replace_with_quant_linear_keeps_the_model_output(model, tokenizer):
    from requant.config import QuantConfig
    from requant.pipeline import quantize

    result = quantize(model, tokenizer, QuantConfig(base="rtn", bits=4, group_size=16))
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
        replace_with_quant_linear(model, result.layers)
        set_kernel_mode(model, "reference")
        assert torch.equal(model(ids).logits, before)
        set_kernel_mode(model, "auto")
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-4)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize(
    "flags",
    [["-O2", "-mavx2", "-mfma", "-ffp-contract=off", "-pthread"], ["-O2", "-ffp-contract=off", "-pthread"]],
    ids=["avx2", "portable"],
)
def test_every_isa_variant_matches_the_reference(flags, make_layer, tmp_path):
    """The AVX2 and portable C paths (not the ones this machine picks) against the reference."""
    try:
        lib = kernels.build_variant(flags, tmp_path)
    except RuntimeError as e:
        pytest.skip(f"cannot build with {flags}: {e}")
    for bits in (2, 3, 4, 8):
        for i, (out, inp) in enumerate(SHAPES[1:6]):
            for kind in KINDS:
                q = make_layer(out, inp, bits, nnz=(out * inp) // 20, seed=i, **_kw(kind, inp))
                ql = QuantLinear.from_layer(q)
                is_lut = kind["kind"] == "lut"
                f32 = {  # kept alive while the descriptor points at them
                    "lut": q.dense.lut.float() if is_lut else None,
                    "scale": None if is_lut else q.dense.scale.float(),
                    "zero": None if is_lut or q.dense.zero is None else q.dense.zero.float(),
                    "value": ql.sparse_value.float() if q.sparse.nnz else None,
                }
                desc = kernels.describe(
                    ql.packed(),
                    inp,
                    bits,
                    **f32,
                    group_size=None if is_lut else q.dense.group_size,
                    rowptr=getattr(ql, "sparse_rowptr", None),
                    col=getattr(ql, "sparse_col", None),
                )
                w = q.weight()
                assert torch.equal(kernels.dequantize(lib, desc), w)
                x = torch.randn(3, inp)
                assert_within_tolerance(kernels.gemm(lib, desc, x), F.linear(x, w), w, x)
                assert_within_tolerance(kernels.gemm(lib, desc, x[:1]), F.linear(x[:1], w), w, x[:1])
                desc.row = None  # the per-row sparse loop the kernels use without expanded row indices
                assert_within_tolerance(kernels.gemm(lib, desc, x[:1]), F.linear(x[:1], w), w, x[:1])
    shutil.rmtree(tmp_path, ignore_errors=True)
