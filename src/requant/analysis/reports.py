"""The paper's sensitivity analyses (Tables 1–5) as reports: rows of numbers, a summary, JSON or Markdown.

blocks     Table 1: per decoder block quantized alone (+ "all"): Taylor terms, Fisher term, actual ΔF, PQI
lambda     Table 2: w + λΔw for several λ: first- and second-order terms against the actual ΔF
nodes      Table 3: predicted ΔF of each quadrature rule and node count against the actual ΔF
sublayers  Table 4: mean |ΔF_PQI| per block × sub-layer kind
coverage   Table 5: share of Σ|ΔF_PQI| held by the top p% of weights
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import text_windows
from ..errors import ConfigError
from ..model import LayerInfo, quantizable_layers, unit_weight, use_eager_experts
from ..pipeline import quantize, set_weights
from ..progress import bar
from ..sensitivity.actual import actual_delta_f, check_fraction, loss, path_losses
from ..sensitivity.fisher import fisher_information
from ..sensitivity.path import weight_delta
from ..sensitivity.pqi import PathIntegral, PQIResult, path_gradients, post_quantization_integral
from ..sensitivity.quadrature import RULES, check_rule, quadrature
from ..sensitivity.taylor import first_order, fisher_second_order, second_order_hvp

REPORTS = ("blocks", "lambda", "nodes", "sublayers", "coverage")
DEFAULT_LAMBDAS = (1e-1, 5e-2, 1e-2, 5e-3, 1e-3)
DEFAULT_NODES = (1, 2, 4, 8, 16, 32)
DEFAULT_PERCENTS = (0.05, 0.15, 0.5, 0.71, 1.0, 2.0, 5.0, 5.25, 10.0, 25.0, 50.0)
PQI_SCOPES = ("joint", "block")
TARGET_REL_ERROR = 0.002  # the paper's Table 3 accuracy: 0.2 % of ΔF


@dataclass
class Problem:
    """What every report measures: a model, its quantizable layers, w and w̃ (fp32, CPU), calibration windows."""

    model: nn.Module
    layers: list[LayerInfo]
    original: dict[str, torch.Tensor]
    quantized: dict[str, torch.Tensor]
    windows: torch.Tensor
    batch_size: int = 1
    fisher: dict[str, torch.Tensor] | None = None  # Σ_s g_s² over `windows`, if already known

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.layers]

    def args(self) -> tuple:
        return (self.model, self.names, self.original, self.quantized, self.windows)


@dataclass
class Report:
    """One report: its rows (one dict per table row), column order and a summary of the run."""

    name: str
    rows: list[dict[str, Any]]
    columns: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    pqi: PQIResult | None = None  # the PQI pass the report ran, for reuse (not part of the JSON)

    def to_dict(self) -> dict[str, Any]:
        return {"report": self.name, "rows": self.rows, "summary": self.summary}

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c), c) for c in self.columns) + " |")
        return "\n".join(lines)


def prepare_problem(model: nn.Module, tokenizer: object, config: Any, *, batch_size: int = 1) -> Problem:
    """Quantize with the base method through requant.pipeline, keep w and w̃, and put w back in the model.

    `config` is a requant.config.QuantConfig; its calibration windows are also the windows F is measured
    on, and the Fisher computed for the quantizer (if any) is kept for the Fisher term.
    """

    use_eager_experts(model)  # the loop whose per-expert calls quantize() calibrates on; the Fisher sees the same
    layers = quantizable_layers(model, config.include, config.exclude)
    names = [i.name for i in layers]
    original = {n: unit_weight(model, n).detach().to("cpu", torch.float32, copy=True) for n in names}
    windows = text_windows(
        tokenizer, config.calib, config.seqlen, nsamples=config.nsamples, seed=config.seed, bos=config.bos
    )
    fisher = None
    if config.needs_fisher:
        fisher = {n: f.cpu() for n, f in fisher_information(model, names, windows).items()}
    try:
        result = quantize(model, tokenizer, config, fisher=fisher)
        quantized = {n: q.weight().float().cpu() for n, q in result.layers.items()}
    finally:
        set_weights(model, original)
    return Problem(model, layers, original, quantized, windows, batch_size=batch_size, fisher=fisher)


_PLAIN = ("lambda", "percent", "share")  # settings and percentages read better as plain numbers


def _cell(v: Any, column: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if column in _PLAIN else f"{v:.3e}"
    return str(v)


def _by_block(layers: Sequence[LayerInfo]) -> dict[int | str, list[str]]:
    """Layer names grouped by decoder block, in model order; layers outside the blocks go under "other"."""
    groups: dict[int | str, list[str]] = {}
    for info in layers:
        groups.setdefault(info.block if info.block is not None else "other", []).append(info.name)
    return groups


def _pqi(problem: Problem, nodes: int, rule: str) -> PQIResult:
    return post_quantization_integral(*problem.args(), nodes=nodes, rule=rule, batch_size=problem.batch_size)


# ----------------------------------------------------------------------------------------------------------
# Pure functions over scores


def sublayer_means(layers: Sequence[LayerInfo], scores: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Mean |ΔF_PQI| (nats per weight) for each block × sub-layer kind, kinds named from module names."""
    kinds = list(dict.fromkeys(i.kind for i in layers))
    short = {k: k.removesuffix("_proj") for k in kinds}
    if len(set(short.values())) < len(kinds):
        short = {k: k for k in kinds}
    rows: dict[Any, dict[str, Any]] = {}
    for info in layers:
        block = info.block if info.block is not None else "other"
        row = rows.setdefault(block, {"block": block})
        row[short[info.kind]] = scores[info.name].abs().mean(dtype=torch.float64).item()
    return list(rows.values())


def coverage(scores: Mapping[str, torch.Tensor], percents: Sequence[float]) -> list[dict[str, float]]:
    """For each p: the share (%) of Σ|ΔF_PQI| held by the top p% of weights, and the |ΔF_PQI| cut-off there."""
    for p in percents:
        if not 0 < p <= 100:
            raise ConfigError(f"coverage percent {p} must be in (0, 100]")
    mags = np.sort(np.concatenate([s.abs().reshape(-1).numpy() for s in scores.values()]))[::-1]
    total = float(mags.sum(dtype=np.float64))
    ks = [max(1, min(len(mags), round(p / 100 * len(mags)))) for p in percents]
    order = np.argsort(ks)
    bounds = np.array([0] + [ks[i] for i in order])
    # One pass: sums of consecutive segments of the sorted magnitudes, accumulated in fp64.
    segs = [float(mags[a:b].sum(dtype=np.float64)) for a, b in itertools.pairwise(bounds)]
    cum = np.cumsum(segs)
    out: list[dict[str, float]] = [{}] * len(percents)
    for j, i in enumerate(order):
        out[i] = {
            "percent": float(percents[i]),
            "weights": int(ks[i]),
            "share": 100.0 * float(cum[j]) / total if total > 0 else float("nan"),
            "threshold": float(mags[ks[i] - 1]),
        }
    return out


NodeCounts = Sequence[int] | Mapping[str, Sequence[int]]


def node_plan(rules: Sequence[str], nodes: NodeCounts) -> dict[str, list[int]]:
    """Node counts per rule: one list for every rule, or a mapping rule -> counts; all validated."""
    if not rules:
        raise ConfigError("no quadrature rules given")
    if isinstance(nodes, Mapping):
        missing = [r for r in rules if r not in nodes]
        if missing:
            raise ConfigError(f"no node counts given for rule(s) {', '.join(missing)}")
        plan = {r: list(nodes[r]) for r in rules}
    else:
        plan = {r: list(nodes) for r in rules}
    for rule, counts in plan.items():
        if not counts:
            raise ConfigError(f"no node counts given for rule {rule}")
        for n in counts:
            check_rule(rule, n)
    return plan


def rule_predictions(
    derivatives: Mapping[float, float], rules: Sequence[str], nodes: NodeCounts
) -> list[dict[str, Any]]:
    """Predicted ΔF = Σ_k c_k dF/dt(t_k) of each rule and N from cached derivatives (nats)."""
    rows = []
    plan = node_plan(rules, nodes)
    for rule in rules:
        for n in plan[rule]:
            ts, cs = quadrature(rule, n)
            pred = sum(c * derivatives[t] for t, c in zip(ts.tolist(), cs.tolist(), strict=True))
            rows.append({"rule": rule, "nodes": n, "predicted": pred, "grad_evals": len(ts)})
    return rows


def smallest_evals(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, int | None]:
    """Per rule, the fewest gradient evaluations per window with |rel_error| ≤ target (None if never)."""
    out: dict[str, int | None] = {}
    for row in rows:
        best = out.get(row["rule"])
        if abs(row["rel_error"]) <= target and (best is None or row["grad_evals"] < best):
            out[row["rule"]] = row["grad_evals"]
        else:
            out.setdefault(row["rule"], best)
    return out


# ----------------------------------------------------------------------------------------------------------
# The reports


def blocks_report(
    problem: Problem, *, pqi_nodes: int = 32, pqi_rule: str = "midpoint", pqi_scope: str = "joint"
) -> Report:
    """Table 1: each block quantized alone, then all blocks: gᵀΔw, ½ΔwᵀHΔw, ½ΣF_iiΔw², actual ΔF, PQI.

    pqi_scope "joint": the block's share Σ ΔF_PQI of one PQI pass with every layer on the path (what
    ReQuant ranks by; cheap). "block": a PQI pass per block with only that block moving (comparable to
    the block's actual ΔF; costs pqi_nodes × windows per block).
    """
    check_rule(pqi_rule, pqi_nodes)
    if pqi_scope not in PQI_SCOPES:
        raise ConfigError(f"PQI scope {pqi_scope!r} is not known; use one of {', '.join(PQI_SCOPES)}")
    t0 = time.perf_counter()
    model, names, original, quantized, windows = problem.args()
    bs = problem.batch_size
    fisher = problem.fisher
    if fisher is None:
        fisher = {n: f.cpu() for n, f in fisher_information(model, names, windows).items()}
    delta = weight_delta(original, quantized, names)
    _, g_terms = first_order(*problem.args(), batch_size=bs)
    base = loss(model, windows, batch_size=bs)
    joint = _pqi(problem, pqi_nodes, pqi_rule)
    groups = _by_block(problem.layers)
    rows = []
    for block, members in bar([*groups.items(), ("all", names)], desc="blocks", unit="block"):
        if block == "all":
            pqi = joint.predicted
        elif pqi_scope == "joint":
            pqi = sum(joint.scores[n].sum(dtype=torch.float64).item() for n in members)
        else:
            pqi = post_quantization_integral(
                *problem.args(), nodes=pqi_nodes, rule=pqi_rule, batch_size=bs, subset=members
            ).predicted
        rows.append(
            {
                "block": block,
                "first_order": sum(g_terms[n].sum(dtype=torch.float64).item() for n in members),
                "second_order": second_order_hvp(*problem.args(), subset=members, batch_size=bs),
                "fisher_second_order": fisher_second_order(
                    fisher, {n: delta[n] for n in members}, samples=len(windows)
                ),
                "actual": actual_delta_f(*problem.args(), subset=members, base_loss=base, batch_size=bs),
                "pqi": pqi,
            }
        )
    summary = {
        "loss": base,
        "pqi_nodes": pqi_nodes,
        "pqi_rule": pqi_rule,
        "pqi_scope": pqi_scope,
        "fisher_scaling": f"Σ_s g_s² / {len(windows)} windows",
        "sum_of_block_actual": sum(r["actual"] for r in rows[:-1]),
        "wall_s": time.perf_counter() - t0,
    }
    cols = ["block", "first_order", "second_order", "fisher_second_order", "actual", "pqi"]
    return Report("blocks", rows, cols, summary, joint)


def lambda_report(problem: Problem, *, lambdas: Sequence[float] = DEFAULT_LAMBDAS) -> Report:
    """Table 2: all layers moved to w + λΔw; the Taylor terms scale as λ and λ², the actual ΔF does not."""
    if not lambdas:
        raise ConfigError("no λ values given")
    for lam in lambdas:
        check_fraction(lam)
    t0 = time.perf_counter()
    bs = problem.batch_size
    g, _ = first_order(*problem.args(), batch_size=bs)
    h = second_order_hvp(*problem.args(), batch_size=bs)
    f = path_losses(*problem.args(), [0.0, *lambdas], batch_size=bs)
    rows = [
        {
            "lambda": lam,
            "first_order": lam * g,
            "second_order": lam**2 * h,
            "taylor": lam * g + lam**2 * h,
            "actual": fl - f[0],
        }
        for lam, fl in zip(lambdas, f[1:], strict=True)
    ]
    summary = {"loss": f[0], "gradient_term": g, "hessian_term": h, "wall_s": time.perf_counter() - t0}
    return Report("lambda", rows, ["lambda", "first_order", "second_order", "taylor", "actual"], summary)


def nodes_report(
    problem: Problem,
    *,
    rules: Sequence[str] = RULES,
    nodes: NodeCounts = DEFAULT_NODES,
    target: float = TARGET_REL_ERROR,
    pqi_rule: str | None = None,
    pqi_nodes: int = 32,
) -> Report:
    """Table 3: predicted ΔF of every rule × N against the actual ΔF.

    `nodes` is one list of N for every rule, or a mapping rule -> list. Gradients are evaluated once per
    distinct node t and shared by every rule and N that uses it; each row's grad_evals is what that rule
    alone costs per window (N + 1 for trapezoid). With `pqi_rule`, the element-wise PQI of that rule and
    N is accumulated on the way (report.pqi), for the sublayers and coverage tables.
    """
    plan = node_plan(rules, nodes)
    t0 = time.perf_counter()
    ts = {t for r, counts in plan.items() for n in counts for t in quadrature(r, n)[0].tolist()}
    integral = None
    if pqi_rule is not None:
        integral = PathIntegral(*(x.tolist() for x in quadrature(pqi_rule, pqi_nodes)))
        ts |= set(integral.weight_at)
    ts = sorted(ts)
    derivs, losses = {}, {}
    nodes_iter = path_gradients(*problem.args(), ts, batch_size=problem.batch_size, desc="nodes report")
    with contextlib.closing(nodes_iter):
        for node in nodes_iter:
            derivs[node.t], losses[node.t] = node.derivative, node.loss
            if integral is not None:
                integral.add(node)
            del node  # let this node's gradients go before the next node's backward
    grad_s = time.perf_counter() - t0
    actual = actual_delta_f(*problem.args(), batch_size=problem.batch_size)
    rows = rule_predictions(derivs, rules, nodes)
    for row in rows:
        row["actual"] = actual
        row["rel_error"] = (row["predicted"] - actual) / abs(actual) if actual else float("nan")
    summary = {
        "actual": actual,
        "distinct_nodes": len(ts),
        "windows": len(problem.windows),
        "grad_evals_total": len(ts) * len(problem.windows),
        "target_rel_error": target,
        "smallest_grad_evals_within_target": smallest_evals(rows, target),
        "path": [{"t": t, "dF_dt": derivs[t], "loss": losses[t]} for t in ts],
        "gradient_s": grad_s,
        "wall_s": time.perf_counter() - t0,
    }
    pqi = integral.result(problem.original, problem.quantized, len(problem.windows)) if integral else None
    cols = ["rule", "nodes", "grad_evals", "predicted", "actual", "rel_error"]
    return Report("nodes", rows, cols, summary, pqi)


def sublayers_report(
    problem: Problem, *, pqi_nodes: int = 32, pqi_rule: str = "midpoint", pqi: PQIResult | None = None
) -> Report:
    """Table 4: mean |ΔF_PQI| per weight, one row per block, one column per sub-layer kind."""
    t0 = time.perf_counter()
    pqi = pqi or _pqi(problem, pqi_nodes, pqi_rule)
    rows = sublayer_means(problem.layers, pqi.scores)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    summary = {"predicted": pqi.predicted, "pqi_grad_evals": pqi.grad_evals}
    summary["wall_s"] = time.perf_counter() - t0
    return Report("sublayers", rows, cols, summary, pqi)


def coverage_report(
    problem: Problem,
    *,
    percents: Sequence[float] = DEFAULT_PERCENTS,
    pqi_nodes: int = 32,
    pqi_rule: str = "midpoint",
    pqi: PQIResult | None = None,
) -> Report:
    """Table 5: share of Σ|ΔF_PQI| covered by the top p% of weights; the summary holds a dense curve."""
    if not percents:
        raise ConfigError("no coverage percents given")
    t0 = time.perf_counter()
    pqi = pqi or _pqi(problem, pqi_nodes, pqi_rule)
    rows = coverage(pqi.scores, percents)
    grid = [float(p) for p in np.logspace(-3, 2, 51)]
    summary = {
        "predicted": pqi.predicted,
        "abs_total": sum(s.abs().sum(dtype=torch.float64).item() for s in pqi.scores.values()),
        "pqi_grad_evals": pqi.grad_evals,
        "curve": [{"percent": r["percent"], "share": r["share"]} for r in coverage(pqi.scores, grid)],
        "wall_s": time.perf_counter() - t0,
    }
    return Report("coverage", rows, ["percent", "weights", "share", "threshold"], summary, pqi)


_RUNNERS: dict[str, Callable[..., Report]] = {
    "blocks": blocks_report,
    "lambda": lambda_report,
    "nodes": nodes_report,
    "sublayers": sublayers_report,
    "coverage": coverage_report,
}


def check_report(name: str, **options: Any) -> None:
    """Refuse an unknown report or bad options before any expensive work."""
    if name not in _RUNNERS:
        raise ConfigError(f"report {name!r} does not exist; use one of {', '.join(REPORTS)}")
    if "rules" in options or "nodes" in options:
        node_plan(options.get("rules", RULES), options.get("nodes", DEFAULT_NODES))
    for lam in options.get("lambdas", ()):
        check_fraction(lam)
    if options.get("pqi_rule") is not None or "pqi_nodes" in options:
        check_rule(options.get("pqi_rule") or "midpoint", options.get("pqi_nodes", 32))
    if options.get("pqi_scope", "joint") not in PQI_SCOPES:
        raise ConfigError(f"PQI scope {options['pqi_scope']!r} is not known; use one of {', '.join(PQI_SCOPES)}")
    for p in options.get("percents", ()):
        if not 0 < p <= 100:
            raise ConfigError(f"coverage percent {p} must be in (0, 100]")


def run_report(name: str, problem: Problem, **options: Any) -> Report:
    """Run the named report (blocks | lambda | nodes | sublayers | coverage) with its own options."""
    check_report(name, **options)
    return _RUNNERS[name](problem, **options)
