"""Algorithm 1's budget step: choose one candidate per layer to minimise Σ_l J_l subject to Σ_l count_l ≤ B.

A multiple-choice knapsack. Both solvers work on each layer's lower convex hull of (count, J), where every
Lagrangian solution is exactly optimal for the budget it uses (tested against brute force).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import ConfigError


def lower_hull(counts: Sequence[int], costs: Sequence[float]) -> list[int]:
    """Indices of the points on the lower-left convex hull of (count, cost), counts ascending, cost falling."""
    order = sorted(range(len(counts)), key=lambda i: (counts[i], costs[i]))
    hull: list[int] = []
    for i in order:
        if hull and costs[i] >= costs[hull[-1]]:
            continue  # more entries for no gain: never worth it
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a→i (non-convex step)
            if (costs[b] - costs[a]) * (counts[i] - counts[a]) >= (costs[i] - costs[a]) * (counts[b] - counts[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate_greedy(
    counts: Mapping[str, Sequence[int]], costs: Mapping[str, Sequence[float]], budget: int
) -> dict[str, int]:
    """Greedy by marginal gain per entry along each layer's convex hull; returns the chosen candidate index.

    Every layer starts at its cheapest-count hull point; increments are taken in order of the largest
    cost reduction per added entry while they fit the budget.
    """
    hulls = {n: lower_hull(counts[n], costs[n]) for n in counts}
    choice = {n: h[0] for n, h in hulls.items()}
    used = sum(counts[n][choice[n]] for n in counts)
    if used > budget:
        raise ConfigError(f"the smallest candidates already need {used} entries, above the budget {budget}")
    steps = []  # (gain per entry, layer, hull position)
    for n, h in hulls.items():
        for j in range(1, len(h)):
            dc = counts[n][h[j]] - counts[n][h[j - 1]]
            steps.append(((costs[n][h[j - 1]] - costs[n][h[j]]) / dc, n, j))
    # Convexity makes each layer's gains non-increasing, so a global sort keeps per-layer order.
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    pos = {n: 0 for n in hulls}
    for _, n, j in steps:
        if j != pos[n] + 1:
            continue  # an earlier step of this layer did not fit
        h = hulls[n]
        extra = counts[n][h[j]] - counts[n][h[j - 1]]
        if used + extra <= budget:
            used += extra
            pos[n] = j
            choice[n] = h[j]
    return choice


def allocate_lagrange(
    counts: Mapping[str, Sequence[int]], costs: Mapping[str, Sequence[float]], budget: int, iters: int = 100
) -> dict[str, int]:
    """Bisection on λ for argmin_r J_l(r) + λ·count_l(r); the largest usage not above the budget wins."""

    def pick(lam: float) -> tuple[dict[str, int], int]:
        ch = {}
        for n in counts:
            vals = [costs[n][i] + lam * counts[n][i] for i in range(len(counts[n]))]
            # ties toward fewer entries keep the usage monotone in λ
            ch[n] = min(range(len(vals)), key=lambda i: (vals[i], counts[n][i]))
        return ch, sum(counts[n][ch[n]] for n in counts)

    hi = 1.0
    while pick(hi)[1] > budget:
        hi *= 4
        if hi > 1e30:
            raise ConfigError(f"no allocation fits the budget of {budget} entries")
    lo = 0.0
    if pick(lo)[1] <= budget:
        return pick(lo)[0]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if pick(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)[0]


ALLOCATORS = {"greedy": allocate_greedy, "lagrange": allocate_lagrange}


def candidate_percents(budget_pct: float, steps: int = 8, max_factor: float = 4.0) -> list[float]:
    """Candidate per-layer outlier percents {0, 1/steps, ..., max_factor} × budget (docs/method.md, Algorithm 1)."""
    n = round(steps * max_factor)
    return [budget_pct * i / steps for i in range(n + 1)]


def magnitude_topk_mask(weight: torch.Tensor, count: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The `count` entries of largest |w| (outside `skip`) as a boolean mask."""
    score = weight.float().abs()
    return topk_mask(score, count, skip)


def topk_mask(score: torch.Tensor, count: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The `count` largest scores (outside `skip`) as a boolean mask; ties broken by position."""
    flat = score.float().flatten().clone()
    if skip is not None:
        flat[skip.flatten()] = -torch.inf
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if count > 0:
        mask[torch.topk(flat, count, sorted=False).indices] = True
    return mask.view(score.shape)
