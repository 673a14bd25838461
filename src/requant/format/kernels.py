"""Optional C kernels for packed layers: built on first use with the system C compiler, loaded by ctypes.

Nothing here is needed to import requant: without a compiler (or with REQUANT_KERNELS=0) `library()`
returns None and QuantLinear runs its pure-PyTorch reference path. The shared library is cached under
<requant cache>/kernels, keyed by a hash of the source, the compiler, the flags and the CPU, so a build
happens once per machine. The kernels run on their own small thread pool sized to
torch.get_num_threads() (see qgemm.c for why not OpenMP).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "qgemm.c"
ABI_VERSION = 3
GEMM_MAX_M = 64  # RQ_MAX_M in qgemm.c: more input rows than this go through dequantize + BLAS
ENV_SWITCH = "REQUANT_KERNELS"  # "0" / "off" disables the C kernels

# -ffp-contract=off: no fused multiply-add where the reference rounds twice (dequantize stays bit-exact).
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-pthread"],
    ["-O3", "-ffp-contract=off", "-pthread"],
)

_lib: ctypes.CDLL | None = None
_tried = False
_reason = "not built yet"


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
    ]


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}:{flags}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(cc: str, flag_sets: tuple[list[str], ...] = _FLAG_SETS, out_dir: Path | None = None) -> Path:
    """Compile qgemm.c with the first flag set that works (cached); the path of the shared library."""
    from ..assets import cache_dir

    source = SOURCE.read_bytes()
    out_dir = out_dir or cache_dir() / "kernels"
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(source + f"{cc}|{flags}|{_cpu_key()}".encode()).hexdigest()[:16]
        target = out_dir / f"qgemm-{key}.so"
        if target.is_file():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".qgemm-", suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cc, *flags, "-std=gnu11", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when disabled or unavailable."""
    global _lib, _tried, _reason
    if not _enabled():
        return None
    if _tried:
        return _lib
    _tried = True
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found (set CC)"
        return None
    try:
        lib = load(build(cc))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"build or load failed: {e}"
        return None
    _lib, _reason = lib, f"loaded ({lib.rq_isa().decode()})"
    return lib


def load(path: Path) -> ctypes.CDLL:
    """Load a built kernel library and declare its functions."""
    lib = ctypes.CDLL(str(path))
    if lib.rq_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version {lib.rq_abi_version()} != {ABI_VERSION}")
    lib.rq_isa.restype = ctypes.c_char_p
    lib.rq_set_threads.argtypes = [ctypes.c_int]
    lib.rq_set_threads.restype = ctypes.c_int
    lib.rq_gemm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.rq_gemm.restype = ctypes.c_int
    lib.rq_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.rq_dequantize.restype = None
    lib.rq_pool_chunks.argtypes = [ctypes.c_int]
    lib.rq_pool_chunks.restype = ctypes.c_int64
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


def status() -> str:
    """Why the kernels are (not) in use, for reports and `requant bench`."""
    if not _enabled():
        return f"disabled by {ENV_SWITCH}=0"
    library()
    return _reason


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


def gemm(lib: ctypes.CDLL, desc: LayerDesc, x: torch.Tensor) -> torch.Tensor:
    """x (m, in) fp32 contiguous, m ≤ GEMM_MAX_M → x Ŵᵀ + bias (m, out), without materialising Ŵ."""
    _sync_threads(lib)
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
