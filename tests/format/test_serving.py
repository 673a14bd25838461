"""The output projection and embeddings served from 16 bits (or int8): kernels, modules, and loading."""

import pytest
import torch
import torch.nn.functional as F

import requant
from requant.config import QuantConfig
from requant.errors import ConfigError
from requant.format import kernels, save_checkpoint
from requant.format.files import read_header
from requant.format.serving import (
    DENSE_BLOCK_ROWS,
    DENSE_MAX_ROWS,
    ServedEmbedding,
    ServedLinear,
    quantize_rows_int8,
    serve_dense,
)
from requant.pipeline import quantize

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason=f"C kernels unavailable: {kernels.status()}")
SHAPES = [(1, 1), (3, 7), (17, 100), (33, 129), (8, 1100), (64, 64)]


def assert_within_tolerance(y, ref, w, x):
    """|Δy| ≤ 2e-6 · Σ|ŵ·x|: fp32 reassociation only (the QuantLinear fast path's bound)."""
    bound = x.abs() @ w.abs().T
    assert bool(((y - ref).abs() <= 2e-6 * bound + 1e-30).all()), float(((y - ref).abs() / bound).max())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_dense_kernels_widen_exactly_and_match_the_fp32_product(dtype):
    lib = kernels.library()
    for i, (out, inp) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(i)
        w32 = torch.randn(out, inp, generator=g)
        if dtype == torch.int8:
            w, scale = quantize_rows_int8(w32)
            wf = w.float() * scale[:, None]
        else:
            w, scale = w32.to(dtype).contiguous(), None
            wf = w.float()
        desc = kernels.describe_dense(w, scale)
        assert torch.equal(kernels.dequantize(lib, desc), wf)  # bit-exact widening (int8: q · s)
        for m in (1, 2, 4, 5):
            x = torch.randn(m, inp, generator=g)
            assert_within_tolerance(kernels.gemm(lib, desc, x), x @ wf.T, wf, x)


def test_int8_rows_round_to_the_nearest_step():
    w = torch.randn(40, 70) * torch.logspace(-3, 1, 40)[:, None]
    w[3] = 0
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert bool(((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-12).all())
    assert bool((q[3] == 0).all())
    assert torch.equal(q.abs().amax(1)[torch.arange(40) != 3], torch.full((39,), 127, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_served_linear_kernel_rows_and_blocked_rows(dtype, monkeypatch):
    out, inp = 2 * 70 + 3, 48
    monkeypatch.setattr("requant.format.serving.DENSE_BLOCK_ROWS", 70)  # several output blocks + a remainder
    w32 = torch.randn(out, inp)
    w, s = quantize_rows_int8(w32) if dtype == torch.int8 else (w32.half(), None)
    bias = torch.randn(out)
    mod = ServedLinear(w, s, bias)
    wf = mod.dequantize()
    for rows in (1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 3, 40):
        x = torch.randn(2, rows, inp)
        with torch.no_grad():
            y = mod(x)
        ref = F.linear(x, wf, bias)
        assert y.shape == ref.shape
        assert_within_tolerance(y - bias, ref - bias, wf, x)
    assert DENSE_BLOCK_ROWS >= 1024


def test_served_embedding_is_the_upcast_lookup_exactly():
    table = torch.randn(50, 12).half()
    ids = torch.randint(0, 50, (3, 9))
    assert torch.equal(ServedEmbedding(table)(ids), F.embedding(ids, table.float()))
    assert ServedEmbedding(table)(ids).dtype == torch.float32


def _fp16_exact(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # every value fits fp16, as after loading a 16-bit checkpoint
    return model


def test_serve_dense_keeps_one_tied_16_bit_tensor_and_the_logits(model):
    model = _fp16_exact(model)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    assert "one tensor with the embeddings" in serve_dense(model, "auto", stored_dtype=torch.float16)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, ServedLinear) and isinstance(emb, ServedEmbedding)
    assert head.weight is emb.weight and head.weight.dtype == torch.float16
    with torch.no_grad():
        y = model(ids).logits
        y1 = model(ids[:, :1]).logits  # one row: the register kernel
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(y1, y[:, :1], rtol=0, atol=1e-5)


def test_serve_dense_refuses_values_that_do_not_fit_16_bits_and_unknown_choices(model):
    with pytest.raises(ConfigError, match="not exactly representable"):
        serve_dense(model, "16bit")
    with pytest.raises(ConfigError, match="lm_head 'int4'"):
        serve_dense(model, "int4")
    assert serve_dense(model, "auto") == "as loaded"  # a plain fp32 model: nothing to serve from 16 bits
    assert serve_dense(model, "fp32") == "as loaded"


def test_int8_head_is_opt_in_and_its_error_is_bounded(model):
    model = _fp16_exact(model)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
        hidden = model.model(ids).last_hidden_state
    w = model.lm_head.weight.detach().clone()
    serve_dense(model, "int8", stored_dtype=torch.float16)
    head = model.get_output_embeddings()
    assert head.weight.dtype == torch.int8 and model.get_input_embeddings().weight.dtype == torch.float16
    with torch.no_grad():
        y = model(ids).logits
    # |Δlogit| ≤ Σ_i |x_i| · s_r / 2 (+ reassociation)
    bound = hidden.abs().sum(-1, keepdim=True) * head.scale / 2
    assert bool(((y - ref).abs() <= bound * 1.001 + 1e-5).all())
    assert not torch.equal(head.dequantize(), w)


def test_a_loaded_checkpoint_serves_the_stored_16_bit_tensors(model, tokenizer, tmp_path):
    result = quantize(model, tokenizer, QuantConfig(base="rtn", bits=3, outliers=1.0, nsamples=2, seqlen=32))
    ckpt = save_checkpoint(tmp_path / "c", model, tokenizer, result)
    stored = read_header(ckpt / "model.safetensors")["model.embed_tokens.weight"][0]
    assert stored == torch.float16
    served, _ = requant.load(ckpt)
    upcast, _ = requant.load(ckpt, lm_head="fp32")
    assert served.get_output_embeddings().weight.dtype == torch.float16
    assert torch.equal(served.get_input_embeddings().weight.float(), upcast.get_input_embeddings().weight)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, upcast(ids).logits, rtol=0, atol=1e-5)
    int8, _ = requant.load(ckpt, lm_head="int8")
    assert int8.get_output_embeddings().weight.dtype == torch.int8


def test_embedding_subclasses_are_left_alone(model):
    """A subclass may do more than a lookup (Gemma scales its embeddings): auto serves only plain modules."""

    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = _fp16_exact(model)
    scaled = Scaled(*model.model.embed_tokens.weight.shape)
    scaled.weight = model.model.embed_tokens.weight
    model.set_input_embeddings(scaled)
    done = serve_dense(model, "auto", stored_dtype=torch.float16)
    assert model.get_input_embeddings() is scaled and done.startswith("lm_head float16") and "embeddings" not in done
