import pytest
import torch

from requant.errors import ConfigError, NumericalError
from requant.loss import token_nll
from requant.sensitivity import actual_delta_f, post_quantization_integral, quadrature
from sensitivity.toys import nll64, toy_loss, toy_problem


def _snapshot(model):
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    for n, p in model.named_parameters():
        ptr, value = snap[n]
        assert p.data_ptr() == ptr, f"{n} was reallocated"
        assert torch.equal(p, value), f"{n} was not restored bit for bit"


def test_many_nodes_equal_actual_delta_f(model, windows, path):
    """The identity ΔF = ∫∇Fᵀ Δw dt: midpoint converges as 1/N², Gauss–Legendre far faster."""
    names, original, quantized = path
    windows = windows[:2]
    actual = actual_delta_f(model, names, original, quantized, windows)
    assert actual > 0.01  # 3-bit RTN visibly hurts the tiny model: the identity is not trivially 0 = 0
    m32 = post_quantization_integral(model, names, original, quantized, windows, nodes=32)
    assert abs(m32.predicted - actual) <= 3e-4 * actual
    m8 = post_quantization_integral(model, names, original, quantized, windows, nodes=8)
    assert 12 < (m8.predicted - actual) / (m32.predicted - actual) < 20  # (32/8)² = 16
    g8 = post_quantization_integral(model, names, original, quantized, windows, nodes=8, rule="gauss")
    assert abs(g8.predicted - actual) <= 1e-5 * actual
    # Σ ΔF_PQI is the predicted ΔF, and it equals the rule applied to the node derivatives dF/dt
    assert abs(sum(s.double().sum().item() for s in m32.scores.values()) - m32.predicted) < 1e-9
    c = torch.tensor(m32.weights, dtype=torch.float64)
    f = torch.tensor(m32.node_derivatives, dtype=torch.float64)
    assert abs((c * f).sum().item() - m32.predicted) < 1e-6 * actual
    assert m32.grad_evals == 32 * len(windows) and len(m32.node_losses) == 32
    assert m32.nodes == quadrature("midpoint", 32)[0].tolist()


def test_scores_are_delta_times_path_averaged_gradient(model, windows, path):
    names, original, quantized = path
    r = post_quantization_integral(model, names, original, quantized, windows, nodes=2, rule="gauss")
    for n in names:
        assert r.scores[n].dtype == r.gbar[n].dtype == torch.float32
        assert torch.equal(r.scores[n], (quantized[n] - original[n]) * r.gbar[n])


@pytest.mark.parametrize(
    "rule,n,exact",
    [
        ("midpoint", 1, True),
        ("midpoint", 3, True),
        ("trapezoid", 1, True),
        ("gauss", 1, True),
        ("gauss", 2, True),
        ("left", 1, False),
        ("left", 4, False),
        ("right", 1, False),
        ("right", 4, False),
    ],
)
def test_quadratic_loss_exactness(rule, n, exact):
    """Loss of degree 2 along the path: the integrand is linear in t, so midpoint, trapezoid and Gauss
    (any N) are exact, element-wise too: ḡ = ∇F(w + ½Δw). The left rule is exact only for constants."""
    model, names, original, quantized, x = toy_problem(degree=2)
    actual = actual_delta_f(model, names, original, quantized, x, loss_fn=toy_loss)
    r = post_quantization_integral(model, names, original, quantized, x, nodes=n, rule=rule, loss_fn=toy_loss)
    err = abs(r.predicted - actual) / abs(actual)
    if exact:
        assert err < 1e-6
        w_mid = (original["lin"] + quantized["lin"]) / 2
        with torch.no_grad():
            model.lin.weight.copy_(w_mid)
        g_mid = torch.autograd.grad(toy_loss(model, x)[0] / len(x), model.lin.weight)[0]
        assert torch.allclose(r.gbar["lin"].double(), g_mid, rtol=1e-6, atol=1e-6)
    else:
        assert err > 1e-2


def test_right_rule_one_node_is_the_gradient_at_the_quantized_point():
    """--pqi-rule right --pqi-nodes 1 scores Δw ⊙ ∇F(w̃); the left and right rules average to the trapezoid."""
    model, names, original, quantized, x = toy_problem(degree=4)

    def pqi(rule):
        return post_quantization_integral(model, names, original, quantized, x, nodes=1, rule=rule, loss_fn=toy_loss)

    right = pqi("right")
    with torch.no_grad():
        model.lin.weight.copy_(quantized["lin"])
    g_end = torch.autograd.grad(toy_loss(model, x)[0] / len(x), model.lin.weight)[0]
    with torch.no_grad():
        model.lin.weight.copy_(original["lin"])
    assert torch.allclose(right.gbar["lin"].double(), g_end.double(), rtol=1e-6, atol=1e-7)
    left, trap = pqi("left"), pqi("trapezoid")
    assert torch.allclose((left.scores["lin"] + right.scores["lin"]) / 2, trap.scores["lin"], rtol=1e-6, atol=1e-8)
    assert abs(right.predicted - left.predicted) > 1e-3 * abs(trap.predicted)  # a degree-4 loss: the ends differ


def test_quartic_loss_gauss2_exact_midpoint_second_order():
    """Loss of degree 4: integrand cubic. Gauss with 2 nodes (exact to degree 3) is exact, 1 node is not;
    midpoint is not exact and its error falls as 1/N², trapezoid's is ≈ −2× midpoint's."""
    model, names, original, quantized, x = toy_problem(degree=4)
    actual = actual_delta_f(model, names, original, quantized, x, loss_fn=toy_loss)

    def err(rule, n):
        r = post_quantization_integral(model, names, original, quantized, x, nodes=n, rule=rule, loss_fn=toy_loss)
        return (r.predicted - actual) / abs(actual)

    assert abs(err("gauss", 2)) < 1e-6 and abs(err("gauss", 3)) < 1e-6
    assert abs(err("gauss", 1)) > 1e-2
    e = [err("midpoint", n) for n in (2, 4, 8)]
    assert abs(e[0]) > 1e-3
    assert 3.8 < e[0] / e[1] < 4.2 and 3.8 < e[1] / e[2] < 4.2
    assert -2.3 < err("trapezoid", 8) / e[2] < -1.7


@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_batch_split_gives_the_same_integral(model, windows, path, batch_size):
    names, original, quantized = path
    ref = post_quantization_integral(model, names, original, quantized, windows, nodes=2, rule="gauss")
    r = post_quantization_integral(
        model, names, original, quantized, windows, nodes=2, rule="gauss", batch_size=batch_size
    )
    assert abs(r.predicted - ref.predicted) <= 1e-5 * abs(ref.predicted)
    for n in names:
        assert (r.gbar[n] - ref.gbar[n]).abs().max() <= 1e-5 * ref.gbar[n].abs().max()


def test_weights_restored_in_place_bit_exact(model, windows, path):
    names, original, quantized = path
    snap = _snapshot(model)
    post_quantization_integral(model, names, original, quantized, windows, nodes=3, rule="trapezoid")
    _assert_unchanged(model, snap)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_bf16_model_restored_and_close_to_fp32(windows, path):
    from helpers import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    names, _, quantized = path
    original = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    snap = _snapshot(model)
    r = post_quantization_integral(model, names, original, quantized, windows, nodes=4)
    _assert_unchanged(model, snap)
    assert all(s.dtype == torch.float32 for s in r.scores.values())
    actual = actual_delta_f(model, names, original, quantized, windows)
    assert abs(r.predicted - actual) < 0.05 * abs(actual)  # bf16 rounding, not a broken path


def test_restored_after_error_mid_way(model, windows, path):
    names, original, quantized = path
    snap = _snapshot(model)
    calls = []

    def failing(m, ids):
        calls.append(1)
        if len(calls) == 6:  # node 2, window 2: weights are somewhere along the path
            raise RuntimeError("boom")
        return token_nll(m, ids)

    with pytest.raises(RuntimeError, match="boom"):
        post_quantization_integral(model, names, original, quantized, windows, nodes=4, loss_fn=failing)
    _assert_unchanged(model, snap)


def test_nan_loss_names_node_and_window(model, windows, path):
    names, original, quantized = path
    snap = _snapshot(model)

    def nan_on_window_2(m, ids):
        nll, n = token_nll(m, ids)
        return (nll * float("nan"), n) if bool((ids == windows[2]).all()) else (nll, n)

    with pytest.raises(NumericalError, match=r"t=0\.25.*window 2"):
        post_quantization_integral(model, names, original, quantized, windows, nodes=2, loss_fn=nan_on_window_2)
    _assert_unchanged(model, snap)


def test_bad_inputs(model, windows, path):
    names, original, quantized = path
    pqi = post_quantization_integral
    with pytest.raises(ConfigError, match="nodes 0"):
        pqi(model, names, original, quantized, windows, nodes=0)
    with pytest.raises(ConfigError, match="rule 'simpson'"):
        pqi(model, names, original, quantized, windows, rule="simpson")
    with pytest.raises(ConfigError, match="no quantizable layers"):
        pqi(model, [], original, quantized, windows)
    with pytest.raises(ConfigError, match=r"not a quantizable unit"):
        pqi(model, ["model.norm"], original, quantized, windows)
    with pytest.raises(ConfigError, match="quantized weights have no entry"):
        pqi(model, names, original, {}, windows)
    bad = dict(quantized)
    bad[names[1]] = bad[names[1]].clone()
    bad[names[1]][0, 0] = float("nan")
    with pytest.raises(NumericalError, match=names[1]):
        pqi(model, names, original, bad, windows)
    with pytest.raises(ConfigError, match="batch size"):
        pqi(model, names, original, quantized, windows, batch_size=0)


def test_float64_model_converges_to_machine_precision():
    """With a float64 model and loss only the rule's error remains: Gauss 8 is far better than midpoint 8."""
    from helpers import tiny_llama

    model = tiny_llama(layers=1, hidden=32, inter=48).double()
    from sensitivity.toys import rtn_weights

    names, original, quantized = rtn_weights(model)
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    actual = actual_delta_f(model, names, original, quantized, ids, loss_fn=nll64)
    ts, _ = quadrature("gauss", 8)
    g8 = post_quantization_integral(model, names, original, quantized, ids, nodes=8, rule="gauss", loss_fn=nll64)
    m8 = post_quantization_integral(model, names, original, quantized, ids, nodes=8, loss_fn=nll64)
    assert len(ts) == len(g8.nodes) == 8
    assert abs(g8.predicted - actual) < 1e-5 * abs(actual)  # fp32 gradients bound what is left
    assert abs(m8.predicted - actual) > 3 * abs(g8.predicted - actual)
