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


def test_a_bos_window_scores_every_text_token_and_never_the_bos(model, text_file):
    from helpers import byte_tokenizer
    from requant.data import text_windows
    from requant.eval import evaluate

    ids = text_windows(byte_tokenizer(add_bos=True), str(text_file), 16, nsamples=2, seed=1, bos="auto")
    assert (ids[:, 0] == 256).all()
    text = ids[:, 1:]  # the text tokens: each is predicted from the BOS and the text before it
    with torch.no_grad():
        nll, count = token_nll(model, ids)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        # Token by token: −log p(text[j] | BOS, text[:j]); the BOS label at position 0 has no predictor.
        slow = sum(-logp[b, j, text[b, j]] for b in range(ids.shape[0]) for j in range(text.shape[1]))
    assert count == text.numel() == 2 * 15
    assert abs(nll.item() - slow.item()) <= 1e-5 * slow.item()
    res = evaluate(model, ids, bos=True)
    assert res.tokens == text.numel() and res.bos and abs(res.nll - slow.item() / count) <= 1e-5 * res.nll
