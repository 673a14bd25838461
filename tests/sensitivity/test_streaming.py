"""Streaming gradient sums: folded into the sums as backward produces each gradient, bit-identical to summing
whole-model gradients window by window, with at most one parameter's gradient alive at a time."""

import pytest
import torch

from requant.model import quantizable_layers, unit_ref, use_eager_experts
from requant.sensitivity import fisher_information
from requant.sensitivity.gradients import gradient_sums, window_gradients

from ..test_units import tiny_gpt2, tiny_mixtral


def _reference(model, names, windows, per_batch=None):
    """The former engine: every window's whole-model gradients first, then the sums."""
    acc = {}
    for _, _, count, grads in window_gradients(model, names, windows):
        for n, g in grads.items():
            term = g if per_batch is None else per_batch(g, count)
            acc[n] = acc[n] + term if n in acc else term
    return acc


def _fisher_term(g, count):
    return (g / count).square_()


@pytest.mark.parametrize("build", ["llama", "mixtral", "gpt2"])
def test_streaming_sums_are_bit_identical_to_whole_model_gradients(build, model, windows):
    if build == "mixtral":
        model = tiny_mixtral()
        use_eager_experts(model)
    elif build == "gpt2":
        model = tiny_gpt2()
    windows = windows[:3] % model.config.vocab_size
    names = [i.name for i in quantizable_layers(model)]
    for per_batch in (None, _fisher_term):
        ref = _reference(model, names, windows, per_batch)
        got = gradient_sums(model, names, windows, per_batch=per_batch).grads
        for n in names:
            assert torch.equal(got[n], ref[n]), n


def test_only_one_gradient_is_alive_at_a_time_and_sums_go_into_given_storage(model, windows):
    names = [i.name for i in quantizable_layers(model)]
    params = [unit_ref(model, n).param for n in names]
    alive = []

    def watch(_p):
        alive.append(sum(q.grad is not None for q in params))

    # registered first: runs before the engine's fold, when this parameter's own gradient is set
    handles = [p.register_post_accumulate_grad_hook(watch) for p in params]
    into = {n: torch.full(unit_ref(model, n).weight.shape, 7.0) for n in names}
    try:
        sums = fisher_information(model, names, windows[:2], into=into)
    finally:
        for h in handles:
            h.remove()
    assert alive and max(alive) == 1  # each gradient was freed before the next one was produced
    ref = _reference(model, names, windows[:2], _fisher_term)
    for n in names:
        assert sums[n] is into[n] and torch.equal(into[n], ref[n])
