"""Sparse parts of Dense-and-Sparse weights: residual storage and the selection algorithms."""

from .outliers import iqr_outlier_masks, topk_masks_per_module
from .residual import SparseResidual

__all__ = ["SparseResidual", "iqr_outlier_masks", "topk_masks_per_module"]
