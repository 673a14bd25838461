"""Storage kinds: one registered class per stored form of a layer's dense part.

A kind owns everything that differs between stored forms: the settings it needs to decode (`params`, checked
by `check`), the table tensors it stores beside the packed codes (`tables`), and how the fast CPU path runs it
(`runner`). LayerLayout (format.layout) keeps only what every kind shares — kind, shape, bits, nnz — plus
the kind's params; nothing else in the format branches on a kind's name. A new kind is one class here with
`@register`, next to the QuantizedTensor subclass (quantizers/) whose TABLES it stores. All kinds live in
this module, so which kinds exist never depends on import order.

Runners (the fast path, QuantLinear.forward): `gemm(x)` for a few input rows straight from the packed codes,
and `weight()` = Ŵ in fp32, decoded bit-exactly as the reference decoder does, for prefill (F.linear on it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import CheckpointError
from ..quantizers.qtip.trellis import Trellis
from . import kernels
from .names import COL, IN_SCALE, LUT, ROWPTR, SCALE, SIGN_IN, SIGN_OUT, VALUE, ZERO


class LayerLayout(Protocol):
    """What a kind reads of a layout (format.layout.LayerLayout; a protocol, so this module imports nothing
    above it)."""

    kind: str
    out_features: int
    in_features: int
    bits: int
    nnz: int
    params: dict[str, Any]


class QuantLinear(Protocol):
    """What a runner reads of a packed layer (format.qlinear.QuantLinear)."""

    layout: LayerLayout
    in_features: int
    bias: torch.Tensor | None

    def packed(self) -> torch.Tensor: ...
    def float_tables(self) -> dict[str, torch.Tensor]: ...
    def sparse_f32(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...
    def dequantize(self) -> torch.Tensor: ...


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


DTYPE_NAMES = {torch.uint8: "U8", torch.int32: "I32", torch.float16: "F16", torch.float32: "F32"}


class Runner:
    """The fast path of one QuantLinear: `gemm` (None: no kernel for few rows) and `weight` (Ŵ, fp32)."""

    gemm: Any = None

    def weight(self) -> torch.Tensor:
        raise NotImplementedError


class StorageKind(ABC):
    """One stored form: its params, their checks, its table tensors and its fast-path runner."""

    name: ClassVar[str]
    PARAMS: ClassVar[tuple[str, ...]] = ()

    def params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """This kind's decoding settings from a QuantizedTensor.params() or a layer-table entry (JSON types)."""
        return {}

    def check(self, layout: LayerLayout) -> None:  # noqa: B027 - most kinds have nothing to check
        """Refuse params that do not describe a decodable layer of this shape (CheckpointError)."""

    @abstractmethod
    def tables(self, layout: LayerLayout) -> dict[str, TensorSpec]:
        """Suffix → spec of the tables stored beside the packed codes (exactly the QuantizedTensor's TABLES)."""

    def runner(self, module: QuantLinear, lib: object) -> Runner | None:
        """The fast path over the module's buffers (`lib`: the loaded kernel library, or None)."""
        if lib is None:
            return None
        return _CodesRunner(module, lib, module.float_tables())


KINDS: dict[str, StorageKind] = {}


def register(cls: type[StorageKind]) -> type[StorageKind]:
    """Class decorator: make a storage kind known by its name."""
    if cls.name in KINDS:
        raise ValueError(f"storage kind {cls.name!r} is registered twice")
    KINDS[cls.name] = cls()
    return cls


def kind(name: str) -> StorageKind:
    k = KINDS.get(name)
    if k is None:
        raise CheckpointError(f"quantized tensor kind {name!r} has no stored layout; known: {tuple(KINDS)}")
    return k


def _describe(module: QuantLinear, f32: dict[str, torch.Tensor], *, full: bool = True) -> tuple[Any, list]:
    """A kernel descriptor over the module's packed codes and fp32 tables (+ CSR residual and bias if `full`),
    and the tensors it points into (to keep alive)."""
    group = module.layout.params.get("group_size")
    packed = module.packed()
    bias = None if module.bias is None or not full else module.bias.detach().float().contiguous()
    desc = kernels.describe(
        packed,
        module.in_features,
        module.layout.bits,
        lut=f32.get(LUT),
        scale=f32.get(SCALE),
        zero=f32.get(ZERO),
        group_size=None if LUT in f32 else group,
        rowptr=getattr(module, ROWPTR, None) if full else None,
        col=getattr(module, COL, None) if full else None,
        value=f32.get(VALUE) if full else None,
        bias=bias,
    )
    return desc, [packed, *f32.values(), bias]


class _CodesRunner(Runner):
    """Packed codes + per-row LUT (or a group-wise uniform grid) + CSR residual, through the C kernels."""

    def __init__(self, module: QuantLinear, lib: object, f32: dict[str, torch.Tensor]) -> None:
        self.lib = lib
        self.desc, self.keep = _describe(module, f32)
        self.gemm = lambda x: kernels.gemm(lib, self.desc, x)

    def weight(self) -> torch.Tensor:
        return kernels.dequantize(self.lib, self.desc)


@register
class LUTKind(StorageKind):
    """Per-row look-up tables of 2^bits fp16 values (SqueezeLLM)."""

    name = "lut"

    def tables(self, layout: LayerLayout) -> dict[str, TensorSpec]:
        return {LUT: TensorSpec(torch.float16, (layout.out_features, 2**layout.bits))}


@register
class UniformKind(StorageKind):
    """Group-wise (code − zero)·scale, fp16 scale and (asymmetric) zero per group of `group_size` inputs."""

    name = "uniform"
    PARAMS = ("group_size", "sym")

    def params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        gs = raw.get("group_size")
        return {"group_size": int(gs) if gs is not None else None, "sym": bool(raw.get("sym", False))}

    def check(self, layout: LayerLayout) -> None:
        gs = layout.params["group_size"]
        if not gs or gs < 1 or layout.in_features % gs:
            raise CheckpointError(f"group size {gs} does not divide the input width {layout.in_features}")

    def tables(self, layout: LayerLayout) -> dict[str, TensorSpec]:
        groups = (layout.out_features, layout.in_features // layout.params["group_size"])
        specs = {SCALE: TensorSpec(torch.float16, groups)}
        if not layout.params["sym"]:
            specs[ZERO] = TensorSpec(torch.float16, groups)
        return specs

    def runner(self, module: QuantLinear, lib: object) -> Runner | None:
        if lib is None:
            return None
        f32 = module.float_tables()
        if module.layout.params["group_size"] == module.in_features:
            # One group per row: (code − zero)·scale is a per-row table of 2^bits values; these are the same
            # fp32 values (same two roundings), and the LUT kernel is the faster one.
            zero = f32.pop(ZERO) if ZERO in f32 else torch.full_like(f32[SCALE], 2.0 ** (module.layout.bits - 1))
            codes = torch.arange(2**module.layout.bits, dtype=torch.float32)
            f32[LUT] = ((codes - zero) * f32.pop(SCALE)).contiguous()
        return _CodesRunner(module, lib, f32)


class _AWQRunner(Runner):
    """ŵ = uniform / s: the uniform kernel on x / s (a sparse value v at column c becomes v·s_c); prefill
    decodes the uniform part, divides by s and adds the residual, bit-exactly as the reference decoder does."""

    def __init__(self, module: QuantLinear, lib: object) -> None:
        f32 = module.float_tables()
        self.lib = lib
        self.in_scale = getattr(module, IN_SCALE).float().contiguous()
        self.sparse = module.sparse_f32()
        self.dense_desc, keep_dense = _describe(module, dict(f32), full=False)
        if VALUE in f32:
            f32[VALUE] = (f32[VALUE] * self.in_scale[getattr(module, COL).long()]).contiguous()
        self.desc, keep = _describe(module, f32)
        self.keep = keep + keep_dense
        self.gemm = lambda x: kernels.gemm(lib, self.desc, (x / self.in_scale).contiguous())

    def weight(self) -> torch.Tensor:
        w = kernels.dequantize(self.lib, self.dense_desc) / self.in_scale
        if self.sparse is not None:
            w.view(-1).index_add_(0, *self.sparse)
        return w


@register
class AWQKind(UniformKind):
    """Uniform codes of W·diag(s) plus the per-input-channel scale s: ŵ = uniform / s."""

    name = "awq"

    def tables(self, layout: LayerLayout) -> dict[str, TensorSpec]:
        return {**super().tables(layout), IN_SCALE: TensorSpec(torch.float16, (layout.in_features,))}

    def runner(self, module: QuantLinear, lib: object) -> Runner | None:
        return None if lib is None else _AWQRunner(module, lib)


class _DecodedRunner(Runner):
    """No kernel: Ŵ decoded once by the reference decoder and kept in fp32 (see format.qlinear)."""

    def __init__(self, module: QuantLinear) -> None:
        self.w = module.dequantize().contiguous()

    def weight(self) -> torch.Tensor:
        return self.w


@register
class TrellisKind(StorageKind):
    """QTIP: K-bit trellis stream pieces as codes, bit-packed RHT signs of inputs and outputs, one fp16 scale."""

    name = "trellis"
    PARAMS = ("L", "V", "code", "tile", "tail_biting")

    def params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        if raw.get("tail_biting", True) is not True:
            raise CheckpointError("only tail-biting trellis streams have a stored layout")
        if any(raw.get(k) is None for k in ("L", "V", "code", "tile")):
            raise CheckpointError("a trellis layer needs L, V, code and tile")
        tile = raw["tile"]
        return {
            "L": int(raw["L"]),
            "V": int(raw["V"]),
            "code": str(raw["code"]),
            "tile": [int(tile[0]), int(tile[1])],
            "tail_biting": True,
        }

    def check(self, layout: LayerLayout) -> None:
        p = layout.params
        try:
            Trellis(p["L"], layout.bits, p["V"], p["code"])
        except ValueError as e:
            raise CheckpointError(f"bad trellis (L={p['L']}, K={layout.bits}, V={p['V']}, {p['code']}): {e}") from None
        tx, ty = p["tile"]
        if tx < 1 or ty < 1 or layout.out_features % tx or layout.in_features % ty or (tx * ty) % p["V"]:
            raise CheckpointError(
                f"trellis tile {tx}x{ty} does not divide the shape ({layout.out_features}, {layout.in_features}) "
                f"into streams of a multiple of V={p['V']} weights"
            )
        if tx * ty * layout.bits < p["L"]:
            raise CheckpointError(f"trellis tile {tx}x{ty} holds fewer than L={p['L']} bits at {layout.bits} bits")

    def tables(self, layout: LayerLayout) -> dict[str, TensorSpec]:
        return {
            SIGN_IN: TensorSpec(torch.uint8, (-(-layout.in_features // 8),)),
            SIGN_OUT: TensorSpec(torch.uint8, (-(-layout.out_features // 8),)),
            SCALE: TensorSpec(torch.float16, (1,)),
        }

    def runner(self, module: QuantLinear, lib: object) -> Runner | None:
        return _DecodedRunner(module)  # needs no compiled kernel
