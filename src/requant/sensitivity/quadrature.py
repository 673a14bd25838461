"""Quadrature rules on [0, 1] for the path integral ΔF = ∫₀¹ ∇F(w + tΔw)ᵀΔw dt.

Exactness, for an integrand that is a polynomial of degree d in t (a loss of degree d + 1 along the path):
  left       N intervals, nodes k/N (k < N)           exact for d = 0
  right      N intervals, nodes k/N (k ≥ 1)           exact for d = 0   (N = 1: the gradient at w̃ alone)
  midpoint   N intervals, nodes (k + ½)/N             exact for d ≤ 1   (error ∝ 1/N²; the paper's rule)
  trapezoid  N intervals, N + 1 nodes k/N             exact for d ≤ 1   (error ∝ 1/N²)
  gauss      N Gauss–Legendre nodes                    exact for d ≤ 2N − 1
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError

RULES = ("midpoint", "trapezoid", "left", "right", "gauss")


def exact_degree(rule: str, nodes: int) -> int:
    """Highest polynomial degree of the integrand that the rule integrates exactly."""
    check_rule(rule, nodes)
    return {"left": 0, "right": 0, "midpoint": 1, "trapezoid": 1, "gauss": 2 * nodes - 1}[rule]


def check_rule(rule: str, nodes: int) -> None:
    if rule not in RULES:
        raise ConfigError(f"quadrature rule {rule!r} is not known; use one of {', '.join(RULES)}")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"number of nodes {nodes!r} must be a positive integer")


def quadrature(rule: str, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t_k in [0,1] and weights c_k (float64) of a rule: midpoint | trapezoid | left | right | gauss. Σc_k = 1.

    `nodes` is the paper's N: the number of intervals for the composite rules (trapezoid evaluates N + 1
    points) and the number of points for Gauss–Legendre.
    """
    check_rule(rule, nodes)
    n = nodes
    k = torch.arange(n + 1, dtype=torch.float64)
    if rule == "midpoint":
        return (k[:n] + 0.5) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "left":
        return k[:n] / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "right":
        return k[1:] / n, torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "trapezoid":
        c = torch.full((n + 1,), 1.0 / n, dtype=torch.float64)
        c[0] = c[-1] = 0.5 / n
        return k / n, c
    x, w = np.polynomial.legendre.leggauss(n)  # on [-1, 1], ascending
    return torch.from_numpy((x + 1.0) / 2.0), torch.from_numpy(w / 2.0)
