"""SqueezeLLM's dense part: a per-row LUT of 2^bits centroids from Fisher-weighted 1-D k-means."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import BaseQuantizer, LayerInputs, LUTTensor, layer_hessian
from .gptq import gptq_quantize
from .kmeans import kmeans_sample_weights, weighted_kmeans_1d


class SqueezeLLMQuantizer(BaseQuantizer):
    """Non-uniform per-row quantization; importance (Fisher Σg²) weights the k-means objective.

    With `feedback`, the codes are chosen column by column with GPTQ's error feedback on the layer's input
    Hessian (requant.quantizers.gptq) over the same Fisher-weighted tables, instead of each weight's nearest
    entry: the tables stay SqueezeLLM's, the rounding minimises the layer's output error. It then reads the
    calibration inputs, block by block on the already quantized blocks' outputs, like GPTQ."""

    name = "squeezellm"
    row_independent = True  # with feedback too: every row sees the same H and its own table
    uses_importance = True

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        *,
        max_iter: int = 100,
        n_init: int = 3,
        seed: int = 0,
        feedback: bool = False,
        damp: float = 0.01,
    ) -> None:
        if group_size is not None:
            raise ConfigError("squeezellm uses one LUT per output row; --group-size is not allowed with it")
        if not isinstance(feedback, bool):
            raise ConfigError(f"squeezellm feedback={feedback!r} is not allowed; use true or false")
        if not damp >= 0:
            raise ConfigError(f"Hessian damping {damp} must be non-negative")
        super().__init__(bits, None)
        self.max_iter, self.n_init, self.seed, self.feedback, self.damp = max_iter, n_init, seed, feedback, damp
        # Instance flags the pipeline reads: the error feedback needs each layer's inputs, fitted in block order.
        self.uses_inputs = self.sequential = feedback  # type: ignore[misc]

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
        if not self.feedback:
            return LUTTensor(codes=res.codes, lut=res.centroids.half(), bits=self.bits)
        h = layer_hessian(self.name, weight, inputs)
        return gptq_quantize(
            weight, h, self.bits, grid="lut", lut=res.centroids.half(), damp=self.damp, exclude=exclude
        )  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "max_iter": self.max_iter, "n_init": self.n_init, "seed": self.seed}
        return {**d, "feedback": self.feedback, "damp": self.damp} if self.feedback else d
