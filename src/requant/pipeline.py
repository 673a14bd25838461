"""ReQuant orchestration (docs/method.md, the paper's Figure 1) over any base quantizer, with resumable stages.

  1. pre-quantize with the base method and its own sensitivity (Fisher for SqueezeLLM)
  2. Algorithm 1: per-layer outlier ratios under the global budget   (--outlier-select adaptive)
  3. select the outliers                                              (or SqueezeLLM's IQR rule, or random)
  4. re-quantize the rest with the outliers left out of the fit
  5. Algorithm 2: step-wise significant-weight detach by PQI          (or Fisher top-k first, or random)
  6. ŵ = dense + sparse outliers + sparse significant weights

The algorithms are pure functions in quantizers/, sparse/ and sensitivity/; this module walks the model,
stores each finished stage in the work directory, times stages and reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from . import distributed
from .calibration import layer_inputs, sequential_fit
from .config import EQUAL_BITS, QuantConfig
from .data import text_windows
from .errors import ConfigError, NumericalError
from .loading import parse_dtype
from .model import LayerInfo, get_linear, quantizable_layers
from .offload import is_offloaded, spill
from .progress import bar
from .quantizers import BaseQuantizer, LayerInputs, QuantizedTensor, make_quantizer
from .recipes import equal_bits_group_size
from .results import QuantizationResult, QuantizedLayer
from .sensitivity import fisher_information, post_quantization_integral
from .sparse import SparseResidual, iqr_outlier_masks, topk_masks_per_module
from .sparse.adaptive import allocate_outliers, outlier_masks
from .sparse.detach import select_top, step_counts, stepwise_detach
from .sparse.outliers import budget
from .workdir import WorkDir

Masks = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# Model edges


def check_finite_weights(model: nn.Module, layers: list[LayerInfo]) -> None:
    for info in layers:
        if not torch.isfinite(get_linear(model, info.name).weight).all():
            raise NumericalError(f"weights of layer {info.name} contain NaN or Inf")


def apply_to_model(model: nn.Module, layers: Mapping[str, QuantizedLayer]) -> None:
    """Write each layer's reconstruction ŵ into the model's weights (in the model's dtype)."""
    set_weights(model, {name: q.weight() for name, q in layers.items()})


def set_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            lin = get_linear(model, name)
            lin.weight.copy_(w.to(lin.weight.dtype))


class _GradDtype:
    """Run a block with the model in the gradient dtype (fp32 or bf16), restoring its dtype *and values* after.

    A cast to bf16 and back would leave every tensor rounded to bf16 (embeddings, norms, the fp32 master
    weights read later), so what the cast changes is kept: the linear weights in `masters` (module name ->
    fp32 weight) are written back from there, every other parameter and buffer from a copy taken on entry.
    """

    def __init__(self, model: nn.Module, dtype: str, masters: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model, self.dtype, self.masters = model, parse_dtype(dtype), masters or {}
        self.orig = next(model.parameters()).dtype
        self.saved: dict[str, torch.Tensor] = {}
        if self.dtype != self.orig and is_offloaded(model):
            raise ConfigError(
                f"--grad-dtype {dtype} is not supported with --offload (the weights are memory-mapped "
                f"{str(self.orig).removeprefix('torch.')} files); use --grad-dtype fp32"
            )

    def __enter__(self) -> None:
        if self.dtype == self.orig:
            return
        own = {f"{n}.weight" for n in self.masters}
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        self.saved = {k: t.detach().clone() for k, t in tensors.items() if t.is_floating_point() and k not in own}
        self.model.to(self.dtype)

    def __exit__(self, *exc: object) -> None:
        if self.dtype == self.orig:
            return
        self.model.to(self.orig)
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for k, t in self.saved.items():
                tensors[k].copy_(t)
        set_weights(self.model, self.masters)
        self.saved = {}


def compute_fisher(
    model: nn.Module,
    tokenizer: object,
    config: QuantConfig,
    names: list[str],
    masters: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Fisher Σg² over the config's calibration windows, with the model temporarily in the gradient dtype
    (`masters`: fp32 copies of linear weights to restore from, instead of copying them first)."""
    windows = text_windows(tokenizer, config.calib, config.seqlen, nsamples=config.nsamples, seed=config.seed)
    with _GradDtype(model, config.grad_dtype, masters):
        return {n: f.cpu() for n, f in fisher_information(model, names, windows).items()}


# ----------------------------------------------------------------------------------------------------------
# Pure steps


def fit_dense(
    quantizer: BaseQuantizer,
    weights: Mapping[str, torch.Tensor],
    *,
    importance: Mapping[str, torch.Tensor] | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
    inputs: Mapping[str, LayerInputs] | None = None,
    desc: str = "quantize",
) -> dict[str, QuantizedTensor]:
    """Fit the base quantizer on every layer, each with its excluded entries left out of the fit."""
    return {
        n: quantizer.fit(
            weights[n],
            importance=importance.get(n) if importance else None,
            exclude=exclude.get(n) if exclude else None,
            inputs=inputs.get(n) if inputs else None,
        )
        for n in bar(list(weights), desc=f"{desc} {quantizer.name}", unit="layer")
    }


def fit_sequential(
    model: nn.Module,
    quantizer: BaseQuantizer,
    weights: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    *,
    importance: Mapping[str, torch.Tensor] | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedTensor]:
    """Fit every layer block by block on the inputs the already-quantized blocks give it (GPTQ's order);
    a fitted block passes its windows on with ŵ = dense + its excluded entries restored."""
    dense: dict[str, QuantizedTensor] = {}

    def fit(name: str, inputs: LayerInputs) -> torch.Tensor:
        ex = exclude.get(name) if exclude else None
        q = quantizer.fit(
            weights[name], importance=importance.get(name) if importance else None, exclude=ex, inputs=inputs
        )
        dense[name] = q
        d = q.dequantize()
        return SparseResidual.restore(weights[name], d, ex).add_to(d) if ex is not None and ex.any() else d

    sequential_fit(model, list(weights), windows, fit, desc=f"quantize {quantizer.name} (sequential)")
    return {n: dense[n] for n in weights}


def random_masks(weights: Mapping[str, torch.Tensor], count: int, skip: Mapping[str, torch.Tensor], seed: int) -> Masks:
    """`count` entries drawn uniformly at random over all layers, outside `skip` (the ablation baseline)."""
    gen = torch.Generator().manual_seed(seed)
    keys = {n: torch.rand(w.shape, generator=gen) for n, w in weights.items()}
    return select_top(keys, count, skip, scope="global")


def _union(*masks: Mapping[str, torch.Tensor] | None) -> Masks:
    present = [m for m in masks if m]
    names = list(present[0]) if present else []
    out = {}
    for n in names:
        acc = present[0][n].clone()
        for m in present[1:]:
            acc |= m[n]
        out[n] = acc
    return out


def _count(masks: Mapping[str, torch.Tensor] | None) -> int:
    return int(sum(int(m.sum()) for m in masks.values())) if masks else 0


# ----------------------------------------------------------------------------------------------------------
# Stage storage


def _masks_state(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{n}.index": m.flatten().nonzero().squeeze(1) for n, m in masks.items()}


def _masks_from_state(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]) -> Masks:
    out = {}
    for n, shape in shapes.items():
        m = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
        m[tensors[f"{n}.index"]] = True
        out[n] = m.view(shape)
    return out


def _dense_state(dense: Mapping[str, QuantizedTensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {}
    for n, q in dense.items():
        m, ts = q.to_state()
        meta[n] = m
        tensors.update({f"{n}.{k}": t for k, t in ts.items()})
    return tensors, meta


def _dense_from_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, QuantizedTensor]:
    out = {}
    for n, m in meta.items():
        own = {k[len(n) + 1 :]: v for k, v in tensors.items() if k.startswith(n + ".")}
        out[n] = QuantizedTensor.from_state(m, own)
    return out


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def quantize(
    model: nn.Module,
    tokenizer: object,
    config: QuantConfig,
    *,
    fisher: Mapping[str, torch.Tensor] | None = None,
    workdir: str | os.PathLike | None = None,
    resume: bool = False,
) -> QuantizationResult:
    """Quantize the model's selected linear layers in place (ReQuant or the D&S baseline, per `config`).

    `fisher` may carry a precomputed Fisher for the same calibration settings. With `workdir`, each
    finished stage is stored there and `resume=True` continues an interrupted run bit-identically.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    report: dict[str, Any] = {}
    layers = quantizable_layers(model, config.include, config.exclude)
    group_size = config.group_size
    if group_size == EQUAL_BITS:  # the recipe's choice, from the layers' widths
        group_size = equal_bits_group_size((i.in_features for i in layers), config.outliers)
    quantizer = make_quantizer(config.base, config.bits, group_size, **config.quantizer_options())  # type: ignore[arg-type]
    for info in layers:
        quantizer.check_shape(info.name, (info.out_features, info.in_features))
    check_finite_weights(model, layers)
    infos = {i.name: i for i in layers}
    names = list(infos)
    shapes = {i.name: (i.out_features, i.in_features) for i in layers}
    # The fp32 master copy; memory-mapped when the model is offloaded (requant.offload), one layer at a time.
    if is_offloaded(model):
        weights = spill(model, "weights", ((n, get_linear(model, n).weight.detach().float().cpu()) for n in names))
    else:
        weights = {n: get_linear(model, n).weight.detach().float().cpu().clone() for n in names}
    total = sum(w.numel() for w in weights.values())
    # The fingerprint ties stored stages to these exact weights: resuming on another model is refused.
    checksum = f"{sum(float(w.double().abs().sum()) for w in weights.values()):.17g}"
    work = WorkDir(workdir, config, resume=resume, fingerprint={"layers": names, "weights": checksum})

    def timed(key: str, start: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start

    # Sensitivity of the base method (SqueezeLLM: Fisher Σg²).
    if config.needs_fisher and fisher is None:
        t = time.perf_counter()
        if work.has("fisher"):
            fisher, _ = work.load("fisher")
        else:
            fisher = compute_fisher(model, tokenizer, config, names, weights)
            work.save("fisher", dict(fisher))
        fisher = spill(model, "fisher", fisher.items())
        timed("fisher_s", t)
    importance = fisher if quantizer.uses_importance else None

    # Calibration inputs for methods that use them: windows drawn once; one-pass statistics of the fp model
    # on demand (Algorithm 1, pre-quantization, and the dense fit of non-sequential methods).
    calib_windows: torch.Tensor | None = None
    stats: dict[str, LayerInputs] | None = None

    def calibration() -> torch.Tensor:
        nonlocal calib_windows
        if calib_windows is None:
            calib_windows = text_windows(
                tokenizer, config.calib, config.seqlen, nsamples=config.nsamples, seed=config.seed
            )
        return calib_windows

    def inputs() -> dict[str, LayerInputs] | None:
        nonlocal stats
        if not quantizer.uses_inputs:
            return None
        if stats is None:
            t = time.perf_counter()
            stats = layer_inputs(model, names, calibration())
            timed("calibration_s", t)
        return stats

    pqi_windows: torch.Tensor | None = None

    def pqi(current: Mapping[str, torch.Tensor], what: str) -> Any:
        nonlocal pqi_windows
        if pqi_windows is None:
            pqi_windows = text_windows(
                tokenizer,
                config.calib,
                config.seqlen,
                nsamples=config.pqi_nsamples or config.nsamples,
                seed=config.seed,
            )
        t = time.perf_counter()
        with _GradDtype(model, config.grad_dtype, weights):
            res = post_quantization_integral(
                model, names, weights, current, pqi_windows, nodes=config.pqi_nodes, rule=config.pqi_rule
            )
        timed("pqi_s", t)
        report.setdefault("pqi_passes", []).append(
            {"what": what, "predicted_dF": res.predicted, "grad_evals": res.grad_evals}
        )
        return res

    # SqueezeLLM's sensitive values come first and leave the fit (the D&S baseline).
    sensitive = None
    if config.significant > 0 and config.significant_select == "fisher":
        assert fisher is not None
        sensitive = topk_masks_per_module(fisher, config.significant)
    empty = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
    skip = sensitive or empty

    # Steps 1-3: outliers.
    outliers = None
    t = time.perf_counter()
    if config.outliers > 0:
        if config.outlier_select == "iqr":
            outliers, r = iqr_outlier_masks(weights, config.outliers, skip=skip)
            report["iqr_range_factor"] = r
        elif config.outlier_select == "random":
            outliers = random_masks(weights, budget(config.outliers, total), skip, config.seed)
        else:
            outliers = _adaptive_outliers(
                config,
                {n: i.block for n, i in infos.items()},
                quantizer,
                weights,
                importance,
                skip,
                work,
                pqi,
                report,
                inputs,
            )
    timed("outliers_s", t)

    # Step 4: (re-)quantize with the sparse entries left out of the fit.
    t = time.perf_counter()
    exclude = _union(skip, outliers)
    if work.has("dense"):
        tensors, meta = work.load("dense")
        dense = _dense_from_state(tensors, meta)
    elif quantizer.uses_inputs and quantizer.sequential:
        dense = fit_sequential(model, quantizer, weights, calibration(), importance=importance, exclude=exclude)
        work.save("dense", *_dense_state(dense))
    else:
        dense = fit_dense(quantizer, weights, importance=importance, exclude=exclude, inputs=inputs())
        work.save("dense", *_dense_state(dense))
    timed("dense_fit_s", t)
    fisher = importance = None  # used up (the sensitive values were chosen before the fit): free it for PQI

    # Step 5: significant weights, chosen on the re-quantized model.
    significant = None
    if config.significant > 0 and config.significant_select != "fisher":
        t = time.perf_counter()
        count = budget(config.significant, total)
        if config.significant_select == "random":
            significant = random_masks(weights, count, exclude, config.seed + 1)
        else:
            significant = _detach(config, weights, dense, exclude, count, total, work, pqi, report)
        timed("significant_s", t)

    # Step 6: ŵ = D + outliers + significant, stored as one fp16 residual per layer.
    sparse_all = _union(exclude, significant)
    result_layers = {}
    for n in names:
        d = dense[n]
        m = sparse_all[n]
        sp = SparseResidual.restore(weights[n], d.dequantize(), m) if m.any() else SparseResidual.empty(shapes[n])
        result_layers[n] = QuantizedLayer(infos[n], d, sp)
    apply_to_model(model, result_layers)
    # Ranks decide independently from identical all-reduced sums; a cheap cross-check of the outcome.
    distributed.check_same(
        sum(float(get_linear(model, n).weight.detach().double().sum()) for n in names), "the quantized weights"
    )
    result = QuantizationResult(replace(config, group_size=group_size), result_layers)
    bits = result.bit_count()
    timings["total_s"] = time.perf_counter() - t0
    report.update(
        {
            "timings": timings,
            "bits": bits.to_dict(),
            "sparse": {
                "sensitive_entries": _count(sensitive),
                "outlier_entries": _count(outliers),
                "significant_entries": _count(significant),
                "sparse_percent": bits.sparse_percent,
            },
            "layers": len(result_layers),
            "quantizer": quantizer.describe(),
            "calibration_inputs": (
                ("sequential" if quantizer.sequential else "one pass") if quantizer.uses_inputs else None
            ),
            "resumed_stages": work.resumed,
            "world_size": distributed.world_size(),
        }
    )
    if work.world_size_change is not None:
        # Stored stages are all-reduced totals: valid for any number of processes, equal within fp32 rounding.
        report["resumed_from_world_size"] = work.world_size_change[0]
    result.report = report
    return result


def _adaptive_outliers(
    config: QuantConfig,
    blocks: Mapping[str, int | None],
    quantizer: BaseQuantizer,
    weights: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor] | None,
    skip: Masks,
    work: WorkDir,
    pqi: Any,
    report: dict[str, Any],
    inputs: Callable[[], Mapping[str, LayerInputs] | None],
) -> Masks:
    """Algorithm 1 and the outlier selection it implies (stage `alg1`); `inputs()` gives the layers'
    calibration statistics (of the fp model) to methods that use them."""
    gbar = pre_scores = None
    if config.needs_pqi_pre:
        if work.has("pqi_pre"):
            tensors, _ = work.load("pqi_pre")
            gbar = {n: tensors[f"{n}.gbar"] for n in weights}
            pre_scores = {n: tensors[f"{n}.score"] for n in weights}
        else:
            pre = fit_dense(
                quantizer, weights, importance=importance, exclude=skip, inputs=inputs(), desc="pre-quantize"
            )
            res = pqi({n: q.dequantize() for n, q in pre.items()}, "pre-quantized")
            gbar, pre_scores = res.gbar, res.scores
            work.save(
                "pqi_pre",
                {**{f"{n}.gbar": g for n, g in gbar.items()}, **{f"{n}.score": s for n, s in pre_scores.items()}},
            )
    if work.has("alg1"):
        _, meta = work.load("alg1")
        counts = meta["counts"]
        report["algorithm1"] = meta["report"]
    else:
        groups = blocks if config.alg1_granularity == "block" else None
        alloc = allocate_outliers(
            weights,
            quantizer,
            config.outliers,
            importance=importance,
            skip=skip,
            objective=config.alg1_objective,
            criterion=config.alg1_criterion,
            groups=groups,
            steps=config.alg1_steps,
            max_factor=config.alg1_max_factor,
            allocator=config.alg1_allocator,
            gbar=gbar,
            pre_scores=pre_scores,
            inputs=inputs(),
        )
        counts = alloc.counts
        report["algorithm1"] = alloc.report()
        work.save("alg1", {}, {"counts": counts, "report": alloc.report()})
    return outlier_masks(weights, counts, criterion=config.alg1_criterion, pre_scores=pre_scores, skip=skip)


def _detach(
    config: QuantConfig,
    weights: Mapping[str, torch.Tensor],
    dense: Mapping[str, QuantizedTensor],
    exclude: Masks,
    count: int,
    total: int,
    work: WorkDir,
    pqi: Any,
    report: dict[str, Any],
) -> Masks:
    """Algorithm 2 with a fresh PQI before every step; each step is a stage (`detach`)."""
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    current = {
        n: SparseResidual.restore(weights[n], q.dequantize(), exclude[n]).add_to(q.dequantize())
        for n, q in dense.items()
    }
    step = budget(config.step, total) if config.step is not None else count
    step = max(step, 1)
    start = None
    if work.has("detach"):
        tensors, meta = work.load("detach")
        start = (meta["step"], _masks_from_state(tensors, shapes))
        report.setdefault("pqi_passes", []).extend(meta.get("pqi_passes", []))

    def score(cur: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return pqi(cur, "detach").scores

    def checkpoint(k: int, chosen: Masks, _cur: Masks) -> None:
        work.save("detach", _masks_state(chosen), {"step": k, "pqi_passes": report.get("pqi_passes", [])})

    chosen = stepwise_detach(
        weights,
        current,
        exclude,
        score,
        count,
        step,
        scope=config.detach_scope,
        ranking=config.detach_ranking,
        on_step=checkpoint,
        start=start,
        copy=False,  # `current` was built here for the loop alone
    )
    report["detach_steps"] = step_counts(count, step)
    return chosen
