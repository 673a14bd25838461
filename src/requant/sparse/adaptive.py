"""Algorithm 1 (reconstructed; docs/method.md, "Algorithm 1"): per-layer outlier ratios under one global budget.

For every layer and candidate ratio r: take the top r·n entries by a criterion (|w| by default) as
outliers, fit the base quantizer with them left out, and score the base method's own objective on the
rest. A multiple-choice knapsack then picks one ratio per layer (or per block) within the budget.

The per-layer fits are independent; `map_layers` decides where they run (in this process by default, or
split over torch.distributed ranks by `requant.distributed.map_layers`) and draws any progress.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..quantizers import BaseQuantizer, LayerInputs
from ..quantizers.base import quantizer_of
from .allocation import ALLOCATORS, candidate_percents, topk_mask
from .outliers import budget as budget_entries

# J_l: the base method's own error, Σ |ḡ|·|w − D| of a PQI pass, or the Fisher-weighted error Σ F (w − D)²
# whatever the base method fits (a loss-aware score for methods that weigh every entry alike, e.g. RTN).
OBJECTIVES = ("base", "pqi", "fisher")
CRITERIA = ("magnitude", "pqi_pre")  # which entries become outliers first

# Applies a per-layer function to every name and returns {name: its row of numbers}, wherever it runs them.
LayerMap = Callable[[Sequence[str], Callable[[str], list[float]]], dict[str, list[float]]]


def local_map(names: Sequence[str], fn: Callable[[str], list[float]]) -> dict[str, list[float]]:
    """Every layer in this process, in order."""
    return {n: fn(n) for n in names}


@dataclass
class OutlierAllocation:
    """Chosen outlier count per layer, with what the allocation saw."""

    counts: dict[str, int]
    percents: dict[str, float]  # achieved percent of each layer
    candidate: dict[str, float]  # the chosen candidate ratio (percent) of each layer
    objective: float  # Σ_l J_l at the chosen ratios
    objective_none: float  # Σ_l J_l with no outliers (the pre-quantized model)
    candidates: list[float]  # candidate percents (relative to each layer's size)
    table: dict[str, list[float]] = field(default_factory=dict)  # J_l per candidate

    def report(self) -> dict[str, Any]:
        return {
            "percent_per_layer": self.percents,
            "candidate_per_layer": self.candidate,
            "objective": self.objective,
            "objective_no_outliers": self.objective_none,
            "candidates": self.candidates,
        }


def row_objective(
    weight: torch.Tensor,
    recon: torch.Tensor,
    keep: torch.Tensor,
    *,
    kind: str,
    importance: torch.Tensor | None = None,
    gbar: torch.Tensor | None = None,
) -> torch.Tensor:
    """J per output row (fp64) on the kept (dense) entries: Σ s (w − D)² for `base` and `fisher` (s: the
    importance given, the Fisher for `fisher`), Σ |ḡ|·|w − D| for `pqi`."""
    err = (weight.double() - recon.double()) * keep
    if kind in ("base", "fisher"):
        assert kind == "base" or importance is not None
        s = importance.double() if importance is not None else 1.0
        return (s * err.square()).sum(1)
    if kind == "pqi":
        assert gbar is not None
        return (gbar.double().abs() * err.abs()).sum(1)
    raise ConfigError(f"Algorithm 1 objective {kind!r} is not allowed; use one of {', '.join(OBJECTIVES)}")


def layer_objective(weight: torch.Tensor, recon: torch.Tensor, keep: torch.Tensor, **kw: Any) -> float:
    """J of a whole layer (see row_objective)."""
    return float(row_objective(weight, recon, keep, **kw).sum())


def candidate_objectives(
    quantizer: BaseQuantizer,
    weight: torch.Tensor,
    excludes: list[torch.Tensor],
    *,
    kind: str,
    importance: torch.Tensor | None = None,
    gbar: torch.Tensor | None = None,
    inputs: LayerInputs | None = None,
    fisher: torch.Tensor | None = None,
) -> list[float]:
    """J for each candidate exclusion mask; masks[0] is the reference fit. `importance` goes to the fit (and
    weighs `base`); `fisher` weighs the `fisher` objective.

    For base methods that fit every output row on its own, a candidate only refits the rows whose mask
    differs from the previous candidate's and keeps the other rows' error from it (nested candidates, as
    from growing top-k masks, then refit only the rows that gained an outlier). With `base`, a method that
    minimises its own error (e.g. the layer output error on `inputs`) is scored by it.
    """

    def sub(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[rows]

    def rows_j(w: torch.Tensor, recon: torch.Tensor, keep: torch.Tensor, imp: Any, g: Any, f: Any) -> torch.Tensor:
        own = quantizer.objective(w, recon, keep, inputs) if kind == "base" else None
        s = f if kind == "fisher" else imp
        return own if own is not None else row_objective(w, recon, keep, kind=kind, importance=s, gbar=g)

    prev_ex = excludes[0]
    ref = quantizer.fit(weight, importance=importance, exclude=prev_ex, inputs=inputs).dequantize()
    cur_rows = rows_j(weight, ref, ~prev_ex, importance, gbar, fisher)  # J of each row under the previous candidate
    out = [float(cur_rows.sum())]
    for ex in excludes[1:]:
        if not quantizer.row_independent:
            recon = quantizer.fit(weight, importance=importance, exclude=ex, inputs=inputs).dequantize()
            out.append(float(rows_j(weight, recon, ~ex, importance, gbar, fisher).sum()))
            continue
        rows = (ex != prev_ex).any(1).nonzero().squeeze(1)
        prev_ex = ex
        if rows.numel() == 0:
            out.append(out[-1])
            continue
        w, imp, g, e = weight[rows], sub(importance, rows), sub(gbar, rows), ex[rows]
        recon = quantizer.fit(w, importance=imp, exclude=e, inputs=inputs).dequantize()
        cur_rows[rows] = rows_j(w, recon, ~e, imp, g, sub(fisher, rows))
        out.append(float(cur_rows.sum()))
    return out


def criterion_scores(weight: torch.Tensor, criterion: str, pre_scores: torch.Tensor | None) -> torch.Tensor:
    """Which entries become outliers first: largest |w| (magnitude) or largest |ΔF_PQI| of w̃_pre (pqi_pre)."""
    if criterion == "magnitude":
        return weight.float().abs()
    if criterion == "pqi_pre":
        assert pre_scores is not None
        return pre_scores.float().abs()
    raise ConfigError(f"outlier criterion {criterion!r} is not allowed; use one of {', '.join(CRITERIA)}")


def outlier_masks(
    weights: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    *,
    criterion: str = "magnitude",
    pre_scores: Mapping[str, torch.Tensor] | None = None,
    skip: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The chosen outliers: top `counts[l]` entries of each layer by the criterion, outside `skip`."""
    return {
        n: topk_mask(
            criterion_scores(w, criterion, pre_scores[n] if pre_scores else None), counts[n], skip[n] if skip else None
        )
        for n, w in weights.items()
    }


def allocate_outliers(
    weights: Mapping[str, torch.Tensor],
    quantizer: BaseQuantizer | Mapping[str, BaseQuantizer],
    budget_pct: float,
    *,
    importance: Mapping[str, torch.Tensor] | None = None,
    skip: Mapping[str, torch.Tensor] | None = None,
    objective: str = "base",
    criterion: str = "magnitude",
    groups: Mapping[str, Any] | None = None,
    steps: int = 8,
    max_factor: float = 4.0,
    allocator: str = "greedy",
    gbar: Mapping[str, torch.Tensor] | None = None,
    pre_scores: Mapping[str, torch.Tensor] | None = None,
    inputs: Mapping[str, LayerInputs] | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
    map_layers: LayerMap = local_map,
) -> OutlierAllocation:
    """Per-layer outlier counts minimising Σ_l J_l subject to Σ_l count_l ≤ budget_pct % of all weights.

    `groups` maps each layer to a unit that shares one ratio (e.g. its block); default: every layer alone.
    `inputs` carries each layer's calibration statistics for base methods that use them; `fisher` weighs the
    `fisher` objective. `map_layers` runs
    the per-layer candidate fits (a layer's table does not depend on where it is computed).
    """
    if allocator not in ALLOCATORS:
        raise ConfigError(f"allocator {allocator!r} is not allowed; use one of {', '.join(ALLOCATORS)}")
    if objective == "fisher" and fisher is None:
        raise ConfigError("the fisher objective of Algorithm 1 needs the Fisher of every layer")
    cands = candidate_percents(budget_pct, steps, max_factor)
    counts = {n: [budget_entries(p, w.numel()) for p in cands] for n, w in weights.items()}

    def layer_table(n: str) -> list[float]:
        """J_l of layer n at every candidate ratio."""
        w = weights[n]
        sk = skip.get(n) if skip else None
        scores = criterion_scores(w, criterion, pre_scores.get(n) if pre_scores else None)
        excludes = []
        for c in counts[n]:
            mask = topk_mask(scores, c, sk)
            excludes.append(mask if sk is None else mask | sk)
        return candidate_objectives(
            quantizer_of(quantizer, n),
            w,
            excludes,
            kind=objective,
            importance=importance.get(n) if importance else None,
            gbar=gbar.get(n) if gbar else None,
            inputs=inputs.get(n) if inputs else None,
            fisher=fisher.get(n) if fisher else None,
        )

    table = map_layers(list(weights), layer_table)
    unit_of = dict(groups) if groups else {n: n for n in weights}
    units: dict[Any, list[str]] = {}
    for n in weights:
        units.setdefault(unit_of[n], []).append(n)
    u_counts = {str(u): [sum(counts[n][j] for n in ns) for j in range(len(cands))] for u, ns in units.items()}
    u_costs = {str(u): [sum(table[n][j] for n in ns) for j in range(len(cands))] for u, ns in units.items()}
    total = budget_entries(budget_pct, sum(w.numel() for w in weights.values()))
    choice = ALLOCATORS[allocator](u_counts, u_costs, total)
    chosen = {n: choice[str(unit_of[n])] for n in weights}
    return OutlierAllocation(
        counts={n: counts[n][j] for n, j in chosen.items()},
        percents={n: 100.0 * counts[n][j] / weights[n].numel() for n, j in chosen.items()},
        candidate={n: cands[j] for n, j in chosen.items()},
        objective=sum(table[n][j] for n, j in chosen.items()),
        objective_none=sum(table[n][0] for n in weights),
        candidates=cands,
        table=table,
    )
