import torch

from requant.loss import token_nll


def _slow_nll(model, ids):
    """Per-token reference: −log p(ids[t+1] | ids[:t+1]) summed over every predicted position."""
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return sum(-logp[b, t, ids[b, t + 1]] for b in range(ids.shape[0]) for t in range(ids.shape[1] - 1))


def test_token_nll_equals_a_per_token_sum_and_its_gradient(model, windows):
    ids = windows[:2]
    w = model.get_submodule("model.layers.0.mlp.down_proj").weight
    nll, count = token_nll(model, ids)
    assert count == ids.shape[0] * (ids.shape[1] - 1)
    (grad,) = torch.autograd.grad(nll, w)
    slow = _slow_nll(model, ids)
    (slow_grad,) = torch.autograd.grad(slow, w)
    assert abs(nll.item() - slow.item()) <= 1e-5 * slow.item()
    assert (grad - slow_grad).abs().max() <= 1e-4 * slow_grad.abs().max()
