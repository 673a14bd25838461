"""The base-quantizer interface and the dense quantized-tensor types it returns.

A base quantizer fits one weight matrix: `fit(weight, importance=, exclude=, inputs=)` -> QuantizedTensor.
`exclude` marks entries left out of the fit (they will be stored sparse); `importance` is an element-wise
sensitivity of the same shape (Fisher for SqueezeLLM); `inputs` carries the layer's calibration
statistics for methods that need them. ReQuant sees base methods only through this interface.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..accounting import BitCount, count_bits
from ..errors import CheckpointError, ConfigError

ALLOWED_BITS = (2, 3, 4, 8)


TENSOR_KINDS: dict[str, type[QuantizedTensor]] = {}  # kind → class, filled by QuantizedTensor.__init_subclass__


class QuantizedTensor(ABC):
    """Dense part of a quantized weight: integer codes (out, in) plus the tables that decode them.

    Subclasses declare their stored tensors in TABLES; serialization and accounting derive from that.
    """

    kind: ClassVar[str]
    TABLES: ClassVar[tuple[str, ...]]

    codes: torch.Tensor
    bits: int

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The reconstructed weight in fp32."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def tables(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.TABLES if getattr(self, n) is not None}

    def params(self) -> dict[str, Any]:
        """JSON-able non-tensor settings needed to decode (besides kind and bits)."""
        return {}

    def bit_count(self, sparse_entries: int = 0) -> BitCount:
        return count_bits(self.codes.numel(), self.bits, self.tables().values(), sparse_entries)

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON metadata, tensors) describing this quantized tensor completely."""
        return {"kind": self.kind, "bits": self.bits, **self.params()}, {"codes": self.codes, **self.tables()}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every concrete kind registers itself where it is defined; from_state imports all of them first, so
        # what is known never depends on which modules a caller happened to import.
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if isinstance(kind, str):
            if kind in TENSOR_KINDS and TENSOR_KINDS[kind] is not cls:
                raise TypeError(f"quantized tensor kind {kind!r} is defined twice")
            TENSOR_KINDS[kind] = cls

    @staticmethod
    def from_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        import requant.quantizers  # noqa: F401 - defines (and so registers) every kind

        cls = TENSOR_KINDS.get(meta.get("kind", ""))
        if cls is None:
            raise CheckpointError(f"unknown quantized tensor kind {meta.get('kind')!r}")
        return cls._from_state(meta, tensors)

    @classmethod
    @abstractmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantizedTensor: ...


@dataclass
class LUTTensor(QuantizedTensor):
    """Non-uniform codes: each output row has its own look-up table of 2^bits fp16 values (SqueezeLLM)."""

    codes: torch.Tensor  # uint8 (out, in)
    lut: torch.Tensor  # fp16 (out, 2^bits)
    bits: int
    kind: ClassVar[str] = "lut"
    TABLES: ClassVar[tuple[str, ...]] = ("lut",)

    def dequantize(self) -> torch.Tensor:
        return torch.gather(self.lut.float(), 1, self.codes.long())

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LUTTensor:
        return cls(codes=tensors["codes"], lut=tensors["lut"], bits=int(meta["bits"]))


@dataclass
class UniformTensor(QuantizedTensor):
    """Uniform integer codes with an fp16 scale (and fp16 zero point if asymmetric) per group of inputs.

    Value = (code − zero) · scale; symmetric grids use the implicit zero 2^(bits−1) and store no zero.
    """

    codes: torch.Tensor  # uint8 (out, in)
    scale: torch.Tensor  # fp16 (out, in // group_size)
    zero: torch.Tensor | None  # fp16 (out, in // group_size) holding integers, or None when symmetric
    bits: int
    group_size: int
    kind: ClassVar[str] = "uniform"
    TABLES: ClassVar[tuple[str, ...]] = ("scale", "zero")

    def params(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "sym": self.zero is None}

    def dequantize(self) -> torch.Tensor:
        out, inp = self.codes.shape
        g = self.group_size
        codes = self.codes.float().view(out, inp // g, g)
        zero = self.zero.float()[..., None] if self.zero is not None else float(2 ** (self.bits - 1))
        return ((codes - zero) * self.scale.float()[..., None]).view(out, inp)

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> UniformTensor:
        return cls(
            codes=tensors["codes"],
            scale=tensors["scale"],
            zero=tensors.get("zero"),
            bits=int(meta["bits"]),
            group_size=int(meta["group_size"]),
        )


@dataclass
class LayerInputs:
    """Calibration statistics of one layer's inputs, for methods that need them (AWQ, GPTQ)."""

    hessian: torch.Tensor | None = None  # Σ x xᵀ over calibration tokens, fp32 (in, in)
    samples: torch.Tensor | None = None  # a subsample of input rows (tokens, in)
    tokens: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class BaseQuantizer(ABC):
    """One base method. Subclasses set `name` and implement `fit`."""

    name: ClassVar[str]
    supports_exclude: ClassVar[bool] = True
    uses_importance: ClassVar[bool] = False
    uses_inputs: ClassVar[bool] = False
    # True when every output row is fit on its own, so refitting a subset of rows gives those rows' result.
    row_independent: ClassVar[bool] = False
    # True when layers should be fitted block by block on the inputs the already-quantized blocks give them
    # (GPTQ's order, requant.calibration.sequential_fit); otherwise inputs come from the fp model in one pass.
    sequential: ClassVar[bool] = False

    def __init__(self, bits: int, group_size: int | None = None) -> None:
        if bits not in ALLOWED_BITS:
            raise ConfigError(f"bits {bits} is not supported; use one of {', '.join(map(str, ALLOWED_BITS))}")
        if group_size is not None and group_size < 1:
            raise ConfigError(f"group size {group_size} must be a positive integer")
        self.bits = bits
        self.group_size = group_size

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        """Refuse a layer this quantizer cannot handle, naming it."""
        if self.group_size is not None and shape[1] % self.group_size:
            raise ConfigError(
                f"group size {self.group_size} does not divide the input width {shape[1]} of layer {name}"
            )

    @abstractmethod
    def fit(
        self,
        weight: torch.Tensor,
        *,
        importance: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> QuantizedTensor:
        """Quantize `weight` (out, in); entries where `exclude` is True are left out of the fit."""

    def objective(
        self, weight: torch.Tensor, recon: torch.Tensor, keep: torch.Tensor, inputs: LayerInputs | None
    ) -> torch.Tensor | None:
        """The error this method minimises, per output row (fp64), on the kept entries (the rest are restored
        exactly); None means Algorithm 1's default, the importance-weighted squared error."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"base": self.name, "bits": self.bits, "group_size": self.group_size}


def output_error_rows(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Layer output error per output row, Σ_tokens (δ_r·x)² = δ_r H δ_rᵀ (fp64), for ΔW (out, in), H = Σ x xᵀ."""
    d = delta.to(hessian.dtype)
    return ((d @ hessian) * d).sum(1, dtype=torch.float64)


def quantizer_of(quantizer: BaseQuantizer | Mapping[str, BaseQuantizer], name: str) -> BaseQuantizer:
    """The quantizer of layer `name`: the one given, or its entry in a per-layer mapping."""
    return quantizer if isinstance(quantizer, BaseQuantizer) else quantizer[name]


def layer_hessian(method: str, weight: torch.Tensor, inputs: LayerInputs | None) -> torch.Tensor:
    """The layer's Σ x xᵀ, refusing a missing or mis-sized one and warning when it is rank-deficient."""
    n = weight.shape[1]
    if inputs is None or inputs.hessian is None:
        raise ConfigError(f"{method} needs the layer's calibration inputs (a LayerInputs with its Hessian)")
    h = inputs.hessian
    if tuple(h.shape) != (n, n):
        raise ConfigError(f"{method}: the input Hessian is {tuple(h.shape)} but the layer has {n} inputs")
    if 0 < inputs.tokens < n:
        warnings.warn(
            f"{method}: {inputs.tokens} calibration tokens cannot give a full-rank Hessian for {n} inputs; "
            "it is dampened, but use more calibration windows (--nsamples) for a reliable fit",
            stacklevel=3,
        )
    return h
