"""QTIP (arXiv 2406.11235) as a base method: random Hadamard incoherence processing, BlockLDLQ error
feedback and tail-biting trellis-coded quantization on the bitshift trellis, from the papers' mathematics."""

from __future__ import annotations

from .quantizer import QTIPQuantizer, TrellisTensor
from .trellis import Trellis

__all__ = ["QTIPQuantizer", "Trellis", "TrellisTensor"]
