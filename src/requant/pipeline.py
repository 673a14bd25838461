"""Quantization orchestration: calibration → sensitivity → sparse selection → base fit → model update.

The algorithms are pure functions elsewhere; this module walks the model, times stages and reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import accounting
from .config import QuantConfig
from .data import text_windows
from .errors import NumericalError
from .model import LayerInfo, get_linear, parse_dtype, quantizable_layers
from .progress import bar
from .quantizers import BaseQuantizer, QuantizedTensor, make_quantizer
from .sensitivity import fisher_information
from .sparse import SparseResidual, iqr_outlier_masks, topk_masks_per_module


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


def compute_fisher(
    model: nn.Module, tokenizer: object, config: QuantConfig, names: list[str]
) -> dict[str, torch.Tensor]:
    """Fisher Σg² over the config's calibration windows, with the model temporarily in the gradient dtype."""
    windows = text_windows(tokenizer, config.calib, config.seqlen, nsamples=config.nsamples, seed=config.seed)
    orig_dtype = next(model.parameters()).dtype
    model.to(parse_dtype(config.grad_dtype))
    try:
        return {n: f.cpu() for n, f in fisher_information(model, names, windows).items()}
    finally:
        model.to(orig_dtype)


def check_finite_weights(model: nn.Module, layers: list[LayerInfo]) -> None:
    for info in layers:
        if not torch.isfinite(get_linear(model, info.name).weight).all():
            raise NumericalError(f"weights of layer {info.name} contain NaN or Inf")


def apply_to_model(model: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    """Write each layer's reconstruction ŵ into the model's weights (in the model's dtype)."""
    with torch.no_grad():
        for name, q in layers.items():
            lin = get_linear(model, name)
            lin.weight.copy_(q.weight().to(lin.weight.dtype))


def select_sparse(
    config: QuantConfig, weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """SqueezeLLM's D&S selection: sensitive values (Fisher top-k per module) first, then IQR outliers."""
    masks = {n: torch.zeros(w.shape, dtype=torch.bool) for n, w in weights.items()}
    info: dict[str, Any] = {}
    if config.significant > 0:
        assert fisher is not None
        sens = topk_masks_per_module(fisher, config.significant)
        masks = {n: masks[n] | sens[n] for n in masks}
        info["significant_entries"] = int(sum(m.sum() for m in sens.values()))
    if config.outliers > 0:
        out, r = iqr_outlier_masks(weights, config.outliers, skip=masks)
        masks = {n: masks[n] | out[n] for n in masks}
        info["outlier_entries"] = int(sum(m.sum() for m in out.values()))
        info["iqr_range_factor"] = r
    total = sum(w.numel() for w in weights.values())
    info["sparse_percent"] = 100.0 * float(sum(m.sum() for m in masks.values())) / total
    return masks, info


def fit_layers(
    quantizer: BaseQuantizer,
    weights: dict[str, torch.Tensor],
    infos: dict[str, LayerInfo],
    *,
    importance: dict[str, torch.Tensor] | None = None,
    exclude: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedLayer]:
    """Fit the base quantizer on every layer with its mask left out, and keep the masked entries sparse."""
    out = {}
    for name in bar(weights, desc=f"quantize {quantizer.name}", unit="layer"):
        w = weights[name]
        mask = exclude.get(name) if exclude else None
        dense = quantizer.fit(w, importance=importance.get(name) if importance else None, exclude=mask)
        sparse = (
            SparseResidual.restore(w, dense.dequantize(), mask)
            if mask is not None and mask.any()
            else SparseResidual.empty(tuple(w.shape))
        )
        out[name] = QuantizedLayer(infos[name], dense, sparse)
    return out


def quantize(
    model: nn.Module,
    tokenizer: object,
    config: QuantConfig,
    *,
    fisher: dict[str, torch.Tensor] | None = None,
) -> QuantizationResult:
    """Quantize the model's selected linear layers in place and return the per-layer results.

    `fisher` may carry a precomputed Fisher (same calibration settings) to share between runs.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    layers = quantizable_layers(model, config.include, config.exclude)
    quantizer = make_quantizer(config.base, config.bits, config.group_size, **config.base_options)
    for info in layers:
        quantizer.check_shape(info.name, (info.out_features, info.in_features))
    check_finite_weights(model, layers)
    infos = {i.name: i for i in layers}
    weights = {i.name: get_linear(model, i.name).weight.detach().float().cpu().clone() for i in layers}

    if config.needs_fisher and fisher is None:
        t = time.perf_counter()
        fisher = compute_fisher(model, tokenizer, config, list(infos))
        timings["fisher_s"] = time.perf_counter() - t

    t = time.perf_counter()
    masks, sparse_info = select_sparse(config, weights, fisher)
    timings["select_s"] = time.perf_counter() - t

    t = time.perf_counter()
    importance = fisher if quantizer.uses_importance else None
    result_layers = fit_layers(quantizer, weights, infos, importance=importance, exclude=masks)
    timings["fit_s"] = time.perf_counter() - t

    apply_to_model(model, result_layers)
    result = QuantizationResult(config, result_layers)
    bits = result.bit_count()
    timings["total_s"] = time.perf_counter() - t0
    result.report = {
        "timings": timings,
        "bits": bits.to_dict(),
        "sparse": sparse_info,
        "layers": len(result_layers),
        "quantizer": quantizer.describe(),
    }
    return result
