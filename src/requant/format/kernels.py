"""Optional C kernels for packed layers (csrc/qgemm.c), built and loaded through requant.native.

Nothing here is needed to import requant: without a compiler (or with REQUANT_KERNELS=0) `library()`
returns None and QuantLinear runs its pure-PyTorch reference path. requant.native compiles the source once
per machine into the requant cache. The kernels run on their own small thread pool sized to
torch.get_num_threads() (see qgemm.c for why not OpenMP).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import memory, native

SOURCE = Path(__file__).parent / "csrc" / "qgemm.c"
ABI_VERSION = 5
GEMM_MAX_M = 64  # RQ_MAX_M in qgemm.c: more input rows than this go through dequantize + BLAS


class LayerDesc(ctypes.Structure):
    """Mirror of `rq_layer` in qgemm.c: pointers into a QuantLinear's buffers plus its sizes."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("out", ctypes.c_int64),
        ("inp", ctypes.c_int64),
        ("row_bytes", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("lut", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("zero_const", ctypes.c_float),
        ("group", ctypes.c_int64),
        ("ngroups", ctypes.c_int64),
        ("rowptr", ctypes.c_void_p),
        ("col", ctypes.c_void_p),
        ("val", ctypes.c_void_p),
        ("row", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("qi", ctypes.c_void_p),
        ("nblk", ctypes.c_int64),
        ("in_div", ctypes.c_void_p),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    lib.rq_set_threads.argtypes = [ctypes.c_int]
    lib.rq_set_threads.restype = ctypes.c_int
    lib.rq_gemm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.rq_gemm.restype = ctypes.c_int
    lib.rq_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.rq_dequantize.restype = None
    lib.rq_pool_chunks.argtypes = [ctypes.c_int]
    lib.rq_pool_chunks.restype = ctypes.c_int64
    lib.rq_interleave.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.rq_interleave.restype = ctypes.c_int64
    lib.rq_llama_scratch.argtypes = [ctypes.c_void_p]
    lib.rq_llama_scratch.restype = ctypes.c_int64
    lib.rq_llama_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.rq_llama_step.restype = ctypes.c_int64
    lib.rq_llama_head.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.rq_llama_head.restype = ctypes.c_int64


_NATIVE = native.NativeLibrary(SOURCE, ABI_VERSION, _declare)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when disabled or unavailable."""
    return _NATIVE.get()


def status() -> str:
    """Why the kernels are (not) in use, for reports and `requant bench`."""
    return _NATIVE.reason


def build_variant(flags: list[str], out_dir: Path) -> ctypes.CDLL:
    """qgemm.c built with specific compiler flags into `out_dir` and loaded (tests of every ISA path)."""
    cc = native.compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    lib = native.load(
        native.build(SOURCE, cc, abi_version=ABI_VERSION, flag_sets=(flags,), out_dir=out_dir), ABI_VERSION
    )
    _declare(lib)
    return lib


def pool_share() -> float | None:
    """Fraction of parallel work chunks the helper threads ran so far (None before any parallel call)."""
    lib = library()
    if lib is None:
        return None
    own, helpers = lib.rq_pool_chunks(0), lib.rq_pool_chunks(1)
    return helpers / (own + helpers) if own + helpers else None


def _sync_threads(lib: ctypes.CDLL) -> None:
    n = torch.get_num_threads()
    if n != lib.__dict__.get("_rq_threads"):
        lib.rq_set_threads(n)
        lib.__dict__["_rq_threads"] = n


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def describe(
    qweight: torch.Tensor,
    in_features: int,
    bits: int,
    *,
    lut: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    group_size: int | None = None,
    rowptr: torch.Tensor | None = None,
    col: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> LayerDesc:
    """A kernel descriptor over contiguous CPU tensors (fp32 tables, values and bias; int32 CSR).

    The caller keeps the tensors alive as long as the descriptor is used.
    """
    for t in (lut, scale, zero, value, bias):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous())
    for t in (qweight, rowptr, col):
        assert t is None or t.is_contiguous()
    out = qweight.shape[0]
    d = LayerDesc()
    d.q, d.out, d.inp, d.row_bytes, d.bits = qweight.data_ptr(), out, in_features, qweight.shape[1], bits
    if lut is not None:
        d.mode, d.lut = 0, lut.data_ptr()
    else:
        assert scale is not None and group_size is not None
        d.mode, d.scale, d.zero = 1, scale.data_ptr(), _ptr(zero)
        d.zero_const = float(2 ** (bits - 1))
        d.group, d.ngroups = group_size, in_features // group_size
    d.rowptr, d.col, d.val, d.bias = _ptr(rowptr), _ptr(col), _ptr(value), _ptr(bias)
    if rowptr is not None and col is not None:
        # row index of every entry, for the kernels' branch-free single-row SpMV; owned by the descriptor
        counts = rowptr[1:].long() - rowptr[:-1].long()
        d.keep = torch.repeat_interleave(torch.arange(out, dtype=torch.int32), counts)
        d.row = d.keep.data_ptr()
    return d


# mode of a plain dense matrix, by dtype
DENSE_MODES = {torch.float16: 2, torch.bfloat16: 3, torch.int8: 4, torch.float32: 5}


def describe_dense(
    weight: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> LayerDesc:
    """A kernel descriptor over a plain (out, in) fp32 / fp16 / bf16 matrix, or int8 with fp32 per-row `scale`
    (ŵ = q · scale[r]), plus an optional fp32 bias; the kernels widen it to fp32 in registers. The caller keeps
    the tensors alive."""
    assert weight.dim() == 2 and weight.is_contiguous() and weight.dtype in DENSE_MODES
    assert (scale is not None) == (weight.dtype == torch.int8)
    assert bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == weight.shape[:1])
    d = LayerDesc()
    d.q, d.out, d.inp = weight.data_ptr(), weight.shape[0], weight.shape[1]
    d.row_bytes, d.bits, d.mode = (
        weight.shape[1] * weight.element_size(),
        8 * weight.element_size(),
        DENSE_MODES[weight.dtype],
    )
    if scale is not None:
        assert scale.dtype == torch.float32 and scale.is_contiguous() and scale.shape == (weight.shape[0],)
        d.scale, d.group, d.ngroups = scale.data_ptr(), weight.shape[1], 1
    d.bias = _ptr(bias)
    return d


class BlockDesc(ctypes.Structure):
    """Mirror of `rq_block` in qgemm.c: one decoder block of the fused batch-1 step (pointers to LayerDescs)."""

    _fields_ = [
        *((n, ctypes.POINTER(LayerDesc)) for n in ("q", "k", "v", "o", "gate", "up", "down")),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("kc", ctypes.c_void_p),
        ("vc", ctypes.c_void_p),
    ]


class LlamaDesc(ctypes.Structure):
    """Mirror of `rq_llama` in qgemm.c: sizes, blocks and tables of the fused batch-1 decode step."""

    _fields_ = [
        *(
            (n, ctypes.c_int64)
            for n in ("n_blocks", "hidden", "n_heads", "n_kv", "head_dim", "inter", "max_len", "vocab")
        ),
        ("eps", ctypes.c_float),
        ("scaling", ctypes.c_float),
        ("blocks", ctypes.POINTER(BlockDesc)),
        ("final_norm", ctypes.c_void_p),
        ("embed", ctypes.c_void_p),
        ("embed_mode", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("head", ctypes.POINTER(LayerDesc)),
        ("screen", ctypes.POINTER(LayerDesc)),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
    ]


def llama_step(lib: ctypes.CDLL, desc: LlamaDesc, token: int, pos: int, exact: bool = False) -> int:
    """One fused decode step (token at position pos); the argmax of the head's next-token logits. The logits land
    in desc.logits: the head's own with `exact` or without a screen, else the int8 screen's (see qgemm.c)."""
    _sync_threads(lib)
    nxt = lib.rq_llama_step(ctypes.addressof(desc), token, pos, int(exact))
    if nxt < 0:
        raise ValueError(f"rq_llama_step: token {token} or position {pos} out of range")
    return nxt


def interleave(lib: ctypes.CDLL, desc: LayerDesc) -> None:
    """Give a packed layer's descriptor the single-row kernel's interleaved copy of its codes (rq_interleave in
    qgemm.c; as many bytes as the packed blocks it covers), once; nothing when this build's kernel has no use for
    it. Made on a layer's first single-row call, so prefill- or perplexity-only use never pays its memory."""
    if getattr(desc, "interleave_done", False):
        return
    desc.interleave_done = True
    n = lib.rq_interleave(ctypes.addressof(desc), None)
    if n > 0:
        desc.keep_qi = torch.empty(n, dtype=torch.uint8)
        lib.rq_interleave(ctypes.addressof(desc), desc.keep_qi.data_ptr())
        if desc.inp % 8 == 0:  # every later decode reads the copy: a zero-copy checkpoint's pages can go
            memory.release_file_pages(desc.q, desc.out * desc.row_bytes)


def gemm(lib: ctypes.CDLL, desc: LayerDesc, x: torch.Tensor) -> torch.Tensor:
    """x (m, in) fp32 contiguous, m ≤ GEMM_MAX_M → x Ŵᵀ + bias (m, out), without materialising Ŵ."""
    _sync_threads(lib)
    if x.shape[0] == 1:
        interleave(lib, desc)
    y = torch.empty(x.shape[0], desc.out, dtype=torch.float32)
    if lib.rq_gemm(ctypes.addressof(desc), x.data_ptr(), x.shape[0], x.stride(0), y.data_ptr()) != 0:
        raise ValueError(f"rq_gemm takes 1..{GEMM_MAX_M} input rows, got {x.shape[0]}")
    return y


def dequantize(lib: ctypes.CDLL, desc: LayerDesc) -> torch.Tensor:
    """Ŵ (out, in) fp32, bit-exact with the reference decode (dense + sparse residual)."""
    _sync_threads(lib)
    w = torch.empty(desc.out, desc.inp, dtype=torch.float32)
    lib.rq_dequantize(ctypes.addressof(desc), w.data_ptr())
    return w
