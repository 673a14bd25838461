"""SqueezeLLM's dense part: a per-row LUT of 2^bits centroids from Fisher-weighted 1-D k-means."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import BaseQuantizer, LayerInputs, LUTTensor
from .kmeans import weighted_kmeans_1d


def kmeans_sample_weights(
    importance: torch.Tensor | None, exclude: torch.Tensor | None, shape: tuple[int, int]
) -> torch.Tensor:
    """k-means sample weights: importance with excluded entries at 0; rows with no weight left fall back to
    uniform weights over their kept entries (SqueezeLLM's rule for all-zero Fisher rows)."""
    keep = torch.ones(shape, dtype=torch.float32) if exclude is None else (~exclude).float()
    if importance is None:
        return keep
    w = importance.float().clamp_min(0) * keep
    dead = w.sum(1) == 0
    if dead.any():
        w[dead] = keep[dead]
    return w


class SqueezeLLMQuantizer(BaseQuantizer):
    """Non-uniform per-row quantization; importance (Fisher Σg²) weights the k-means objective."""

    name = "squeezellm"
    row_independent = True
    uses_importance = True

    def __init__(
        self, bits: int, group_size: int | None = None, *, max_iter: int = 100, n_init: int = 3, seed: int = 0
    ) -> None:
        if group_size is not None:
            raise ConfigError("squeezellm uses one LUT per output row; --group-size is not allowed with it")
        super().__init__(bits, None)
        self.max_iter, self.n_init, self.seed = max_iter, n_init, seed

    def fit(
        self,
        weight: torch.Tensor,
        *,
        importance: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> LUTTensor:
        sw = kmeans_sample_weights(importance, exclude, tuple(weight.shape))
        res = weighted_kmeans_1d(
            weight.float(),
            sw,
            2**self.bits,
            max_iter=self.max_iter,
            n_init=self.n_init,
            seed=self.seed,
            round_centroids_to=torch.float16,
        )
        return LUTTensor(codes=res.codes, lut=res.centroids.half(), bits=self.bits)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_iter": self.max_iter, "n_init": self.n_init, "seed": self.seed}
