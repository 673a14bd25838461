import torch
import torch.nn.functional as F

from requant.model import quantizable_layers
from requant.sensitivity import fisher_information


def _slow_fisher(model, names, windows):
    out = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    params = [model.get_submodule(n).weight for n in names]
    for w in windows:
        logits = model(w[None]).logits[0, :-1]
        loss = F.cross_entropy(logits, w[1:])
        grads = torch.autograd.grad(loss, params)
        for n, g in zip(names, grads, strict=True):
            out[n] += g**2
    return out


def test_fisher_equals_sum_of_per_sample_squared_gradients(model, windows):
    names = [layer.name for layer in quantizable_layers(model)]
    fast = fisher_information(model, names, windows)
    slow = _slow_fisher(model, names, windows)
    for n in names:
        assert torch.allclose(fast[n], slow[n], rtol=1e-4, atol=1e-12)
