import itertools
import random

import pytest
import torch

from requant.errors import ConfigError
from requant.sparse.allocation import (
    allocate_greedy,
    allocate_lagrange,
    candidate_percents,
    lower_hull,
    magnitude_topk_mask,
)


def _instance(seed, layers=4, cands=5):
    rng = random.Random(seed)
    counts, costs = {}, {}
    for li in range(layers):
        c = sorted(rng.sample(range(0, 40), cands))
        c[0] = 0
        j = [rng.uniform(50, 100)]
        for _ in range(cands - 1):
            j.append(j[-1] - rng.uniform(0, 20))  # more outliers never cost more (as for real layers)
        counts[f"l{li}"], costs[f"l{li}"] = c, j
    return counts, costs


def _brute(counts, costs, budget):
    names = list(counts)
    best = float("inf")
    for combo in itertools.product(*(range(len(counts[n])) for n in names)):
        used = sum(counts[n][i] for n, i in zip(names, combo, strict=True))
        if used <= budget:
            best = min(best, sum(costs[n][i] for n, i in zip(names, combo, strict=True)))
    return best


def _value(counts, costs, choice):
    return sum(costs[n][i] for n, i in choice.items()), sum(counts[n][i] for n, i in choice.items())


def test_hull_is_convex_and_decreasing():
    counts, costs = [0, 1, 2, 3, 4], [10.0, 6.0, 5.5, 2.0, 1.9]
    h = lower_hull(counts, costs)
    assert h[0] == 0 and h[-1] == 4
    slopes = [(costs[h[i]] - costs[h[i + 1]]) / (counts[h[i + 1]] - counts[h[i]]) for i in range(len(h) - 1)]
    assert all(a >= b for a, b in itertools.pairwise(slopes))
    assert 2 not in h  # 5.5 lies above the chord 6.0 → 2.0


@pytest.mark.parametrize("seed", range(12))
def test_lagrange_solutions_are_optimal_for_their_usage(seed):
    counts, costs = _instance(seed)
    for budget in (5, 20, 45, 80):
        ch = allocate_lagrange(counts, costs, budget)
        val, used = _value(counts, costs, ch)
        assert used <= budget
        assert val == pytest.approx(_brute(counts, costs, used))  # exact for the budget it uses
        g_val, g_used = _value(counts, costs, allocate_greedy(counts, costs, budget))
        assert g_used <= budget and g_val <= val + 1e-9  # greedy fills at least as well
        assert g_val >= _brute(counts, costs, budget) - 1e-9


def test_budget_errors_and_grid():
    with pytest.raises(ConfigError, match="above the budget"):
        allocate_greedy({"a": [5, 6]}, {"a": [1.0, 0.5]}, 2)
    assert candidate_percents(0.45, steps=8, max_factor=4)[-1] == pytest.approx(1.8)
    assert len(candidate_percents(0.45)) == 33


def test_magnitude_topk_mask():
    w = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 4.0]])
    m = magnitude_topk_mask(w, 2)
    assert m.tolist() == [[False, True, False], [False, False, True]]
    skip = torch.zeros_like(m)
    skip[0, 1] = True
    assert magnitude_topk_mask(w, 2, skip).tolist() == [[False, False, False], [True, False, True]]
