import copy

import pytest
import torch

from requant.errors import ConfigError, NumericalError
from requant.eval import evaluate
from requant.loss import token_nll
from requant.sensitivity import actual_delta_f, loss, path_losses


def test_loss_is_the_mean_token_nll_of_eval(model, windows):
    assert abs(loss(model, windows) - evaluate(model, windows).nll) < 1e-6


def test_actual_delta_f_equals_loss_of_quantized_copy(model, windows, path):
    names, original, quantized = path
    q_model = copy.deepcopy(model)
    with torch.no_grad():
        for n in names:
            q_model.get_submodule(n).weight.copy_(quantized[n])
    expect = loss(q_model, windows) - loss(model, windows)
    assert abs(actual_delta_f(model, names, original, quantized, windows) - expect) < 1e-6
    # reusing a known F(w) gives the same value; batch size does not matter
    f0 = loss(model, windows)
    got = actual_delta_f(model, names, original, quantized, windows, base_loss=f0, batch_size=3)
    assert abs(got - expect) < 1e-5


def test_fraction_and_subset_move_only_what_they_say(model, windows, path):
    names, original, quantized = path
    block0 = [n for n in names if ".layers.0." in n]
    q_model = copy.deepcopy(model)
    with torch.no_grad():
        for n in block0:
            w = q_model.get_submodule(n).weight
            w.copy_(original[n] + 0.25 * (quantized[n] - original[n]))
    expect = loss(q_model, windows) - loss(model, windows)
    got = actual_delta_f(model, names, original, quantized, windows, fraction=0.25, subset=block0)
    assert abs(got - expect) < 1e-6
    full = actual_delta_f(model, names, original, quantized, windows, subset=names)
    assert abs(full - actual_delta_f(model, names, original, quantized, windows)) < 1e-9


def test_path_end_is_quantized_weights_bit_for_bit(model, windows, path):
    names, original, quantized = path
    seen = {}

    def spy(m, ids):
        seen.update({n: m.get_submodule(n).weight.detach().clone() for n in names})
        return token_nll(m, ids)

    path_losses(model, names, original, quantized, windows[:1], [1.0], loss_fn=spy)
    assert all(torch.equal(seen[n], quantized[n]) for n in names)
    assert all(torch.equal(model.get_submodule(n).weight, original[n]) for n in names)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval(model, windows, path, fraction):
    names, original, quantized = path
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        actual_delta_f(model, names, original, quantized, windows, fraction=fraction)


def test_bad_subset_and_nan_loss(model, windows, path):
    names, original, quantized = path
    with pytest.raises(ConfigError, match="not among the path's layers"):
        actual_delta_f(model, names, original, quantized, windows, subset=["lm_head"])

    def nan_loss(m, ids):
        nll, n = token_nll(m, ids)
        return nll * float("nan"), n

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NumericalError, match=r"t=1.*window 0"):
        actual_delta_f(model, names, original, quantized, windows, base_loss=1.0, loss_fn=nan_loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
