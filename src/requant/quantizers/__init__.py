"""Base quantization methods behind one interface, and the registry the CLI and pipeline use."""

from __future__ import annotations

import inspect

from ..errors import ConfigError
from .awq import AWQQuantizer, ScaledUniformTensor
from .base import ALLOWED_BITS, BaseQuantizer, LayerInputs, LUTTensor, QuantizedTensor, UniformTensor
from .gptq import GPTQQuantizer
from .qtip import QTIPQuantizer, TrellisTensor
from .rtn import RTNQuantizer
from .squeezellm import SqueezeLLMQuantizer

QUANTIZERS: dict[str, type[BaseQuantizer]] = {
    "rtn": RTNQuantizer,
    "squeezellm": SqueezeLLMQuantizer,
    "qtip": QTIPQuantizer,
    "awq": AWQQuantizer,
    "gptq": GPTQQuantizer,
}


def make_quantizer(name: str, bits: int, group_size: int | None = None, **options: object) -> BaseQuantizer:
    """Construct a registered base quantizer by name."""
    cls = QUANTIZERS.get(name)
    if cls is None:
        raise ConfigError(f"base method {name!r} is not available; use one of {', '.join(QUANTIZERS)}")
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "bits", "group_size")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{name} has no option {', '.join(map(repr, unknown))}; its options are {', '.join(allowed) or 'none'}"
        )
    return cls(bits, group_size, **options)  # type: ignore[arg-type]


__all__ = [
    "ALLOWED_BITS",
    "QUANTIZERS",
    "AWQQuantizer",
    "BaseQuantizer",
    "GPTQQuantizer",
    "LUTTensor",
    "LayerInputs",
    "QTIPQuantizer",
    "QuantizedTensor",
    "RTNQuantizer",
    "ScaledUniformTensor",
    "SqueezeLLMQuantizer",
    "TrellisTensor",
    "UniformTensor",
    "make_quantizer",
]
