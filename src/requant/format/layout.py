"""Format v1, described once: which tensors a quantized layer stores, their dtypes and shapes.

Every tensor's dtype and shape is a function of (kind, out, in, bits, group size, sym, nnz). The writer,
the reader, the validator, `QuantLinear` (whose buffers carry these names) and `requant inspect` all ask
this module; none of them spells a shape on its own.

Per quantized layer `<name>` (in quantized.safetensors):
  <name>.qweight        uint8 (out, ceil(in/8)·bits)   packed codes (format.pack)
  <name>.lut            fp16  (out, 2^bits)            kind "lut": per-row look-up table
  <name>.scale          fp16  (out, in/group)          kind "uniform": per-group scale
  <name>.zero           fp16  (out, in/group)          kind "uniform", asymmetric only: zero point
  <name>.sparse_rowptr  int32 (out+1,)                 only when nnz > 0: CSR row pointers
  <name>.sparse_col     int32 (nnz,)                   column indices
  <name>.sparse_value   fp16  (nnz,)                   residual values, ŵ = dense + sparse
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..accounting import BitCount, count_bits
from ..errors import CheckpointError
from ..model import LayerInfo
from ..quantizers import LUTTensor, QuantizedTensor, UniformTensor
from .pack import PACK_BITS, from_csr, pack_codes, packed_row_bytes, to_csr, unpack_codes

if TYPE_CHECKING:
    from ..pipeline import QuantizedLayer

FORMAT_VERSION = 1
READABLE_VERSIONS = (0, 1)  # v0 (unpacked codes, flat sparse index) is converted on load

QWEIGHT, LUT, SCALE, ZERO = "qweight", "lut", "scale", "zero"
ROWPTR, COL, VALUE = "sparse_rowptr", "sparse_col", "sparse_value"
DENSE_TENSORS = (QWEIGHT,)
TABLE_TENSORS = (LUT, SCALE, ZERO)
SPARSE_TENSORS = (ROWPTR, COL, VALUE)
KINDS = ("lut", "uniform")

DTYPE_NAMES = {torch.uint8: "U8", torch.int32: "I32", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class TensorSpec:
    """Dtype and shape one stored tensor must have."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()

    def describe(self) -> str:
        return f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))} {list(self.shape)}"


@dataclass(frozen=True)
class LayerLayout:
    """The stored form of one quantized layer; its metadata round-trips through requant.json."""

    kind: str
    out_features: int
    in_features: int
    bits: int
    nnz: int = 0
    group_size: int | None = None  # uniform only
    sym: bool = False  # uniform only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"quantized tensor kind {self.kind!r} has no v1 layout; known: {KINDS}")
        if self.bits not in PACK_BITS:
            raise CheckpointError(f"bits {self.bits} cannot be packed; allowed: {PACK_BITS}")
        if self.out_features < 1 or self.in_features < 1 or self.nnz < 0:
            raise CheckpointError(f"bad layer shape ({self.out_features}, {self.in_features}) or nnz {self.nnz}")
        if self.nnz > self.out_features * self.in_features:
            raise CheckpointError(f"nnz {self.nnz} exceeds the layer's {self.numel} weights")
        if self.kind == "uniform" and (
            not self.group_size or self.group_size < 1 or self.in_features % self.group_size
        ):
            raise CheckpointError(f"group size {self.group_size} does not divide the input width {self.in_features}")

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size if self.group_size else 1

    def tensors(self) -> dict[str, TensorSpec]:
        """Suffix → spec of every tensor this layer stores, in storage order."""
        out, inp = self.out_features, self.in_features
        specs = {QWEIGHT: TensorSpec(torch.uint8, (out, packed_row_bytes(inp, self.bits)))}
        if self.kind == "lut":
            specs[LUT] = TensorSpec(torch.float16, (out, 2**self.bits))
        else:
            specs[SCALE] = TensorSpec(torch.float16, (out, self.groups))
            if not self.sym:
                specs[ZERO] = TensorSpec(torch.float16, (out, self.groups))
        if self.nnz:
            specs[ROWPTR] = TensorSpec(torch.int32, (out + 1,))
            specs[COL] = TensorSpec(torch.int32, (self.nnz,))
            specs[VALUE] = TensorSpec(torch.float16, (self.nnz,))
        return specs

    def stored_bytes(self, part: str | None = None) -> int:
        """Bytes stored for this layer: all, or one part ("codes", "tables", "sparse")."""
        parts = {"codes": DENSE_TENSORS, "tables": TABLE_TENSORS, "sparse": SPARSE_TENSORS}
        names = parts[part] if part else None
        return sum(s.nbytes for k, s in self.tensors().items() if names is None or k in names)

    def bit_count(self) -> BitCount:
        """The paper's accounting (requant.accounting) of this layer."""
        tables = [
            torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in self.tensors().items() if k in TABLE_TENSORS
        ]
        return count_bits(self.numel, self.bits, tables, self.nnz)

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "kind": self.kind,
            "bits": self.bits,
            "shape": [self.out_features, self.in_features],
            "nnz": self.nnz,
        }
        if self.kind == "uniform":
            meta.update(group_size=self.group_size, sym=self.sym)
        return meta

    @staticmethod
    def from_meta(meta: dict[str, Any], where: str) -> LayerLayout:
        """Parse one layer's requant.json entry; `where` names it in errors."""
        try:
            out, inp = (int(s) for s in meta["shape"])
            return LayerLayout(
                kind=str(meta["kind"]),
                out_features=out,
                in_features=inp,
                bits=int(meta["bits"]),
                nnz=int(meta.get("nnz", 0)),
                group_size=int(meta["group_size"]) if meta.get("group_size") is not None else None,
                sym=bool(meta.get("sym", False)),
            )
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed layer metadata ({type(e).__name__}: {e})") from None


def tensor_name(layer: str, suffix: str) -> str:
    return f"{layer}.{suffix}"


def check_specs(
    file: str, layer: str, layout: LayerLayout, found: dict[str, tuple[torch.dtype, tuple[int, ...]]]
) -> None:
    """Every tensor of `layer` present in `found` (suffix → (dtype, shape)) with its exact spec, and no other."""
    expected = layout.tensors()
    for suffix, spec in expected.items():
        name = tensor_name(layer, suffix)
        if suffix not in found:
            raise CheckpointError(f"{file!r}: tensor {name} is missing (expected {spec.describe()})")
        dtype, shape = found[suffix]
        if dtype != spec.dtype or tuple(shape) != spec.shape:
            got = TensorSpec(dtype, tuple(shape)).describe()
            raise CheckpointError(
                f"{file!r}: tensor {name} is {got}, expected {spec.describe()} for a {layout.bits}-bit "
                f"{layout.kind} layer of shape ({layout.out_features}, {layout.in_features}) with "
                f"{layout.nnz} sparse entries"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{file!r}: unexpected tensor {tensor_name(layer, extra[0])} for this layout")


def check_values(file: str, layer: str, layout: LayerLayout, tensors: dict[str, torch.Tensor]) -> None:
    """Value checks that keep bad data out of the kernels: finite tables, a well-formed CSR."""
    for suffix in (*TABLE_TENSORS, VALUE):
        t = tensors.get(suffix)
        if t is not None and not torch.isfinite(t).all():
            raise CheckpointError(f"{file!r}: tensor {tensor_name(layer, suffix)} holds NaN or Inf")
    if layout.nnz:
        rowptr, col = tensors[ROWPTR].long(), tensors[COL].long()
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != layout.nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise CheckpointError(
                f"{file!r}: tensor {tensor_name(layer, ROWPTR)} is not a non-decreasing 0..{layout.nnz} "
                "row pointer array"
            )
        if int(col.min()) < 0 or int(col.max()) >= layout.in_features:
            raise CheckpointError(
                f"{file!r}: tensor {tensor_name(layer, COL)} has a column outside [0, {layout.in_features})"
            )
        # within a row, columns strictly increase (no duplicates): compare neighbours not across rows
        starts = torch.zeros(layout.nnz, dtype=torch.bool)
        starts[rowptr[:-1][rowptr[:-1] < layout.nnz]] = True
        if bool(((col[1:] <= col[:-1]) & ~starts[1:]).any()):
            raise CheckpointError(
                f"{file!r}: tensor {tensor_name(layer, COL)} is not strictly increasing within each row"
            )


def layout_of(q: QuantizedLayer) -> LayerLayout:
    """The layout a quantized layer is stored in."""
    out, inp = q.dense.shape
    d = q.dense
    if isinstance(d, LUTTensor):
        return LayerLayout("lut", out, inp, d.bits, q.sparse.nnz)
    if isinstance(d, UniformTensor):
        return LayerLayout("uniform", out, inp, d.bits, q.sparse.nnz, d.group_size, d.zero is None)
    raise CheckpointError(f"quantized tensor kind {d.kind!r} has no v1 layout; known: {KINDS}")


def encode_layer(q: QuantizedLayer) -> tuple[LayerLayout, dict[str, torch.Tensor]]:
    """(layout, suffix → tensor) of one quantized layer, exactly as stored."""
    layout = layout_of(q)
    tensors = {QWEIGHT: pack_codes(q.dense.codes, layout.bits)}
    tensors.update({k: t.to(torch.float16).contiguous() for k, t in q.dense.tables().items()})
    if layout.nnz:
        tensors[ROWPTR], tensors[COL], tensors[VALUE] = to_csr(q.sparse)
    found = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    check_specs("<memory>", q.info.name, layout, found)  # the writer obeys the same layout as the reader
    return layout, tensors


def decode_dense(layout: LayerLayout, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The unpacked dense part (the reference decoder's input) of a stored layer."""
    codes = unpack_codes(tensors[QWEIGHT], layout.bits, layout.in_features)
    if layout.kind == "lut":
        return LUTTensor(codes=codes, lut=tensors[LUT], bits=layout.bits)
    assert layout.group_size is not None
    return UniformTensor(
        codes=codes, scale=tensors[SCALE], zero=tensors.get(ZERO), bits=layout.bits, group_size=layout.group_size
    )


def decode_layer(layout: LayerLayout, tensors: dict[str, torch.Tensor], info: LayerInfo) -> QuantizedLayer:
    """Inverse of encode_layer: the in-memory QuantizedLayer (unpacked codes, flat sparse indices)."""
    from ..pipeline import QuantizedLayer
    from ..sparse import SparseResidual

    shape = (layout.out_features, layout.in_features)
    sparse = (
        from_csr(tensors[ROWPTR], tensors[COL], tensors[VALUE], shape) if layout.nnz else SparseResidual.empty(shape)
    )
    return QuantizedLayer(info, decode_dense(layout, tensors), sparse)
