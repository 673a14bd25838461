"""Algorithm 1 alone (no model): candidate objectives, the allocation under the budget, the chosen masks."""

import pytest
import torch

from requant.errors import ConfigError
from requant.quantizers import make_quantizer
from requant.sparse.adaptive import (
    allocate_outliers,
    candidate_objectives,
    criterion_scores,
    layer_objective,
    local_map,
    outlier_masks,
    row_objective,
)
from requant.sparse.allocation import magnitude_topk_mask


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(3.0))
    return {
        "a": t.sample((32, 64)) * 0.02,
        "b": torch.randn(16, 64, generator=g) * 0.05,
        "c": t.sample((48, 32)) * 0.01,
    }


def _full_fit_objectives(quantizer, w, excludes, imp):
    return [
        layer_objective(w, quantizer.fit(w, importance=imp, exclude=e).dequantize(), ~e, kind="base", importance=imp)
        for e in excludes
    ]


@pytest.mark.parametrize("base", ["rtn", "squeezellm"])
def test_row_subset_refits_match_full_refits(base):
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((48, 64)) * 0.02
    imp = torch.rand(48, 64, generator=g)
    excludes = [magnitude_topk_mask(w, c) for c in (0, 3, 30, 200)]
    # not nested: a mask that drops entries of the previous one, an unchanged one, and back to none
    excludes += [torch.rand(48, 64, generator=g) < 0.01, excludes[3], excludes[3], excludes[0]]
    q = make_quantizer(base, 3)
    fast = candidate_objectives(q, w, excludes, kind="base", importance=imp)
    full = _full_fit_objectives(q, w, excludes, imp)
    assert fast[0] == full[0]
    # rows are fit independently (k-means draws are keyed by each row's own entries): equal up to fp64 sums
    assert fast == pytest.approx(full, rel=1e-12, abs=0)
    assert fast[1] < fast[0] and fast[3] < fast[2]


def test_allocation_meets_the_budget_and_beats_no_outliers():
    torch.manual_seed(0)
    w = _layers()
    alloc = allocate_outliers(w, make_quantizer("rtn", 3), 1.0)
    total = sum(x.numel() for x in w.values())
    assert sum(alloc.counts.values()) <= round(0.01 * total)
    assert alloc.objective <= alloc.objective_none
    assert alloc.objective == pytest.approx(sum(alloc.table[n][alloc.candidates.index(alloc.candidate[n])] for n in w))


def test_the_allocation_does_not_depend_on_where_layers_are_fitted():
    """Any layer-map executor that returns every layer's row gives the same allocation, bit for bit."""
    torch.manual_seed(0)
    w = _layers()
    q = make_quantizer("squeezellm", 3)
    seen = []

    def backwards(names, fn):
        seen.extend(reversed(names))
        return {n: fn(n) for n in reversed(names)}

    a = allocate_outliers(w, q, 1.0, map_layers=local_map)
    b = allocate_outliers(w, q, 1.0, map_layers=backwards)
    assert seen == ["c", "b", "a"]
    assert a.counts == b.counts and a.table == b.table and a.objective == b.objective


def test_block_groups_share_one_ratio():
    torch.manual_seed(0)
    w = _layers()
    alloc = allocate_outliers(w, make_quantizer("rtn", 3), 1.0, groups={"a": 0, "b": 0, "c": 1})
    assert alloc.candidate["a"] == alloc.candidate["b"]


def test_masks_take_the_top_entries_outside_skip():
    w = _layers()
    skip = {n: torch.zeros(x.shape, dtype=torch.bool) for n, x in w.items()}
    skip["a"][0] = True
    counts = {"a": 10, "b": 0, "c": 5}
    masks = outlier_masks(w, counts, skip=skip)
    assert {n: int(m.sum()) for n, m in masks.items()} == counts
    assert not (masks["a"] & skip["a"]).any()
    kept = w["a"].abs()[~masks["a"] & ~skip["a"]]
    assert kept.max() <= w["a"].abs()[masks["a"]].min()


def test_objectives_and_criteria():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    recon = torch.tensor([[1.5, -2.0], [0.0, 0.0]])
    keep = torch.tensor([[True, True], [False, True]])
    assert row_objective(w, recon, keep, kind="base").tolist() == [0.25, 0.0]
    gbar = torch.full_like(w, 2.0)
    assert layer_objective(w, recon, keep, kind="pqi", gbar=gbar) == 1.0
    assert torch.equal(criterion_scores(w, "magnitude", None), w.abs())
    assert torch.equal(criterion_scores(w, "pqi_pre", -w), w.abs())
    with pytest.raises(ConfigError, match="objective 'l1' is not allowed; use one of base, pqi, fisher"):
        row_objective(w, recon, keep, kind="l1")
    with pytest.raises(ConfigError, match="criterion 'hessian' is not allowed"):
        criterion_scores(w, "hessian", None)
    with pytest.raises(ConfigError, match="allocator 'dp' is not allowed"):
        allocate_outliers({"a": w}, make_quantizer("rtn", 3), 1.0, allocator="dp")


def test_fisher_objective_weighs_the_error_whatever_the_base_fits():
    layers = _layers()
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(w.shape, generator=g) for n, w in layers.items()}
    rtn = make_quantizer("rtn", 3)
    # RTN's fit ignores importance, so the Fisher objective is the base objective with the Fisher as weights ...
    by_fisher = allocate_outliers(layers, rtn, 1.0, objective="fisher", fisher=fisher, steps=2)
    weighted = allocate_outliers(layers, rtn, 1.0, objective="base", importance=fisher, steps=2)
    assert by_fisher.table == weighted.table and by_fisher.counts == weighted.counts
    # ... and differs from RTN's own (unweighted) error.
    assert by_fisher.table != allocate_outliers(layers, rtn, 1.0, objective="base", steps=2).table
    # SqueezeLLM fits with its importance; the Fisher objective only scores, with its own weights.
    sq, imp = make_quantizer("squeezellm", 3), {n: torch.ones_like(f) for n, f in fisher.items()}
    a = allocate_outliers(layers, sq, 1.0, objective="fisher", importance=imp, fisher=fisher, steps=2)
    fits = [
        sq.fit(layers["a"], importance=imp["a"], exclude=e).dequantize()
        for e in [torch.zeros_like(layers["a"], dtype=torch.bool)]
    ]
    expect = layer_objective(
        layers["a"], fits[0], torch.ones_like(fits[0], dtype=torch.bool), kind="base", importance=fisher["a"]
    )
    assert a.table["a"][0] == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ConfigError, match="fisher objective of Algorithm 1 needs the Fisher"):
        allocate_outliers(layers, rtn, 1.0, objective="fisher")


def test_fisher_objective_needs_a_fisher_pass():
    from requant.config import QuantConfig

    base = dict(base="rtn", bits=3, outliers=0.25, outlier_select="adaptive")
    assert QuantConfig(**base, alg1_objective="fisher").needs_fisher
    assert not QuantConfig(**base).needs_fisher
