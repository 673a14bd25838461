"""The fused batch-1 decode step (requant.fused): logits equal to the model's forward at every step, greedy tokens
equal to the static decoder's, the self-check's fallback, and the structures it refuses."""

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM, Qwen2Config, Qwen2ForCausalLM

from helpers import packed_random, tiny_llama
from requant.decode import FusedDecoder, StaticDecoder, make_decoder
from requant.errors import ConfigError
from requant.format import kernels
from requant.format.serving import serve_dense
from requant.fused import Unsupported

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C kernels")


def _qwen2():
    torch.manual_seed(1)
    cfg = Qwen2Config(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _llama3_rope():
    m = tiny_llama(3)
    cfg = m.config
    cfg.rope_scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 10000.0,
    }
    from transformers import LlamaForCausalLM

    new = LlamaForCausalLM(cfg).eval()
    new.load_state_dict(m.state_dict())
    return new


def _int8_head():
    m = tiny_llama(tie=False)
    serve_dense(m, "int8")
    return m


MODELS = {
    "llama-fp32": lambda: tiny_llama(),
    "llama-packed-lut3": lambda: packed_random(tiny_llama()),
    "llama-packed-lut2": lambda: packed_random(tiny_llama(), bits=2),
    "llama-packed-lut4": lambda: packed_random(tiny_llama(), bits=4),
    "llama-packed-uniform3": lambda: packed_random(tiny_llama(), bits=3, kind="uniform"),
    "llama-packed-trellis2": lambda: packed_random(tiny_llama(), bits=2, kind="trellis"),
    "llama-packed-awq4": lambda: packed_random(tiny_llama(inter=256, hidden=256), bits=4, kind="awq"),
    "llama-int8-head": lambda: _int8_head(),
    "llama3-rope": _llama3_rope,
    "qwen2-bias-untied-gqa4": _qwen2,
}


def _model(name):
    return MODELS[name]()


@pytest.mark.parametrize("name", list(MODELS))
def test_each_step_matches_the_model_forward(name):
    """Teacher-forced: the fused step's logits equal the model's own forward on the same cache, every step."""
    model = _model(name)
    g = torch.Generator().manual_seed(7)
    vocab = model.get_output_embeddings().out_features
    ref, fused = StaticDecoder(model, 48), FusedDecoder(model, 48)
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (1, 9), generator=g)
        ref.prefill(prompt)
        fused.prefill(prompt)
        for t in torch.randint(0, vocab, (38,), generator=g).tolist():
            ref.token.fill_(t)
            fused.token.fill_(t)
            want = ref._run_step()[0]
            ref.position += 1
            fused.step()
            scale = want.abs().max().item()
            assert (fused.logits - want).abs().max().item() <= 1e-4 * (1 + scale), name  # fp32 reassociation
    assert fused.fused and fused.checked


@pytest.mark.parametrize("name", ["llama-fp32", "llama-packed-lut3", "qwen2-bias-untied-gqa4"])
def test_greedy_tokens_equal_the_static_decoder(name):
    model = _model(name)
    g = torch.Generator().manual_seed(5)
    vocab = model.get_output_embeddings().out_features
    static, fused = StaticDecoder(model, 64), FusedDecoder(model, 64)
    for p in (1, 9):  # one decoder reused: the cache is reset per prompt
        ids = torch.randint(0, vocab, (1, p), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fused.generate(ids, 40), static.generate(ids, 40))
    assert fused.fused


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_tokens(threads):
    model = packed_random(tiny_llama())
    ids = torch.arange(5)[None]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = FusedDecoder(model, 120).generate(ids, 100)  # > 64 keys × heads: attention runs heads in parallel
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out, StaticDecoder(model, 120).generate(ids, 100))


def test_a_model_with_the_layout_but_other_arithmetic_falls_back():
    """Granite has Llama's module layout but multipliers on embeddings, residuals and scores: the self-check sees
    the blocks' output differ, warns once, and the tokens are still the model's own."""
    torch.manual_seed(2)
    cfg = GraniteConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
        logits_scaling=1.0,
        initializer_range=0.1,
    )
    model = GraniteForCausalLM(cfg).eval()
    ids = torch.arange(6)[None]
    dec = FusedDecoder(model, 40)
    with pytest.warns(RuntimeWarning, match="fused decode step off.*differ"):
        out = dec.generate(ids, 20)
    assert not dec.fused
    assert torch.equal(out, StaticDecoder(model, 40).generate(ids, 20))
    model.config.logits_scaling = 2.0  # a change after the head: refused up front, auto takes the static decoder
    with pytest.raises(Unsupported, match="logits_scaling"):
        FusedDecoder(model, 40)
    assert type(make_decoder(model, 40)) is StaticDecoder


def test_other_structures_are_refused_and_auto_picks_the_static_decoder():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    with pytest.raises(Unsupported, match="activation"):
        FusedDecoder(gpt2, 32)
    assert type(make_decoder(gpt2, 32, "auto")) is StaticDecoder
    assert type(make_decoder(tiny_llama(), 32, "auto")) is FusedDecoder
    with pytest.raises(ConfigError, match="fused"):
        make_decoder(gpt2, 32, "fused")


def test_a_full_cache_is_refused():
    dec = FusedDecoder(tiny_llama(), 8)
    dec.prefill(torch.arange(6)[None])
    dec.step()
    dec.step()
    with pytest.raises(ConfigError, match="full"):
        dec.step()


def _big_vocab(dtype=torch.float16, tie=True):
    """A tiny Llama with a vocabulary large enough for the int8 screen, its head served in `dtype` (as loaded)."""
    model = tiny_llama(4, vocab=_screen_rows() + 904, tie=tie)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[7] = head.weight[3]  # an exact tie: the first of the two rows must win, as in torch.argmax
        for p in model.parameters():  # a checkpoint's values: exactly representable in the stored dtype
            p.copy_(p.to(dtype).float())
    if dtype != torch.float32:
        serve_dense(model, "auto", stored_dtype=dtype)
    return model


def _screen_rows():
    from requant.fused import SCREEN_MIN_ROWS

    return SCREEN_MIN_ROWS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_int8_screen_returns_the_heads_own_argmax(dtype):
    """Every step runs twice on the same cache slot: screened and exact; the tokens must be identical (the screen
    recomputes every row it cannot rule out), including the tie between rows 3 and 7."""
    model = _big_vocab(dtype)
    dec = FusedDecoder(model, 80)
    step = dec.fused_step
    assert step.screen_desc is not None
    g = torch.Generator().manual_seed(11)
    vocab = step.desc.vocab
    with torch.inference_mode():
        dec.prefill(torch.randint(0, vocab, (1, 5), generator=g))
        for pos in range(5, 75):
            tok = int(torch.randint(0, vocab, (1,), generator=g)) if pos % 3 else 3
            screened = step.run(tok, pos)
            exact = step.run(tok, pos, exact=True)
            assert screened == exact == int(torch.argmax(step.logits)), pos


def test_greedy_with_the_screen_equals_the_static_decoder():
    model = _big_vocab(torch.float16, tie=False)
    ids = torch.arange(1, 8)[None]
    out = FusedDecoder(model, 72).generate(ids, 64)
    assert torch.equal(out, StaticDecoder(model, 72).generate(ids, 64))


def test_the_screen_keeps_the_first_of_tied_maxima():
    model = _big_vocab(torch.float16, tie=False)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.copy_(head.weight[5].expand_as(head.weight))  # every logit equal: argmax is row 0
    dec = FusedDecoder(model, 16)
    with torch.inference_mode():
        dec.prefill(torch.arange(3)[None])
        assert dec.fused_step.run(9, 3) == dec.fused_step.run(9, 3, exact=True) == 0


def test_out_of_range_tokens_and_positions_are_refused_by_the_step():
    dec = FusedDecoder(tiny_llama(), 16)
    dec.prefill(torch.arange(3)[None])
    for token, pos in ((257, 3), (-1, 3), (5, 16), (5, -1)):
        with pytest.raises(ValueError, match="out of range"):
            dec.fused_step.run(token, pos)
