import pytest
import torch

from requant.errors import ConfigError
from requant.sensitivity import (
    actual_delta_f,
    first_order,
    fisher_information,
    fisher_second_order,
    path_losses,
    second_order_hvp,
    weight_delta,
)
from sensitivity.toys import mlp_problem, nll64, toy_loss, toy_problem


@pytest.fixture
def model64():
    return mlp_problem()


def test_first_order_equals_forward_difference(model64):
    model, names, original, quantized, ids = model64
    total, terms = first_order(model, names, original, quantized, ids, loss_fn=nll64)
    eps = 1e-6
    f0, f1 = path_losses(model, names, original, quantized, ids, [0.0, eps], loss_fn=nll64)
    assert abs(total - (f1 - f0) / eps) < 1e-4 * abs(total)
    assert abs(sum(t.double().sum().item() for t in terms.values()) - total) < 1e-9
    assert set(terms) == set(names) and all(t.dtype == torch.float32 for t in terms.values())


def test_second_order_equals_central_second_difference(model64):
    model, names, original, quantized, ids = model64
    hvp = second_order_hvp(model, names, original, quantized, ids, loss_fn=nll64)
    eps = 1e-3
    fm, f0, fp = path_losses(model, names, original, quantized, ids, [-eps, 0.0, eps], loss_fn=nll64)
    fd = 0.5 * (fp - 2 * f0 + fm) / eps**2
    assert abs(hvp - fd) < 1e-4 * abs(fd)
    # the same on one layer alone (Δw = 0 elsewhere), with a different batch split
    sub = [names[0]]
    hvp_sub = second_order_hvp(model, names, original, quantized, ids, subset=sub, batch_size=2, loss_fn=nll64)
    fm, f0, fp = path_losses(model, names, original, quantized, ids, [-eps, 0.0, eps], subset=sub, loss_fn=nll64)
    assert abs(hvp_sub - 0.5 * (fp - 2 * f0 + fm) / eps**2) < 1e-4 * abs(hvp_sub)


@pytest.mark.parametrize("degree", [2, -2])
def test_taylor_is_exact_for_a_quadratic_loss_and_hessian_can_be_negative(degree):
    """For F quadratic in W, F(w̃) − F(w) = gᵀΔw + ½ΔwᵀHΔw exactly; for −F the curvature term is negative."""
    model, names, original, quantized, x = toy_problem(degree=2)

    def loss_fn(m, x):
        nll, n = toy_loss(m, x)
        return (nll if degree > 0 else -nll), n

    g, _ = first_order(model, names, original, quantized, x, loss_fn=loss_fn)
    h = second_order_hvp(model, names, original, quantized, x, loss_fn=loss_fn)
    actual = actual_delta_f(model, names, original, quantized, x, loss_fn=loss_fn)
    assert abs(g + h - actual) < 1e-6 * abs(actual)
    assert (h > 0) == (degree > 0)


def test_hvp_on_default_attention_and_weights_restored(model, windows, path):
    """The real token loss through the default (sdpa) attention; double backward must still work."""
    names, original, quantized = path
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = second_order_hvp(model, names, original, quantized, windows[:1])
    assert h == h and h != 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_fisher_second_order_is_half_mean_fisher_quadratic_form(model, windows, path):
    names, original, quantized = path
    fisher = fisher_information(model, names, windows[:2])
    delta = weight_delta(original, quantized, names)
    got = fisher_second_order(fisher, delta, samples=2)
    slow = 0.5 * sum((fisher[n].double() * delta[n].double() ** 2).sum().item() for n in names) / 2
    assert got > 0 and abs(got - slow) < 1e-9 * slow
    assert abs(fisher_second_order(fisher, delta) - 2 * got) < 1e-12 * got
    with pytest.raises(ConfigError, match="no Fisher information"):
        fisher_second_order({}, delta)
    with pytest.raises(ConfigError, match="samples 0"):
        fisher_second_order(fisher, delta, samples=0)
