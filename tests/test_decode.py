"""The lean batch-1 decoder: static KV cache, greedy tokens equal to transformers' generate, compile fallback."""

import pytest
import torch
from transformers import GenerationConfig

from helpers import packed_random
from requant import decode
from requant.decode import StaticDecoder, greedy_generate, plain_greedy
from requant.errors import ConfigError
from requant.format import kernels


def _reference(model, ids, n, eos=None):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )


@pytest.mark.parametrize("packed", [False, True], ids=["fp32", "packed"])
def test_greedy_tokens_equal_transformers_generate(model, packed):
    model = packed_random(model) if packed else model
    g = torch.Generator().manual_seed(5)
    dec = StaticDecoder(model, 64)
    for p in (1, 9):  # the same decoder reused: the cache is reset per prompt
        ids = torch.randint(0, 256, (1, p), generator=g)
        ref = _reference(model, ids, 40)
        assert torch.equal(dec.generate(ids, 40), ref)


def test_generation_stops_after_eos_like_generate(model):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    free = greedy_generate(model, ids, 30)
    eos = int(free[0, 6 + 4])  # the fifth generated token becomes the EOS
    out = greedy_generate(model, ids, 30, eos_token_id=[eos, 999])
    ref = _reference(model, ids, 30, eos=eos)
    first = (free[0, 6:] == eos).nonzero()[0, 0]
    assert torch.equal(out, ref) and out.shape[1] == 6 + first + 1


def test_the_step_allocates_no_new_cache_and_refuses_overflow(model):
    dec = StaticDecoder(model, 12)
    ids = torch.randint(0, 256, (1, 5))
    dec.prefill(ids)
    keys = [layer.keys.data_ptr() for layer in dec.cache.layers]
    token = dec.token.data_ptr()
    for _ in range(7):  # positions 5..11 fill the 12-position cache
        assert dec.step().data_ptr() == token
    assert [layer.keys.data_ptr() for layer in dec.cache.layers] == keys
    with pytest.raises(ConfigError, match="cache is full"):
        dec.step()
    with pytest.raises(ConfigError, match="exceed"):
        dec.generate(ids, 8)
    with pytest.raises(ConfigError, match="compile"):
        StaticDecoder(model, 12, compile="sometimes")


def test_plain_greedy_only_without_logit_processors():
    assert plain_greedy(None) and plain_greedy(GenerationConfig(eos_token_id=2, pad_token_id=2))
    assert not plain_greedy(GenerationConfig(repetition_penalty=1.3))
    assert not plain_greedy(GenerationConfig(no_repeat_ngram_size=3))
    assert not plain_greedy(GenerationConfig(min_length=5))


def test_without_a_compiler_it_decodes_eagerly(model, monkeypatch):
    monkeypatch.setattr(decode, "compiler_available", lambda: False)
    dec = StaticDecoder(model, 20, compile="auto")  # auto: compile only where it can
    assert not dec.compiled
    ids = torch.randint(0, 256, (1, 4))
    assert torch.equal(dec.generate(ids, 8), _reference(model, ids, 8))
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        StaticDecoder(model, 20, compile="on")


def test_a_failing_compile_falls_back_to_eager(model, monkeypatch):
    monkeypatch.setattr(decode, "compiler_available", lambda: True)

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    dec = StaticDecoder(model, 20, compile="on")
    ids = torch.randint(0, 256, (1, 4))
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        out = dec.generate(ids, 6)
    assert not dec.compiled and torch.equal(out, _reference(model, ids, 6))


@pytest.mark.skipif(not decode.compiler_available() or kernels.library() is None, reason="no C++ compiler / kernels")
def test_compiled_step_with_packed_layers_as_custom_ops(model):
    """torch.compile captures the step with the packed layers as requant::packed_linear: same greedy tokens."""
    model = packed_random(model)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    dec = StaticDecoder(model, 32, compile="on")
    out = dec.generate(ids, 16)
    assert dec.compiled
    assert torch.equal(out, _reference(model, ids, 16))
