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

import json
from collections.abc import Mapping
from typing import Any

import torch

from ..accounting import BitCount, count_bits
from ..errors import CheckpointError
from ..model import LayerInfo
from ..quantizers import QuantizedTensor
from ..results import QuantizedLayer
from ..sparse import SparseResidual
from . import kinds
from .kinds import TensorSpec
from .names import (
    COL,
    DENSE_TENSORS,
    IN_SCALE,
    QWEIGHT,
    ROWPTR,
    SPARSE_TENSORS,
    TABLE_TENSORS,
    VALUE,
)
from .pack import PACK_BITS, from_csr, pack_codes, packed_row_bytes, to_csr, unpack_codes

# v2: transformers' own layout (one safetensors set, the layer table in config.json). v1 (requant.json +
# quantized.safetensors) and v0 (unpacked codes, flat sparse index) are converted on load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (0, 1, 2)


class LayerLayout:
    """The stored form of one quantized layer: the fields every kind shares (kind, shape, bits, nnz) and the
    kind's own params (format.kinds); its table entry round-trips through config.json."""

    __slots__ = ("bits", "in_features", "kind", "nnz", "out_features", "params")

    def __init__(self, kind: str, out_features: int, in_features: int, bits: int, nnz: int = 0, **params: Any):
        storage = kinds.kind(kind)
        self.kind, self.out_features, self.in_features, self.bits, self.nnz = kind, out_features, in_features, bits, nnz
        self.params: dict[str, Any] = storage.params(params)
        if self.bits not in PACK_BITS:
            raise CheckpointError(f"bits {self.bits} cannot be packed; allowed: {PACK_BITS}")
        if self.out_features < 1 or self.in_features < 1 or self.nnz < 0:
            raise CheckpointError(f"bad layer shape ({self.out_features}, {self.in_features}) or nnz {self.nnz}")
        if self.nnz > self.out_features * self.in_features:
            raise CheckpointError(f"nnz {self.nnz} exceeds the layer's {self.numel} weights")
        storage.check(self)

    def _key(self) -> tuple:
        return (
            self.kind,
            self.out_features,
            self.in_features,
            self.bits,
            self.nnz,
            json.dumps(self.params, sort_keys=True),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return (
            f"LayerLayout({self.kind!r}, {self.out_features}, {self.in_features}, {self.bits}, nnz={self.nnz}{extra})"
        )

    @property
    def storage(self) -> kinds.StorageKind:
        return kinds.kind(self.kind)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def tensors(self) -> dict[str, TensorSpec]:
        """Suffix → spec of every tensor this layer stores, in storage order."""
        out = self.out_features
        chunks = packed_row_bytes(self.in_features, self.bits) // self.bits
        specs = {QWEIGHT: TensorSpec(torch.uint8, (out, chunks, self.bits)), **self.storage.tables(self)}
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
            **self.params,
        }

    @staticmethod
    def of(kind: str, out: int, inp: int, bits: int, nnz: int, params: dict[str, Any]) -> LayerLayout:
        """The layout of a kind from its params (a QuantizedTensor's params(), or a layer-table entry)."""
        own = {k: params[k] for k in kinds.kind(kind).PARAMS if k in params}
        return LayerLayout(kind, out, inp, bits, nnz, **own)

    @staticmethod
    def from_meta(meta: dict[str, Any], where: str) -> LayerLayout:
        """Parse one layer's table entry; `where` names it in errors."""
        try:
            out, inp = (int(s) for s in meta["shape"])
            return LayerLayout.of(str(meta["kind"]), out, inp, int(meta["bits"]), int(meta.get("nnz", 0)), meta)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{where}: malformed layer metadata ({type(e).__name__}: {e})") from None


def check_table_summary(where: str, qc: Mapping[str, Any], layouts: Mapping[str, LayerLayout]) -> None:
    """A quantization_config's summary (its `bits`, `sparse_entries`) agrees with its per-layer layouts."""
    widened = isinstance(qc.get("bits"), int) and bool((qc.get("config") or {}).get("widen_bits"))
    allowed = {qc.get("bits"), qc["bits"] + 1} if widened else {qc.get("bits")}  # --widen-bits: some one wider
    for name, layout in layouts.items():
        if layout.bits not in allowed:
            raise CheckpointError(
                f"{where}: quantization_config.bits = {qc.get('bits')!r}"
                f"{' (some layers one more)' if widened else ''}, but layer {name} is stored with {layout.bits} bits"
            )
    nnz = sum(lo.nnz for lo in layouts.values())
    if qc.get("sparse_entries") != nnz:
        raise CheckpointError(
            f"{where}: quantization_config.sparse_entries = {qc.get('sparse_entries')!r}, but the layer table "
            f"holds {nnz} sparse entries"
        )


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
    meta = {"kind": layout.kind, "bits": layout.bits, **layout.params}
    return QuantizedTensor.from_state(meta, {"codes": codes, **tables})


def decode_layer(layout: LayerLayout, tensors: dict[str, torch.Tensor], info: LayerInfo) -> QuantizedLayer:
    """Inverse of encode_layer: the in-memory QuantizedLayer (unpacked codes, flat sparse indices)."""

    shape = (layout.out_features, layout.in_features)
    sparse = (
        from_csr(tensors[ROWPTR], tensors[COL], tensors[VALUE], shape) if layout.nnz else SparseResidual.empty(shape)
    )
    return QuantizedLayer(info, decode_dense(layout, tensors), sparse)
