"""On-disk format of quantized checkpoints (safetensors + JSON, never pickle) and the packed QuantLinear."""

from .checkpoint import convert, is_checkpoint, read_layers, read_quantized, save_checkpoint
from .layout import FORMAT_VERSION, READABLE_VERSIONS, LayerLayout
from .loader import load_checkpoint, load_quantized
from .qlinear import QuantLinear, quant_linears, replace_with_quant_linear, set_kernel_mode

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "LayerLayout",
    "QuantLinear",
    "convert",
    "is_checkpoint",
    "load_checkpoint",
    "load_quantized",
    "quant_linears",
    "read_layers",
    "read_quantized",
    "replace_with_quant_linear",
    "save_checkpoint",
    "set_kernel_mode",
]
