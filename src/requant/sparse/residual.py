"""The sparse part of a Dense-and-Sparse weight: fp16 residuals at flat indices, ŵ = D + S."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseResidual:
    """Residual values (fp16) at sorted flat indices (int64 in memory, 32-bit in the bit accounting)."""

    index: torch.Tensor  # int64 (nnz,), sorted, flat positions in the (out, in) weight
    value: torch.Tensor  # fp16 (nnz,)
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.index.numel())

    @staticmethod
    def empty(shape: tuple[int, int]) -> SparseResidual:
        return SparseResidual(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float16), shape)

    @staticmethod
    def restore(weight: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> SparseResidual:
        """Residuals that bring the dense reconstruction back to the original weight where `mask` is set."""
        index = mask.flatten().nonzero().squeeze(1)
        value = (weight.float().flatten()[index] - dense.float().flatten()[index]).half()
        return SparseResidual(index, value, tuple(weight.shape))  # type: ignore[arg-type]

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool)
        m[self.index] = True
        return m.view(self.shape)

    def add_to(self, dense: torch.Tensor) -> torch.Tensor:
        """dense + S as a new fp32 tensor."""
        out = dense.float().clone().flatten()
        out.index_add_(0, self.index, self.value.float())
        return out.view(self.shape)

    def merge(self, other: SparseResidual) -> SparseResidual:
        """Union of two residuals on disjoint positions (sorted by index)."""
        index = torch.cat([self.index, other.index])
        value = torch.cat([self.value, other.value])
        order = torch.argsort(index)
        if index.numel() and (index[order][1:] == index[order][:-1]).any():
            raise ValueError("sparse residuals overlap")
        return SparseResidual(index[order], value[order], self.shape)
