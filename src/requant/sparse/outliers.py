"""Outlier and sensitive-value selection for the Dense-and-Sparse baseline (SqueezeLLM's rules).

Percentages are percent of all quantized weights, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ConfigError


def check_percent(pct: float, what: str) -> None:
    if not 0 <= pct < 100:
        raise ConfigError(f"{what} {pct} is outside the allowed range [0, 100) percent of quantized weights")


def budget(pct: float, numel: int) -> int:
    """Number of entries that `pct` percent of `numel` weights allows (rounded to nearest)."""
    return round(pct / 100.0 * numel)


def iqr_thresholds(weights: Mapping[str, torch.Tensor], range_factor: float) -> dict[str, float]:
    """SqueezeLLM's per-module threshold T = max(|q1 − R·IQR|, |q3 + R·IQR|); |w| > T is an outlier."""
    out = {}
    for name, w in weights.items():
        q1, q3 = _quartiles(w)
        iqr = q3 - q1
        out[name] = max(abs(q1 - range_factor * iqr), abs(q3 + range_factor * iqr))
    return out


def _quartiles(w: torch.Tensor) -> tuple[float, float]:
    flat = w.float().flatten()
    # torch.quantile caps its input size; kthvalue is exact and has no cap.
    n = flat.numel()
    q = []
    for p in (0.25, 0.75):
        pos = p * (n - 1)
        lo, frac = int(pos), pos - int(pos)
        a = flat.kthvalue(lo + 1).values
        b = flat.kthvalue(min(lo + 2, n)).values
        q.append(float(a + frac * (b - a)))
    return q[0], q[1]


def iqr_outlier_masks(
    weights: Mapping[str, torch.Tensor],
    percent: float,
    *,
    skip: Mapping[str, torch.Tensor] | None = None,
    iters: int = 60,
) -> tuple[dict[str, torch.Tensor], float]:
    """Outlier masks by the IQR rule with one global range factor R found by bisection.

    R is chosen so that the outlier share (not counting positions in `skip`) is the largest not above
    `percent`; returns the masks and R. Users ask for a share, never for R.
    """
    check_percent(percent, "outlier percent")
    total = sum(w.numel() for w in weights.values())
    target = budget(percent, total)
    empty = {n: torch.zeros(w.shape, dtype=torch.bool) for n, w in weights.items()}
    if target == 0:
        return empty, float("inf")
    # Sorted |w| per module (skipped positions removed) makes each count a binary search.
    sorted_abs, quart = {}, {}
    for n, w in weights.items():
        a = w.float().abs().flatten()
        if skip is not None and n in skip:
            a = a[~skip[n].flatten()]
        sorted_abs[n] = a.sort().values
        q1, q3 = _quartiles(w)
        quart[n] = (q1, q3, q3 - q1)

    def threshold(n: str, r: float) -> float:
        q1, q3, iqr = quart[n]
        return max(abs(q1 - r * iqr), abs(q3 + r * iqr))

    def count(r: float) -> int:
        c = 0
        for n, a in sorted_abs.items():
            c += a.numel() - int(torch.searchsorted(a, torch.tensor(threshold(n, r)), right=True))
        return c

    lo, hi = 0.0, 1.0
    while count(hi) > target:
        hi *= 2
        if hi > 1e9:
            break
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if count(mid) > target:
            lo = mid
        else:
            hi = mid
    masks = {}
    for n, w in weights.items():
        m = w.float().abs() > threshold(n, hi)
        if skip is not None and n in skip:
            m &= ~skip[n]
        masks[n] = m
    return masks, hi


def topk_masks_per_module(scores: Mapping[str, torch.Tensor], percent: float) -> dict[str, torch.Tensor]:
    """In every module, the top `percent` of entries by score (SqueezeLLM's sensitive values by Fisher)."""
    check_percent(percent, "sensitive percent")
    masks = {}
    for n, s in scores.items():
        k = budget(percent, s.numel())
        m = torch.zeros(s.numel(), dtype=torch.bool)
        if k:
            m[torch.topk(s.float().flatten(), k, sorted=False).indices] = True
        masks[n] = m.view(s.shape)
    return masks
