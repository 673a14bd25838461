import math

import pytest
import torch

from requant.errors import ConfigError
from requant.sensitivity import RULES, exact_degree, quadrature


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 32])
def test_nodes_in_unit_interval_weights_sum_to_one(rule, n):
    t, c = quadrature(rule, n)
    assert t.dtype == c.dtype == torch.float64
    assert len(t) == len(c) == (n + 1 if rule == "trapezoid" else n)
    assert t.min() >= 0 and t.max() <= 1 and (c > 0).all()
    assert abs(c.sum().item() - 1.0) < 1e-14


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_exact_up_to_stated_degree_and_not_beyond(rule, n):
    """∫₀¹ tᵈ dt = 1/(d+1) exactly for d ≤ exact_degree, and not for the next degree."""
    t, c = quadrature(rule, n)
    d_max = exact_degree(rule, n)
    for d in range(d_max + 1):
        assert abs((c * t**d).sum().item() - 1 / (d + 1)) < 1e-13, (rule, n, d)
    d = d_max + 1
    assert abs((c * t**d).sum().item() - 1 / (d + 1)) > 1e-11, (rule, n, d)


def test_gauss_nodes_are_legendre_roots_on_unit_interval():
    t, c = quadrature("gauss", 2)
    assert torch.allclose(t, torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], dtype=t.dtype))
    assert torch.allclose(c, torch.tensor([0.5, 0.5], dtype=c.dtype))
    assert quadrature("midpoint", 4)[0].tolist() == [0.125, 0.375, 0.625, 0.875]
    assert quadrature("trapezoid", 2)[1].tolist() == [0.25, 0.5, 0.25]
    assert [x.tolist() for x in quadrature("right", 1)] == [[1.0], [1.0]]  # the gradient at w̃ alone
    # The right rule's nodes are the trapezoid's without t = 0: the nodes report shares their gradients.
    assert quadrature("right", 4)[0].tolist() == quadrature("trapezoid", 4)[0].tolist()[1:]


@pytest.mark.parametrize("rule,n", [("midpoint", 0), ("gauss", -1), ("left", 2.5), ("simpson", 4), ("mid", 1)])
def test_bad_rule_or_node_count(rule, n):
    with pytest.raises(ConfigError, match=r"rule|nodes"):
        quadrature(rule, n)
