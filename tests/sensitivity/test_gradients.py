"""The gradient engine: only the listed weights get gradients, sums equal a per-window loop, bad values are named."""

import pytest
import torch
import torch.nn.functional as F

from requant.errors import NumericalError
from requant.model import quantizable_layers
from requant.sensitivity import fisher_information, grads_only_for, mean_loss_gradient
from requant.sensitivity.gradients import gradient_sums


def test_only_listed_weights_get_gradients_and_flags_restored(model, windows):
    names = [layer.name for layer in quantizable_layers(model)][:2]
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with grads_only_for(model, names):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in names}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_mean_gradient_is_independent_of_batch_split(model, windows):
    names = [layer.name for layer in quantizable_layers(model)]
    f1, g1 = mean_loss_gradient(model, names, windows, batch_size=1)
    f4, g4 = mean_loss_gradient(model, names, windows, batch_size=4)
    assert abs(f1 - f4) < 1e-5
    for n in names:
        # fp32 summation order differs between splits: agree to 1e-5 of the tensor's scale
        assert (g1[n] - g4[n]).abs().max() <= 1e-5 * g1[n].abs().max()


def test_gradient_sums_equal_a_per_window_reference(model, windows):
    """Summed NLL, token count and fp32 gradient sums equal a per-window autograd loop (also for a bf16 model)."""
    names = [layer.name for layer in quantizable_layers(model)]
    params = [model.get_submodule(n).weight for n in names]
    slow = {n: torch.zeros_like(p) for n, p in zip(names, params, strict=True)}
    nll = 0.0
    for w in windows:
        loss = F.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum")
        nll += loss.item()
        for n, g in zip(names, torch.autograd.grad(loss, params), strict=True):
            slow[n] += g
    sums = gradient_sums(model, names, windows, batch_size=2)
    assert sums.tokens == windows.numel() - len(windows)
    assert abs(sums.nll - nll) <= 1e-5 * nll
    for n in names:
        assert sums.grads[n].dtype == torch.float32
        assert (sums.grads[n] - slow[n]).abs().max() <= 1e-5 * slow[n].abs().max()
        assert model.get_submodule(n).weight.grad is None  # nothing left on the model
    model.to(torch.bfloat16)
    half = gradient_sums(model, names, windows, batch_size=2)
    for n in names:
        assert half.grads[n].dtype == torch.float32
        assert (half.grads[n] - slow[n]).abs().max() <= 0.1 * slow[n].abs().max()


def test_non_finite_gradient_names_the_layer(model, windows):
    names = [layer.name for layer in quantizable_layers(model)]
    hook = model.get_submodule(names[1]).weight.register_hook(lambda g: g + float("inf"))
    try:
        with pytest.raises(NumericalError, match=f"gradient of {names[1]} is not finite on calibration window 0"):
            gradient_sums(model, names, windows)
        with pytest.raises(NumericalError, match=f"gradient of {names[1]} is not finite on calibration window 0"):
            fisher_information(model, names, windows)  # per window
    finally:
        hook.remove()


def test_huge_finite_gradient_is_not_called_non_finite(model, windows):
    # Entries near the fp32 maximum overflow the cheap summed check; the exact check must clear them.
    names = [layer.name for layer in quantizable_layers(model)]
    w = model.get_submodule(names[1]).weight
    hook = w.register_hook(lambda g: torch.full_like(g, 3e38))
    try:
        sums = gradient_sums(model, names, windows[:1])
    finally:
        hook.remove()
    assert torch.isinf(sums.grads[names[1]].sum()) and bool(torch.isfinite(sums.grads[names[1]]).all())
