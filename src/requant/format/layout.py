"""The stored form of a quantized layer, described once: which tensors it has, their dtypes and shapes.

Every tensor's dtype and shape is a function of (kind, out, in, bits, kind params, nnz). The writer,
the reader, the validator, `QuantLinear` (whose buffers carry these names) and `requant inspect` all ask
this module; none of them spells a shape on its own.

Per quantized layer `<name>` (format v2; every tensor in the checkpoint's safetensors files):
  <name>.weight         uint8 (out, ceil(in/8), bits)  packed codes (format.pack): 8 codes per `bits` bytes
  <name>.lut            fp16  (out, 2^bits)            kind "lut": per-row look-up table
  <name>.scale          fp16  (out, in/group)          kinds "uniform", "awq": per-group scale
  <name>.zero           fp16  (out, in/group)          kinds "uniform", "awq", asymmetric only: zero point
  <name>.in_scale       fp16  (in,)                    kind "awq": per-input-channel scale s, ŵ = uniform / s
  <name>.sign_in        uint8 (ceil(in/8),)            kind "trellis": bit-packed RHT signs of the inputs
  <name>.sign_out       uint8 (ceil(out/8),)           kind "trellis": bit-packed RHT signs of the outputs
  <name>.scale          fp16  (1,)                     kind "trellis": the matrix's one scale
  <name>.sparse_rowptr  int32 (out+1,)                 only when nnz > 0: CSR row pointers
  <name>.sparse_col     int32 (nnz,)                   column indices
  <name>.sparse_value   fp16  (nnz,)                   residual values, ŵ = dense + sparse

The packed codes sit under the original weight's name with a 3-D shape on purpose: a loader that does not know
requant (plain transformers) finds `<name>.weight` with a shape no `nn.Linear` has and refuses the checkpoint
with a size mismatch, instead of building a model with random layers. Format v1 stored the same bytes as
`<name>.qweight` (out, ceil(in/8)·bits); its reader renames and reshapes them (checkpoint.py).

Kind "trellis" (QTIP) stores its K-bit stream pieces as codes like any other kind (K = bits), and its trellis
(L, V, code) and tile in the layer table; its tensors are TrellisTensor's, decoded by it.
Tables of every kind are exactly the QuantizedTensor's TABLES, so the accounting (which counts those tables
at their stored width) and the stored bytes agree: they differ only by the CSR row pointers and the padding
of rows to whole 8-code chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..accounting import BitCount, count_bits
from ..errors import CheckpointError
from ..model import LayerInfo
from ..quantizers import QuantizedTensor
from ..quantizers.qtip.trellis import Trellis
from ..results import QuantizedLayer
from ..sparse import SparseResidual
from .pack import PACK_BITS, from_csr, pack_codes, packed_row_bytes, to_csr, unpack_codes

# v2: transformers' own layout (one safetensors set, the layer table in config.json). v1 (requant.json +
# quantized.safetensors) and v0 (unpacked codes, flat sparse index) are converted on load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (0, 1, 2)

QWEIGHT, LUT, SCALE, ZERO = "weight", "lut", "scale", "zero"
V1_QWEIGHT = "qweight"  # format v1's name of the packed codes, 2-D (out, ceil(in/8)·bits)
IN_SCALE, SIGN_IN, SIGN_OUT = "in_scale", "sign_in", "sign_out"
ROWPTR, COL, VALUE = "sparse_rowptr", "sparse_col", "sparse_value"
DENSE_TENSORS = (QWEIGHT,)
TABLE_TENSORS = (LUT, SCALE, ZERO, IN_SCALE, SIGN_IN, SIGN_OUT)
SPARSE_TENSORS = (ROWPTR, COL, VALUE)
KINDS = ("lut", "uniform", "awq", "trellis")
UNIFORM_KINDS = ("uniform", "awq")  # group-wise (code − zero)·scale codes; "awq" divides by in_scale

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
    group_size: int | None = None  # uniform kinds only
    sym: bool = False  # uniform kinds only
    L: int | None = None  # trellis only: state bits
    V: int | None = None  # trellis only: weights per trellis step
    code: str | None = None  # trellis only: the computed code ("1mad" | "3inst")
    tile: tuple[int, int] | None = None  # trellis only: rows × columns of weights per trellis stream

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"quantized tensor kind {self.kind!r} has no stored layout; known: {KINDS}")
        if self.bits not in PACK_BITS:
            raise CheckpointError(f"bits {self.bits} cannot be packed; allowed: {PACK_BITS}")
        if self.out_features < 1 or self.in_features < 1 or self.nnz < 0:
            raise CheckpointError(f"bad layer shape ({self.out_features}, {self.in_features}) or nnz {self.nnz}")
        if self.nnz > self.out_features * self.in_features:
            raise CheckpointError(f"nnz {self.nnz} exceeds the layer's {self.numel} weights")
        if self.kind in UNIFORM_KINDS and (
            not self.group_size or self.group_size < 1 or self.in_features % self.group_size
        ):
            raise CheckpointError(f"group size {self.group_size} does not divide the input width {self.in_features}")
        if self.kind == "trellis":
            self._check_trellis()

    def _check_trellis(self) -> None:
        if self.L is None or self.V is None or self.code is None or self.tile is None:
            raise CheckpointError("a trellis layer needs L, V, code and tile")
        try:
            Trellis(self.L, self.bits, self.V, self.code)
        except ValueError as e:
            raise CheckpointError(f"bad trellis (L={self.L}, K={self.bits}, V={self.V}, {self.code}): {e}") from None
        tx, ty = self.tile
        if tx < 1 or ty < 1 or self.out_features % tx or self.in_features % ty or (tx * ty) % self.V:
            raise CheckpointError(
                f"trellis tile {tx}x{ty} does not divide the shape ({self.out_features}, {self.in_features}) "
                f"into streams of a multiple of V={self.V} weights"
            )
        if tx * ty * self.bits < self.L:
            raise CheckpointError(f"trellis tile {tx}x{ty} holds fewer than L={self.L} bits at {self.bits} bits")

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size if self.group_size else 1

    def params(self) -> dict[str, Any]:
        """The kind's decoding settings besides kind and bits, as its QuantizedTensor.params() gives them."""
        if self.kind in UNIFORM_KINDS:
            return {"group_size": self.group_size, "sym": self.sym}
        if self.kind == "trellis":
            assert self.tile is not None
            return {"L": self.L, "V": self.V, "code": self.code, "tile": list(self.tile), "tail_biting": True}
        return {}

    def tensors(self) -> dict[str, TensorSpec]:
        """Suffix → spec of every tensor this layer stores, in storage order."""
        out, inp = self.out_features, self.in_features
        specs = {QWEIGHT: TensorSpec(torch.uint8, (out, packed_row_bytes(inp, self.bits) // self.bits, self.bits))}
        if self.kind == "lut":
            specs[LUT] = TensorSpec(torch.float16, (out, 2**self.bits))
        elif self.kind in UNIFORM_KINDS:
            specs[SCALE] = TensorSpec(torch.float16, (out, self.groups))
            if not self.sym:
                specs[ZERO] = TensorSpec(torch.float16, (out, self.groups))
            if self.kind == "awq":
                specs[IN_SCALE] = TensorSpec(torch.float16, (inp,))
        else:  # trellis: TrellisTensor.TABLES
            specs[SIGN_IN] = TensorSpec(torch.uint8, (-(-inp // 8),))
            specs[SIGN_OUT] = TensorSpec(torch.uint8, (-(-out // 8),))
            specs[SCALE] = TensorSpec(torch.float16, (1,))
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
        return {
            "kind": self.kind,
            "bits": self.bits,
            "shape": [self.out_features, self.in_features],
            "nnz": self.nnz,
            **self.params(),
        }

    @staticmethod
    def of(kind: str, out: int, inp: int, bits: int, nnz: int, params: dict[str, Any]) -> LayerLayout:
        """The layout of a kind from its params() (a QuantizedTensor's, or a requant.json entry's)."""
        trellis = kind == "trellis"
        if trellis and params.get("tail_biting", True) is not True:
            raise CheckpointError("only tail-biting trellis streams have a stored layout")
        return LayerLayout(
            kind=kind,
            out_features=out,
            in_features=inp,
            bits=bits,
            nnz=nnz,
            group_size=int(params["group_size"]) if params.get("group_size") is not None else None,
            sym=bool(params.get("sym", False)),
            L=int(params["L"]) if trellis else None,
            V=int(params["V"]) if trellis else None,
            code=str(params["code"]) if trellis else None,
            tile=(int(params["tile"][0]), int(params["tile"][1])) if trellis else None,
        )

    @staticmethod
    def from_meta(meta: dict[str, Any], where: str) -> LayerLayout:
        """Parse one layer's requant.json entry; `where` names it in errors."""
        try:
            out, inp = (int(s) for s in meta["shape"])
            return LayerLayout.of(str(meta["kind"]), out, inp, int(meta["bits"]), int(meta.get("nnz", 0)), meta)
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
    in_scale = tensors.get(IN_SCALE)
    if in_scale is not None and bool((in_scale == 0).any()):
        raise CheckpointError(
            f"{file!r}: tensor {tensor_name(layer, IN_SCALE)} holds a zero (the weight divides by it)"
        )
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
    if d.kind not in KINDS:
        raise CheckpointError(f"quantized tensor kind {d.kind!r} has no stored layout; known: {KINDS}")
    return LayerLayout.of(d.kind, out, inp, d.bits, q.sparse.nnz, d.params())


def encode_layer(q: QuantizedLayer) -> tuple[LayerLayout, dict[str, torch.Tensor]]:
    """(layout, suffix → tensor) of one quantized layer, exactly as stored."""
    layout = layout_of(q)
    specs = layout.tensors()
    tensors = {QWEIGHT: pack_codes(q.dense.codes, layout.bits).view(specs[QWEIGHT].shape)}
    # tables at their stored dtype (fp16 values, uint8 packed signs); check_specs refuses a missing or extra one
    tensors.update(
        {k: t.to(specs[k].dtype if k in specs else t.dtype).contiguous() for k, t in q.dense.tables().items()}
    )
    if layout.nnz:
        tensors[ROWPTR], tensors[COL], tensors[VALUE] = to_csr(q.sparse)
    found = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    check_specs("<memory>", q.info.name, layout, found)  # the writer obeys the same layout as the reader
    return layout, tensors


def decode_dense(layout: LayerLayout, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """The unpacked dense part (the reference decoder's input) of a stored layer: the kind's own
    QuantizedTensor, built by its `_from_state` from the unpacked codes and the stored tables."""
    codes = unpack_codes(tensors[QWEIGHT], layout.bits, layout.in_features)
    tables = {k: t for k, t in tensors.items() if k in TABLE_TENSORS}
    meta = {"kind": layout.kind, "bits": layout.bits, **layout.params()}
    return QuantizedTensor.from_state(meta, {"codes": codes, **tables})


def decode_layer(layout: LayerLayout, tensors: dict[str, torch.Tensor], info: LayerInfo) -> QuantizedLayer:
    """Inverse of encode_layer: the in-memory QuantizedLayer (unpacked codes, flat sparse indices)."""

    shape = (layout.out_features, layout.in_features)
    sparse = (
        from_csr(tensors[ROWPTR], tensors[COL], tensors[VALUE], shape) if layout.nnz else SparseResidual.empty(shape)
    )
    return QuantizedLayer(info, decode_dense(layout, tensors), sparse)
