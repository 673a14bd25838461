"""ReQuant orchestration (docs/method.md, the paper's Figure 1) over any base quantizer, with resumable stages.

`quantize` is the method's steps in order, each a function of one `Run` (the model, its fp32 master weights,
the work directory, the typed report, timings and the lazily drawn calibration data):

  base_sensitivity     the base method's own sensitivity (Fisher Σg² for SqueezeLLM)           stage `fisher`
  sensitive_values     SqueezeLLM's top Fisher values, kept sparse first (the D&S baseline)
  select_outliers      Algorithm 1 (pre_quantize + algorithm1), SqueezeLLM's IQR rule or random
                                                                                  stages `pqi_pre`, `alg1`
  dense_fit            re-quantize with the sparse entries left out of the fit                 stage `dense`
  detach_significant   Algorithm 2: step-wise detach by PQI (or random)                        stage `detach`
  dense_fit again      with `detach_refit`: the dense part refitted without the detached entries  stage `refit`
  assemble             ŵ = dense + sparse outliers + sparse significant weights, into the model; the sparse
                       values restore w, or (`sparse_values=fit`) are fitted to the layer inputs

The algorithms are pure functions in quantizers/, sparse/ and sensitivity/; this module walks the model,
stores each finished stage in the work directory (WorkDir.cached), times stages and reports.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import distributed
from .calibration import InputStatistics, expert_token_counts, layer_inputs, sequential_fit
from .config import EQUAL_BITS, QuantConfig
from .data import text_windows, window_bos
from .errors import ConfigError, NumericalError
from .loading import parse_dtype
from .memory import release_free_memory, transient_allocations, tune_allocator
from .model import (
    LayerInfo,
    coverage,
    quantizable_layers,
    unit_parameter_name,
    unit_weight,
    use_eager_experts,
)
from .offload import is_offloaded, spill, spill_zeros
from .progress import bar
from .quantizers import BaseQuantizer, LayerInputs, QuantizedTensor, make_quantizer
from .quantizers.base import quantizer_of
from .recipes import equal_bits_group_size
from .results import QuantizationResult, QuantizedLayer
from .sensitivity import PQIResult, fisher_information, post_quantization_integral
from .sparse import SparseResidual, iqr_outlier_masks, topk_masks_per_module
from .sparse.adaptive import LayerMap, allocate_outliers, outlier_masks
from .sparse.detach import detach_step, select_top, step_counts, stepwise_detach
from .sparse.outliers import budget
from .sparse.values import fit_sparse_values, output_error
from .widths import fisher_error, plan_widths
from .workdir import DENSE, META, TENSORS, WorkDir, decode_masks, encode_masks

Masks = dict[str, torch.Tensor]
Progress = Callable[[list[str]], Iterable[str]]  # wraps a list of layer names, e.g. in a progress bar


# ----------------------------------------------------------------------------------------------------------
# Model edges


def check_finite_weights(model: nn.Module, layers: list[LayerInfo]) -> None:
    for info in layers:
        if not torch.isfinite(unit_weight(model, info.name)).all():
            raise NumericalError(f"weights of layer {info.name} contain NaN or Inf")


def _master(model: nn.Module, name: str) -> torch.Tensor:
    """The unit's weight as a fresh contiguous fp32 CPU (out, in) tensor (never a view of the model's storage)."""
    w = unit_weight(model, name).detach()
    return w.to("cpu", torch.float32, copy=True, memory_format=torch.contiguous_format)


def apply_to_model(model: nn.Module, layers: Mapping[str, QuantizedLayer]) -> None:
    """Write each layer's reconstruction ŵ into the model's weights (in the model's dtype)."""
    set_weights(model, {name: q.weight() for name, q in layers.items()})


def set_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            dst = unit_weight(model, name)  # an (out, in) view of the live parameter
            dst.copy_(w.to(dst.dtype))


class _GradDtype:
    """Run a block with the model in the gradient dtype (fp32 or bf16), restoring its dtype *and values* after.

    A cast to bf16 and back would leave every tensor rounded to bf16 (embeddings, norms, the fp32 master
    weights read later), so what the cast changes is kept: the unit weights in `masters` (unit name ->
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
        own = {unit_parameter_name(self.model, n) for n in self.masters}
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
    windows: torch.Tensor | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Fisher Σg² over the config's calibration windows (drawn here unless given), with the model temporarily
    in the gradient dtype (`masters`: fp32 copies of linear weights to restore from, instead of copying them;
    `into`: the sums' storage, e.g. memory-mapped files)."""
    if windows is None:
        windows = text_windows(
            tokenizer, config.calib, config.seqlen, nsamples=config.nsamples, seed=config.seed, bos=config.bos
        )
    with _GradDtype(model, config.grad_dtype, masters):
        return {n: f.cpu() for n, f in fisher_information(model, names, windows, into=into).items()}


# ----------------------------------------------------------------------------------------------------------
# Pure steps


def fit_dense(
    quantizer: BaseQuantizer | Mapping[str, BaseQuantizer],
    weights: Mapping[str, torch.Tensor],
    *,
    importance: Mapping[str, torch.Tensor] | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
    inputs: Mapping[str, LayerInputs] | None = None,
    progress: Progress = iter,
) -> dict[str, QuantizedTensor]:
    """Fit the base quantizer (or each layer's, from a mapping) on every layer, each with its excluded entries
    left out of the fit."""
    return {
        n: quantizer_of(quantizer, n).fit(
            weights[n],
            importance=importance.get(n) if importance else None,
            exclude=exclude.get(n) if exclude else None,
            inputs=inputs.get(n) if inputs else None,
        )
        for n in progress(list(weights))
    }


def fit_sequential(
    model: nn.Module,
    quantizer: BaseQuantizer | Mapping[str, BaseQuantizer],
    weights: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    *,
    importance: Mapping[str, torch.Tensor] | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
    min_tokens: int = 0,
    fallback: list[str] | None = None,
) -> dict[str, QuantizedTensor]:
    """Fit every layer block by block on the inputs the already-quantized blocks give it (GPTQ's order);
    a fitted block passes its windows on with ŵ = dense + its excluded entries restored. Experts routed fewer
    than `min_tokens` tokens get pooled statistics (their names are appended to `fallback`)."""
    dense: dict[str, QuantizedTensor] = {}
    expert_fallback: set[str] = set()  # filled block by block, before that block's fits

    def fit(name: str, inputs: LayerInputs) -> torch.Tensor:
        if fallback is not None and name in expert_fallback:
            fallback.append(name)
        ex = exclude.get(name) if exclude else None
        q = quantizer_of(quantizer, name).fit(
            weights[name], importance=importance.get(name) if importance else None, exclude=ex, inputs=inputs
        )
        dense[name] = q
        d = q.dequantize()
        return SparseResidual.restore(weights[name], d, ex).add_to(d) if ex is not None and ex.any() else d

    sequential_fit(
        model,
        list(weights),
        windows,
        fit,
        desc=f"quantize {quantizer_of(quantizer, next(iter(weights), '')).name} (sequential)" if weights else "",
        min_tokens=min_tokens,
        on_stats=lambda st: expert_fallback.update(st.fallback),
    )
    return {n: dense[n] for n in weights}


def expert_importance_fallback(
    fisher: Mapping[str, torch.Tensor], tokens: Mapping[str, int], min_tokens: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The Fisher with every expert routed fewer than `min_tokens` tokens given uniform importance: the mean
    Fisher entry of its parameter's other experts (their well-measured ones when there are any), so the
    weighted fit becomes the plain weight-only objective while global rankings keep a comparable scale.
    Returns (the Fisher, the experts that fell back)."""
    out = dict(fisher)
    low = [n for n, t in tokens.items() if t < min_tokens and n in fisher]
    groups: dict[str, list[str]] = {}
    for n in tokens:
        if n in fisher:
            groups.setdefault(n.rpartition(".")[0], []).append(n)
    for n in low:
        sib = groups[n.rpartition(".")[0]]
        good = [m for m in sib if m not in low] or sib
        mean = sum(float(fisher[m].double().sum()) for m in good) / sum(fisher[m].numel() for m in good)
        out[n] = torch.full_like(fisher[n], mean if mean > 0 else 1.0)
    return out, low


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


def _layer_bar(desc: str) -> Progress:
    return functools.partial(bar, desc=desc, unit="layer")


# ----------------------------------------------------------------------------------------------------------
# The state of one run


class Timings:
    """Wall seconds per stage key (`fisher_s`, `pqi_s`, ...), summed over every time the stage runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t


@dataclass
class QuantReport:
    """What a run reports; `to_dict` gives the JSON stored in checkpoints and printed by `--json`."""

    pqi_passes: list[dict[str, Any]] = field(default_factory=list)  # one per PQI integral: what, ΔF, grad evals
    iqr_range_factor: float | None = None  # SqueezeLLM's IQR rule: the range factor that met the budget
    algorithm1: dict[str, Any] | None = None  # OutlierAllocation.report()
    detach_steps: list[int] | None = None  # entries detached by each step of Algorithm 2
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and total_s
    bits: dict[str, Any] = field(default_factory=dict)  # accounting.BitCount.to_dict()
    sparse: dict[str, Any] = field(default_factory=dict)  # entries per sparse kind and sparse_percent
    layers: int = 0
    quantizer: dict[str, Any] = field(default_factory=dict)  # BaseQuantizer.describe()
    calibration_inputs: str | None = None  # "sequential", "one pass" or None (the method reads no inputs)
    resumed_stages: list[str] = field(default_factory=list)
    world_size: int = 1
    resumed_from_world_size: int | None = None  # set when a resume changed the number of processes
    coverage: dict[str, Any] = field(default_factory=dict)  # model.Coverage.to_dict(): share of block weights
    experts: dict[str, Any] | None = None  # MoE: tokens routed to each expert, which fell back and how
    widths: dict[str, Any] | None = None  # --widen-bits: the layers given wider codes and the plan's figures

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.pqi_passes:
            out["pqi_passes"] = self.pqi_passes
        optional = {
            "iqr_range_factor": self.iqr_range_factor,
            "algorithm1": self.algorithm1,
            "detach_steps": self.detach_steps,
            "widths": self.widths,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update(
            {
                "timings": self.timings,
                "bits": self.bits,
                "sparse": self.sparse,
                "layers": self.layers,
                "quantizer": self.quantizer,
                "calibration_inputs": self.calibration_inputs,
                "resumed_stages": self.resumed_stages,
                "world_size": self.world_size,
            }
        )
        if self.resumed_from_world_size is not None:
            out["resumed_from_world_size"] = self.resumed_from_world_size
        if self.coverage:
            out["coverage"] = self.coverage
        if self.experts is not None:
            out["experts"] = self.experts
        return out


class Calibration:
    """The run's calibration data, drawn on first use: windows, the fp model's layer-input statistics (one
    pass, for base methods that read inputs) and the PQI windows (`pqi_nsamples` of them)."""

    def __init__(
        self, model: nn.Module, tokenizer: object, config: QuantConfig, names: list[str], timings: Timings
    ) -> None:
        self.model, self.tokenizer, self.config, self.names, self.timings = model, tokenizer, config, names, timings
        self._windows: torch.Tensor | None = None
        self._stats: dict[str, LayerInputs] | None = None
        self._pqi_windows: torch.Tensor | None = None
        self._tokens: dict[str, int] | None = None
        self.input_fallback: list[str] = []  # experts whose input statistics are their siblings' pooled ones

    def _draw(self, nsamples: int) -> torch.Tensor:
        c = self.config
        return text_windows(self.tokenizer, c.calib, c.seqlen, nsamples=nsamples, seed=c.seed, bos=c.bos)

    def windows(self) -> torch.Tensor:
        """`nsamples` token windows of the calibration text (nsamples × seqlen)."""
        if self._windows is None:
            self._windows = self._draw(self.config.nsamples)
        return self._windows

    def layer_inputs(self) -> dict[str, LayerInputs]:
        """Σ x xᵀ, Σ|x| and token counts of every layer's input, from the model as it was at the first call."""
        if self._stats is None:
            windows = self.windows()
            seen: list[InputStatistics] = []
            with self.timings("calibration_s"):
                self._stats = layer_inputs(
                    self.model, self.names, windows, min_tokens=self.config.expert_min_tokens, stats_out=seen
                )
            if seen[0].experts:
                self._tokens = dict(seen[0].tokens)
                self.input_fallback = list(seen[0].fallback)
        return self._stats

    def used(self) -> bool:
        """Whether any calibration data was drawn (the method read windows at all)."""
        return self._windows is not None

    def expert_tokens(self) -> dict[str, int]:
        """Calibration tokens routed to each expert unit by the full-precision model ({} without experts): from
        the input statistics when they were gathered, else from one forward pass over the windows."""
        if self._tokens is None:
            windows = self.windows()
            with self.timings("calibration_s"):
                self._tokens = expert_token_counts(self.model, self.names, windows)
        return self._tokens

    def pqi_windows(self) -> torch.Tensor:
        """The windows every PQI integral is taken over (`pqi_nsamples`, default `nsamples`)."""
        n = self.config.pqi_nsamples or self.config.nsamples
        if n == self.config.nsamples:
            return self.windows()  # the same draw (same text, seed and count): tokenize the text once
        if self._pqi_windows is None:
            self._pqi_windows = self._draw(n)
        return self._pqi_windows


@dataclass
class Run:
    """One quantization run: what every stage reads and writes."""

    model: nn.Module
    tokenizer: object
    config: QuantConfig  # as given; `group_size` below is the resolved one
    group_size: int | None
    quantizer: BaseQuantizer  # at config.bits; the run's flags (inputs, importance, order) are its
    layers: dict[str, LayerInfo]
    weights: Mapping[str, torch.Tensor]  # fp32 master copy of every layer's weight (memory-mapped when offloaded)
    work: WorkDir
    calibration: Calibration
    timings: Timings
    started: float  # time.perf_counter() at the start
    report: QuantReport = field(default_factory=QuantReport)
    fisher: Mapping[str, torch.Tensor] | None = None  # the base method's sensitivity, until the dense fit
    fallback: dict[str, list[str]] = field(default_factory=dict)  # MoE fallbacks applied: "fisher", "inputs"
    wide: BaseQuantizer | None = None  # --widen-bits: the quantizer at config.bits + 1, for the layers in `widened`
    widened: frozenset[str] = frozenset()
    # The width plan's fits at each layer's chosen width, kept when the dense fit would repeat them (no excluded
    # entries, independent layers): the dense stage takes them instead of fitting again.
    planned: dict[str, QuantizedTensor] = field(default_factory=dict)

    @property
    def quantizers(self) -> dict[str, BaseQuantizer]:
        """Each layer's base quantizer (the wider one for widened layers)."""
        return {n: self.wide if self.wide is not None and n in self.widened else self.quantizer for n in self.layers}

    @property
    def has_experts(self) -> bool:
        return any(i.expert is not None for i in self.layers.values())

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (i.out_features, i.in_features) for n, i in self.layers.items()}

    @property
    def total(self) -> int:
        """Quantized weights in all layers."""
        return sum(w.numel() for w in self.weights.values())

    @property
    def importance(self) -> Mapping[str, torch.Tensor] | None:
        """The Fisher, for base methods that weight their fit by it."""
        return self.fisher if self.quantizer.uses_importance else None

    def inputs(self) -> dict[str, LayerInputs] | None:
        """Layer-input statistics for base methods that use them, else None."""
        return self.calibration.layer_inputs() if self.quantizer.uses_inputs else None


def start_run(
    model: nn.Module,
    tokenizer: object,
    config: QuantConfig,
    workdir: str | os.PathLike | None,
    resume: bool,
) -> Run:
    """Resolve the quantizer and layers, check the weights, copy the fp32 masters and open the work dir."""
    started = time.perf_counter()
    use_eager_experts(model)  # per-expert calls: routed-token statistics, and the loop QuantExperts serves
    layers = quantizable_layers(model, config.include, config.exclude)
    window_bos(tokenizer, config.bos)  # a BOS mode this tokenizer cannot follow fails before any work
    group_size = config.group_size
    if group_size == EQUAL_BITS:  # the recipe's choice, from the layers' widths
        group_size = equal_bits_group_size((i.in_features for i in layers), config.outliers)
    quantizer = make_quantizer(config.base, config.bits, group_size, **config.quantizer_options())  # type: ignore[arg-type]
    for info in layers:
        quantizer.check_shape(info.name, (info.out_features, info.in_features))
    check_finite_weights(model, layers)
    names = [i.name for i in layers]
    # The fp32 master copy; memory-mapped when the model is offloaded (requant.offload), one layer at a time.
    if is_offloaded(model):
        weights = spill(model, "weights", ((n, _master(model, n)) for n in names))
    else:
        weights = {n: _master(model, n) for n in names}
    # The fingerprint ties stored stages to these exact weights: resuming on another model is refused.
    checksum = f"{sum(float(w.double().abs().sum()) for w in weights.values()):.17g}"
    work = WorkDir(workdir, config, resume=resume, fingerprint={"layers": names, "weights": checksum})
    timings = Timings()
    report = QuantReport(coverage=coverage(model, layers, config.exclude).to_dict())
    wide = None
    if config.widen_bits > 0:  # refused before any work when the wider codes do not fit a layer either
        wide = make_quantizer(config.base, config.bits + 1, group_size, **config.quantizer_options())  # type: ignore[arg-type]
        for info in layers:
            wide.check_shape(info.name, (info.out_features, info.in_features))
    return Run(
        model=model,
        tokenizer=tokenizer,
        config=config,
        group_size=group_size,  # type: ignore[arg-type]
        quantizer=quantizer,
        layers={i.name: i for i in layers},
        weights=weights,
        work=work,
        calibration=Calibration(model, tokenizer, config, names, timings),
        timings=timings,
        started=started,
        report=report,
        wide=wide,
    )


def pqi_pass(
    run: Run, current: Mapping[str, torch.Tensor], what: str, *, label: str | None = None, keep_gbar: bool = True
) -> PQIResult:
    """One PQI integral from the masters w to `current` (the model in the gradient dtype), recorded in the report
    as `what`; `label` names it in progress output (default: `what`). Without `keep_gbar` the scores take ḡ's
    storage (the result's gbar is empty). An offloaded run's gradient sums are memory-mapped files."""
    windows = run.calibration.pqi_windows()
    c = run.config
    with run.timings("pqi_s"), _GradDtype(run.model, c.grad_dtype, run.weights):
        res = post_quantization_integral(
            run.model,
            run.names,
            run.weights,
            current,
            windows,
            nodes=c.pqi_nodes,
            rule=c.pqi_rule,
            desc=f"PQI {c.pqi_rule} ({label or what})",
            keep_gbar=keep_gbar,
            accumulators=_accumulators(run, "pqi"),
        )
    run.report.pqi_passes.append({"what": what, "predicted_dF": res.predicted, "grad_evals": res.grad_evals})
    return res


def _accumulators(run: Run, tag: str) -> Callable[[], Mapping[str, torch.Tensor]] | None:
    """For an offloaded model, a maker of memory-mapped fp32 gradient sums (one set per call); None otherwise."""
    if not is_offloaded(run.model):
        return None
    return lambda: spill_zeros(run.model, tag, run.shapes) or {}


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
    tune_allocator()  # freed whole-layer tensors go back to the system (requant.memory)
    run = start_run(model, tokenizer, config, workdir, resume)
    base_sensitivity(run, fisher)
    with run.timings("widths_s"):
        widen_layers(run)
    sensitive = sensitive_values(run)
    skip = sensitive or {n: torch.zeros(s, dtype=torch.bool) for n, s in run.shapes.items()}
    with run.timings("outliers_s"):
        outliers = select_outliers(run, skip)
    exclude = _union(skip, outliers)
    with run.timings("dense_fit_s"), transient_allocations():
        dense = dense_fit(run, exclude)
    if not (run.config.detach_refit and run.quantizer.uses_importance):  # the refit weighs by it again
        run.fisher = None  # used up (the sensitive values were chosen before the fit): free it for PQI
        release_free_memory()
    significant = detach_significant(run, dense, exclude)
    if significant is not None and run.config.detach_refit:
        exclude = _union(exclude, significant)
        with run.timings("refit_s"), transient_allocations():
            dense = dense_fit(run, exclude, stage="refit")
    return assemble(run, dense, exclude, sensitive=sensitive, outliers=outliers, significant=significant)


def base_sensitivity(run: Run, fisher: Mapping[str, torch.Tensor] | None) -> None:
    """The base method's sensitivity (Fisher Σg² over the calibration windows) when it or the D&S baseline
    needs one and none was given (stage `fisher`)."""
    if fisher is None and run.config.needs_fisher:
        with run.timings("fisher_s"):
            spilled = spill_zeros(run.model, "fisher", run.shapes)  # offloaded: the sums are memory-mapped files

            def compute() -> dict[str, torch.Tensor]:
                windows = run.calibration.windows()
                # The heap is reused here: a run's peak comes later, in the PQI passes (requant.memory).
                with transient_allocations():
                    return compute_fisher(
                        run.model, run.tokenizer, run.config, run.names, run.weights, windows, spilled
                    )

            fisher = run.work.cached("fisher", compute, TENSORS)
            if spilled is not None and any(fisher[n] is not spilled[n] for n in run.names):  # read back on resume
                fisher = spill(run.model, "fisher", fisher.items())
    if fisher is not None and run.has_experts:
        # An expert that (almost) no calibration token reached has a Fisher of zeros or noise.
        fisher, low = expert_importance_fallback(fisher, run.calibration.expert_tokens(), run.config.expert_min_tokens)
        run.fallback["fisher"] = low
    run.fisher = fisher


def widen_layers(run: Run) -> None:
    """--widen-bits: the layers whose codes get one bit more (stage `widths`), from a fit of every layer at
    both widths scored by Σ F (w − ŵ)² (requant.widths); the other stages then fit each layer at its width."""
    c = run.config
    if c.widen_bits <= 0:
        return
    assert run.fisher is not None and run.wide is not None
    fisher = run.fisher
    pair = (run.quantizer, run.wide)

    # With no entry left out of the dense fit, that fit would repeat one of these two: both are kept until the
    # plan picks (two quantized copies: codes of a byte per weight each) and the picked one becomes the dense fit.
    reuse = c.outliers <= 0 and not c.fisher_sensitive
    reuse = reuse and not (run.quantizer.uses_inputs and run.quantizer.sequential)
    kept: dict[str, list[QuantizedTensor]] = {}

    def layer(n: str) -> list[float]:
        """[error at bits, error at bits + 1, extra bits of the wider fit] of layer n."""
        inputs = run.inputs()
        imp = run.importance[n] if run.importance is not None else None
        fits = [q.fit(run.weights[n], importance=imp, inputs=inputs.get(n) if inputs else None) for q in pair]
        errors = [fisher_error(run.weights[n], t.dequantize(), fisher[n]) for t in fits]
        if reuse:
            kept[n] = fits
        return [*errors, float(fits[1].bit_count(0).total_bits - fits[0].bit_count(0).total_bits)]

    def compute() -> dict[str, Any]:
        table = distributed.map_layers(run.names, layer, progress=_layer_bar(f"widths {c.bits}/{c.bits + 1} bits"))
        room = int(c.widen_bits * run.total)
        gain = {n: table[n][0] - table[n][1] for n in run.names}
        wide = plan_widths(gain, {n: int(table[n][2]) for n in run.names}, room)
        spent = sum(int(table[n][2]) for n in wide)
        return {
            "bits": c.bits + 1,
            "layers": wide,
            "share": sum(run.weights[n].numel() for n in wide) / run.total,
            "extra_bits_per_weight": spent / run.total,
            "fisher_error": {
                "narrow": sum(t[0] for t in table.values()),
                "planned": sum(table[n][1] if n in wide else table[n][0] for n in run.names),
            },
        }

    stored = run.work.cached("widths", compute, META)
    run.widened = frozenset(stored["layers"])
    run.report.widths = stored
    run.planned = {n: fits[n in run.widened] for n, fits in kept.items()}  # empty on resume: the dense stage fits


def sensitive_values(run: Run) -> Masks | None:
    """SqueezeLLM's sensitive values: the top Fisher entries of each layer, kept sparse and out of every fit."""
    c = run.config
    if not c.fisher_sensitive:
        return None
    assert run.fisher is not None
    return topk_masks_per_module(run.fisher, c.significant)


def select_outliers(run: Run, skip: Masks) -> Masks | None:
    """The outliers, outside `skip`: Algorithm 1's per-layer ratios, SqueezeLLM's IQR rule, or random."""
    c = run.config
    if c.outliers <= 0:
        return None
    if c.outlier_select == "iqr":
        outliers, run.report.iqr_range_factor = iqr_outlier_masks(run.weights, c.outliers, skip=skip)
        return outliers
    if c.outlier_select == "random":
        return random_masks(run.weights, budget(c.outliers, run.total), skip, c.seed)
    gbar, pre_scores = pre_quantize(run, skip)
    with transient_allocations():
        return algorithm1(run, skip, gbar=gbar, pre_scores=pre_scores)


def pre_quantize(run: Run, skip: Masks) -> tuple[Masks | None, Masks | None]:
    """(ḡ, ΔF_PQI scores) of one PQI pass from w to the pre-quantized w̃_pre, for the Algorithm 1 variants that
    use them (stage `pqi_pre`); (None, None) otherwise."""
    if not run.config.needs_pqi_pre:
        return None, None

    def compute() -> dict[str, torch.Tensor]:
        pre = fit_dense(
            run.quantizers,
            run.weights,
            importance=run.importance,
            exclude=skip,
            inputs=run.inputs(),
            progress=_layer_bar(f"pre-quantize {run.quantizer.name}"),
        )
        res = pqi_pass(run, {n: q.dequantize() for n, q in pre.items()}, "pre-quantized")
        return {**{f"{n}.gbar": g for n, g in res.gbar.items()}, **{f"{n}.score": s for n, s in res.scores.items()}}

    tensors = run.work.cached("pqi_pre", compute, TENSORS)
    return {n: tensors[f"{n}.gbar"] for n in run.weights}, {n: tensors[f"{n}.score"] for n in run.weights}


def algorithm1(run: Run, skip: Masks, *, gbar: Masks | None, pre_scores: Masks | None) -> Masks:
    """Algorithm 1's per-layer outlier counts (stage `alg1`) and the outliers they imply."""
    c = run.config

    def compute() -> dict[str, Any]:
        blocks = {n: i.block for n, i in run.layers.items()}
        progress_map: LayerMap = functools.partial(distributed.map_layers, progress=_layer_bar("algorithm 1"))
        alloc = allocate_outliers(
            run.weights,
            run.quantizers,
            c.outliers,
            importance=run.importance,
            skip=skip,
            objective=c.alg1_objective,
            criterion=c.alg1_criterion,
            groups=blocks if c.alg1_granularity == "block" else None,
            steps=c.alg1_steps,
            max_factor=c.alg1_max_factor,
            allocator=c.alg1_allocator,
            gbar=gbar,
            pre_scores=pre_scores,
            inputs=run.inputs(),
            fisher=run.fisher if c.alg1_objective == "fisher" else None,
            map_layers=progress_map,
        )
        return {"counts": alloc.counts, "report": alloc.report()}

    stored = run.work.cached("alg1", compute, META)
    run.report.algorithm1 = stored["report"]
    return outlier_masks(run.weights, stored["counts"], criterion=c.alg1_criterion, pre_scores=pre_scores, skip=skip)


def dense_fit(run: Run, exclude: Masks, *, stage: str = "dense") -> dict[str, QuantizedTensor]:
    """(Re-)quantize every layer with the sparse entries left out of the fit (stage `dense`, or `refit` after
    the detach); sequential methods (GPTQ) fit block by block on the inputs of the blocks already quantized."""
    q = run.quantizer

    def compute() -> dict[str, QuantizedTensor]:
        if q.uses_inputs and q.sequential:
            fallback: list[str] = []
            out = fit_sequential(
                run.model,
                run.quantizers,
                run.weights,
                run.calibration.windows(),
                importance=run.importance,
                exclude=exclude,
                min_tokens=run.config.expert_min_tokens,
                fallback=fallback,
            )
            run.fallback["inputs"] = fallback
            return out
        done = {n: t for n, t in planned.items() if not exclude[n].any()}  # the width plan's fit, when the same
        fitted = fit_dense(
            run.quantizers,
            {n: w for n, w in run.weights.items() if n not in done},
            importance=run.importance,
            exclude=exclude,
            inputs=run.inputs(),
            progress=_layer_bar(f"quantize {q.name}"),
        )
        return {n: done[n] if n in done else fitted[n] for n in run.names}

    planned, run.planned = (run.planned if stage == "dense" else {}), {}
    return run.work.cached(stage, compute, DENSE)


def detach_significant(run: Run, dense: Mapping[str, QuantizedTensor], exclude: Masks) -> Masks | None:
    """The significant weights, chosen on the re-quantized model: Algorithm 2 by PQI, or random."""
    c = run.config
    if not (c.significant > 0 and c.significant_select != "fisher"):
        return None
    with run.timings("significant_s"):
        count = budget(c.significant, run.total)
        if c.significant_select == "random":
            return random_masks(run.weights, count, exclude, c.seed + 1)
        return algorithm2(run, dense, exclude, count)


def algorithm2(run: Run, dense: Mapping[str, QuantizedTensor], exclude: Masks, count: int) -> Masks:
    """Algorithm 2 with a fresh PQI before every step; the chosen entries so far are stored after each step
    (stage `detach`), and a resume continues from the last stored step."""
    c, weights, work = run.config, run.weights, run.work
    # The reconstruction the detach moves towards w; memory-mapped (one layer at a time) for an offloaded model.
    current = spill(
        run.model,
        "current",
        (
            (n, SparseResidual.restore(weights[n], q.dequantize(), exclude[n]).add_to(q.dequantize()))
            for n, q in dense.items()
        ),
    )
    step = detach_step(count, c.significant, c.step, run.total)
    start = None
    stored = work.stored("detach")
    if stored is not None:
        tensors, meta = stored
        start = (meta["step"], decode_masks(tensors, run.shapes))
        run.report.pqi_passes.extend(meta.get("pqi_passes", []))

    steps = step_counts(count, step)
    done = [start[0] if start is not None else 0]

    def score(cur: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        done[0] += 1
        return pqi_pass(run, cur, "detach", label=f"detach step {done[0]}/{len(steps)}", keep_gbar=False).scores

    def checkpoint(k: int, chosen: Masks, _cur: Masks) -> None:
        work.save("detach", encode_masks(chosen), {"step": k, "pqi_passes": run.report.pqi_passes})

    chosen = stepwise_detach(
        weights,
        current,
        exclude,
        score,
        count,
        step,
        scope=c.detach_scope,
        ranking=c.detach_ranking,
        on_step=checkpoint,
        start=start,
        copy=False,  # `current` was built here for the loop alone
    )
    run.report.detach_steps = steps
    return chosen


def expert_report(run: Run) -> dict[str, Any]:
    """Tokens routed to each expert (full-precision model, calibration windows) and the fallbacks applied;
    without calibration (e.g. plain RTN) the tokens are not measured."""
    c = run.config
    if run.calibration.input_fallback:
        run.fallback.setdefault("inputs", run.calibration.input_fallback)
    counts = run.calibration.expert_tokens() if run.calibration.used() else None
    tokens = None if counts is None else {n: counts[n] for n in run.names if n in counts}  # model order
    fell = sorted({n for names in run.fallback.values() for n in names})
    return {
        "min_tokens": c.expert_min_tokens,
        "tokens": tokens,
        "fallback": fell,
        "fallback_rule": "input statistics: pooled over the experts of the same parameter; "
        "Fisher: uniform at the mean of the other experts' Fisher",
        "fallback_by_kind": {k: sorted(v) for k, v in run.fallback.items()},
    }


def assemble(
    run: Run,
    dense: Mapping[str, QuantizedTensor],
    exclude: Masks,
    *,
    sensitive: Masks | None,
    outliers: Masks | None,
    significant: Masks | None,
) -> QuantizationResult:
    """ŵ = D + outliers + significant, stored as one fp16 residual per layer, written into the model; the result
    with its report."""
    layers = {}
    fit = run.config.sparse_values == "fit"
    stats = run.calibration.layer_inputs() if fit else {}  # the fp model's inputs (its weights are the masters)
    errors = [0.0, 0.0]  # Σ layer output error with restored / fitted sparse values
    with run.timings("sparse_values_s"):
        for n, info in run.layers.items():
            d = dense[n]
            m = exclude[n] | significant[n] if significant else exclude[n]  # one layer's union, not a model-wide mask
            if not m.any():
                layers[n] = QuantizedLayer(info, d, SparseResidual.empty((info.out_features, info.in_features)))
                continue
            dq = d.dequantize()
            sp = SparseResidual.restore(run.weights[n], dq, m)
            h = stats[n].hessian if n in stats else None
            if h is not None:
                fitted = fit_sparse_values(run.weights[n], dq, m, h)
                errors[0] += output_error(run.weights[n], sp.add_to(dq), h)
                errors[1] += output_error(run.weights[n], fitted.add_to(dq), h)
                sp = fitted
            layers[n] = QuantizedLayer(info, d, sp)
    apply_to_model(run.model, layers)
    # Ranks decide independently from identical all-reduced sums; a cheap cross-check of the outcome.
    distributed.check_same(
        sum(float(unit_weight(run.model, n).detach().double().sum()) for n in run.names), "the quantized weights"
    )
    result = QuantizationResult(replace(run.config, group_size=run.group_size), layers)
    bits = result.bit_count()
    run.timings.seconds["total_s"] = time.perf_counter() - run.started
    q = run.quantizer
    r = run.report
    r.timings = run.timings.seconds
    r.bits = bits.to_dict()
    r.sparse = {
        "sensitive_entries": _count(sensitive),
        "outlier_entries": _count(outliers),
        "significant_entries": _count(significant),
        "sparse_percent": bits.sparse_percent,
        "values": run.config.sparse_values,
    }
    if fit:
        r.sparse["output_error"] = {"restore": errors[0], "fit": errors[1]}
    r.layers = len(layers)
    if run.has_experts:
        r.experts = expert_report(run)
    r.quantizer = q.describe()
    r.calibration_inputs = ("sequential" if q.sequential else "one pass") if q.uses_inputs else None
    r.resumed_stages = run.work.resumed
    r.world_size = distributed.world_size()
    if run.work.world_size_change is not None:
        # Stored stages are all-reduced totals: valid for any number of processes, equal within fp32 rounding.
        r.resumed_from_world_size = run.work.world_size_change[0]
    result.report = r.to_dict()
    return result
