import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama
from requant.eval import evaluate


def test_perplexity_matches_direct_computation(model, windows):
    r = evaluate(model, windows)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert r.tokens == windows.shape[0] * (windows.shape[1] - 1)
    assert r.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_batch_size_does_not_change_result(model, windows):
    a, b = evaluate(model, windows, batch_size=1), evaluate(model, windows, batch_size=3)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)


def test_kl_zero_to_itself_and_positive_to_other(model, windows):
    assert evaluate(model, windows, reference=model).kl == pytest.approx(0.0, abs=1e-6)
    other = tiny_llama(seed=5)
    kl = evaluate(model, windows, reference=other).kl
    assert kl > 0.01
