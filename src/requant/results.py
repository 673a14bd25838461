"""What a quantization run produces, below both the pipeline that makes it and the format that stores it.

A QuantizedLayer is one layer's Dense-and-Sparse result, ŵ = dense + sparse; a QuantizationResult is every
layer's, with the config that made them and the run's report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import accounting
from .config import QuantConfig
from .model import LayerInfo
from .quantizers import QuantizedTensor
from .sparse import SparseResidual


@dataclass
class QuantizedLayer:
    """One layer's Dense-and-Sparse result: ŵ = dense.dequantize() + sparse."""

    info: LayerInfo
    dense: QuantizedTensor
    sparse: SparseResidual

    def weight(self) -> torch.Tensor:
        return self.sparse.add_to(self.dense.dequantize()) if self.sparse.nnz else self.dense.dequantize()

    def bit_count(self) -> accounting.BitCount:
        return self.dense.bit_count(self.sparse.nnz)


@dataclass
class QuantizationResult:
    """Everything a quantization run produced: per-layer results, the config and a report."""

    config: QuantConfig
    layers: dict[str, QuantizedLayer]
    report: dict[str, Any] = field(default_factory=dict)

    def bit_count(self) -> accounting.BitCount:
        return accounting.total(layer.bit_count() for layer in self.layers.values())
