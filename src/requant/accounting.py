"""Bit accounting, in one place: dense codes + code tables (LUT / scales / zeros) + 48 bits per sparse entry.

docs/method.md, bit accounting: every sparse entry costs an fp16 value and a 32-bit index; code tables cost their stored
dtype's width. Bits per weight are over the quantized layers only; embeddings and lm_head stay 16-bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

SPARSE_VALUE_BITS = 16
SPARSE_INDEX_BITS = 32
SPARSE_ENTRY_BITS = SPARSE_VALUE_BITS + SPARSE_INDEX_BITS


def tensor_bits(t: torch.Tensor) -> int:
    """Bits a tensor takes when stored at its own dtype."""
    return t.numel() * t.element_size() * 8


@dataclass(frozen=True)
class BitCount:
    """Bits of one or more quantized layers, split by what they store."""

    numel: int
    code_bits: int
    table_bits: int
    sparse_entries: int

    @property
    def sparse_bits(self) -> int:
        return self.sparse_entries * SPARSE_ENTRY_BITS

    @property
    def total_bits(self) -> int:
        return self.code_bits + self.table_bits + self.sparse_bits

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.numel

    @property
    def sparse_percent(self) -> float:
        return 100.0 * self.sparse_entries / self.numel

    def __add__(self, other: BitCount) -> BitCount:
        return BitCount(
            self.numel + other.numel,
            self.code_bits + other.code_bits,
            self.table_bits + other.table_bits,
            self.sparse_entries + other.sparse_entries,
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "numel": self.numel,
            "code_bits": self.code_bits,
            "table_bits": self.table_bits,
            "sparse_entries": self.sparse_entries,
            "sparse_bits": self.sparse_bits,
            "total_bits": self.total_bits,
            "bits_per_weight": self.bits_per_weight,
        }


def count_bits(numel: int, bits: int, tables: Iterable[torch.Tensor], sparse_entries: int) -> BitCount:
    """BitCount of a layer with `numel` codes of `bits` each, its code tables and its sparse entries."""
    return BitCount(numel, numel * bits, sum(tensor_bits(t) for t in tables), sparse_entries)


def total(counts: Iterable[BitCount]) -> BitCount:
    out = BitCount(0, 0, 0, 0)
    for c in counts:
        out = out + c
    return out


def memory_gib(quantized: BitCount, other_params: int, other_bits: int = 16) -> float:
    """Model memory in GiB: quantized layers at their bits plus the other parameters at `other_bits`."""
    return (quantized.total_bits + other_params * other_bits) / 8 / 2**30
