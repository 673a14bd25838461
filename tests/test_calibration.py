import pytest
import torch

from helpers import tiny_llama
from requant.calibration import layer_inputs, sequential_fit
from requant.config import QuantConfig
from requant.model import quantizable_layers
from requant.pipeline import quantize
from requant.quantizers import QUANTIZERS, make_quantizer
from requant.quantizers.base import output_error_rows


def names_of(model):
    return [i.name for i in quantizable_layers(model)]


def raw_inputs(model, names, windows):
    """Every input each named layer received, kept whole (the obviously-correct way, for comparison)."""
    got = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in got.items()}


def test_statistics_equal_direct_computation(model, windows):
    names = names_of(model)
    stats = layer_inputs(model, names, windows)
    # q/k/v (and gate/up) read one tensor: computed once, shared.
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.v_proj"]
    assert stats["model.layers.1.mlp.gate_proj"] is stats["model.layers.1.mlp.up_proj"]
    assert stats["model.layers.0.self_attn.q_proj"] is not stats["model.layers.0.self_attn.o_proj"]
    # The q/k/v input recomputed explicitly: the block's input (a hidden state) through its first norm.
    with torch.no_grad():
        hs = [model(input_ids=w[None], output_hidden_states=True).hidden_states for w in windows]
        for b in range(2):
            block = model.model.layers[b]
            x = torch.cat([block.input_layernorm(h[b])[0] for h in hs]).double()
            s = stats[f"model.layers.{b}.self_attn.k_proj"]
            torch.testing.assert_close(s.hessian.double(), x.T @ x, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.extra["abs_mean"].double(), x.abs().mean(0), rtol=1e-5, atol=0)
            assert s.tokens == windows.numel()
    raw = raw_inputs(model, names, windows)
    for n in names:
        x = raw[n]
        torch.testing.assert_close(stats[n].hessian.double(), x.T @ x, rtol=1e-5, atol=1e-5)
        assert torch.equal(stats[n].hessian, stats[n].hessian.T)


def test_stopping_early_changes_nothing(model, windows):
    first = [n for n in names_of(model) if n.startswith("model.layers.0.")]
    early = layer_inputs(model, first, windows)  # stops after block 0
    full = layer_inputs(model, names_of(model), windows)
    for n in first:
        assert torch.equal(early[n].hessian, full[n].hessian)


def rtn_fit(model, bits):
    q = make_quantizer("rtn", bits)
    seen = {}

    def fit(name, inputs):
        seen[name] = inputs
        return q.fit(model.get_submodule(name).weight.detach()).dequantize()

    return fit, seen


def test_sequential_identity_equals_one_pass(model, windows):
    names = names_of(model)
    seen = {}

    def identity(name, inputs):
        seen[name] = inputs
        return model.get_submodule(name).weight.detach().clone()

    sequential_fit(model, names, windows, identity)
    once = layer_inputs(model, names, windows)
    assert list(seen) == names
    for n in names:
        torch.testing.assert_close(seen[n].hessian, once[n].hessian, rtol=1e-6, atol=1e-6)


def test_sequential_propagates_the_quantized_blocks(model, windows):
    names = names_of(model)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    fit, seen = rtn_fit(model, 3)
    sequential_fit(model, names, windows, fit)
    for n in names:  # the model is left as it was
        assert torch.equal(model.get_submodule(n).weight, before[n])
    once = layer_inputs(model, names, windows)
    block0 = [n for n in names if ".layers.0." in n]
    block1 = [n for n in names if ".layers.1." in n]
    for n in block0:  # block 0 sees the embeddings: nothing quantized before it
        torch.testing.assert_close(seen[n].hessian, once[n].hessian, rtol=1e-6, atol=1e-6)
    for n in block1:
        assert not torch.allclose(seen[n].hessian, once[n].hessian, rtol=1e-3, atol=1e-3)
    # ... and block 1's statistics are exactly those of the model with block 0 quantized.
    q = make_quantizer("rtn", 3)
    with torch.no_grad():
        for n in block0:
            model.get_submodule(n).weight.copy_(q.fit(before[n]).dequantize())
    ref = layer_inputs(model, block1, windows)
    for n in block1:
        torch.testing.assert_close(seen[n].hessian, ref[n].hessian, rtol=1e-5, atol=1e-5)


def test_sequential_fits_layers_outside_blocks_last(windows):
    model = tiny_llama(tie=False)
    names = [*names_of(model), "lm_head"]
    fit, seen = rtn_fit(model, 3)
    sequential_fit(model, names, windows, fit)
    assert list(seen)[-1] == "lm_head"
    q = make_quantizer("rtn", 3)
    with torch.no_grad():
        for n in names[:-1]:
            model.get_submodule(n).weight.copy_(q.fit(model.get_submodule(n).weight).dequantize())
    ref = layer_inputs(model, ["lm_head"], windows)
    torch.testing.assert_close(seen["lm_head"].hessian, ref["lm_head"].hessian, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The pipeline passes each layer its inputs, generically


def spy(monkeypatch, base):
    calls = []
    cls = QUANTIZERS[base]
    orig = cls.fit

    def fit(self, weight, **kw):
        calls.append(kw.get("inputs"))
        return orig(self, weight, **kw)

    monkeypatch.setattr(cls, "fit", fit)
    return calls


@pytest.mark.parametrize("base", ["awq", "gptq"])
def test_pipeline_gives_every_fit_its_inputs(monkeypatch, model, tokenizer, text_file, base):
    calls = spy(monkeypatch, base)
    cfg = QuantConfig(base=base, bits=3, group_size=32, calib=str(text_file), nsamples=4, seqlen=32)
    r = quantize(model, tokenizer, cfg)
    assert len(calls) == len(r.layers) and all(c is not None and c.tokens == 4 * 32 for c in calls)
    assert r.report["calibration_inputs"] == ("sequential" if base == "gptq" else "one pass")


def test_pipeline_one_pass_inputs_are_the_fp_models(monkeypatch, model, tokenizer, text_file):
    from requant.data import text_windows

    calls = spy(monkeypatch, "awq")
    cfg = QuantConfig(base="awq", bits=3, calib=str(text_file), nsamples=3, seqlen=32)
    windows = text_windows(tokenizer, cfg.calib, 32, nsamples=3, seed=0)
    want = layer_inputs(model, names_of(model), windows)
    quantize(model, tokenizer, cfg)
    for got, n in zip(calls, names_of(model), strict=True):
        assert torch.equal(got.hessian, want[n].hessian)


def test_qtip_gets_real_hessians(monkeypatch, model, tokenizer, text_file):
    calls = spy(monkeypatch, "qtip")
    cfg = QuantConfig(
        base="qtip", bits=2, calib=str(text_file), nsamples=2, seqlen=32, include=(r"layers\.0\.self_attn\.q_proj",)
    )
    quantize(model, tokenizer, cfg)
    assert len(calls) == 1 and calls[0].hessian.shape == (64, 64) and calls[0].tokens == 64
    assert torch.linalg.matrix_rank(calls[0].hessian.double()) == 64


def test_algorithm1_scores_candidates_by_output_error(monkeypatch, model, tokenizer, text_file):
    calls = spy(monkeypatch, "gptq")
    cfg = QuantConfig(
        base="gptq",
        bits=3,
        outliers=1.0,
        outlier_select="adaptive",
        alg1_steps=2,
        alg1_max_factor=2,
        calib=str(text_file),
        nsamples=4,
        seqlen=32,
    )
    r = quantize(model, tokenizer, cfg)
    layers = len(r.layers)
    assert len(calls) > 2 * layers and all(c is not None for c in calls)
    # J at r = 0 is Σ_l tr(ΔW H ΔWᵀ) of the plain fit on the fp model's inputs.
    from requant.data import text_windows

    names = names_of(tiny_llama())
    fresh = tiny_llama()
    stats = layer_inputs(fresh, names, text_windows(tokenizer, cfg.calib, 32, nsamples=4, seed=0))
    q = make_quantizer("gptq", 3)
    j0 = 0.0
    for n in names:
        w = fresh.get_submodule(n).weight.detach()
        j0 += float(output_error_rows(w - q.fit(w, inputs=stats[n]).dequantize(), stats[n].hessian).sum())
    assert r.report["algorithm1"]["objective_no_outliers"] == pytest.approx(j0, rel=1e-6)
    assert r.report["algorithm1"]["objective"] < j0


def test_sequential_propagates_the_final_weights_outliers_included(monkeypatch, model, tokenizer, text_file):
    import requant.pipeline as pipeline

    propagated = {}
    real = pipeline.sequential_fit

    def recording(model, names, windows, fit, **kw):
        def fit_and_record(name, inputs):
            propagated[name] = fit(name, inputs)
            return propagated[name]

        return real(model, names, windows, fit_and_record, **kw)

    monkeypatch.setattr(pipeline, "sequential_fit", recording)
    cfg = QuantConfig(
        base="gptq", bits=3, outliers=1.0, outlier_select="iqr", calib=str(text_file), nsamples=4, seqlen=32
    )
    r = quantize(model, tokenizer, cfg)
    assert r.report["sparse"]["outlier_entries"] > 0
    for n, q in r.layers.items():
        assert torch.equal(propagated[n], q.weight())


def test_too_few_tokens_warns(model, tokenizer, text_file):
    cfg = QuantConfig(base="gptq", bits=3, calib=str(text_file), nsamples=1, seqlen=16)
    with pytest.warns(UserWarning, match="16 calibration tokens cannot give a full-rank Hessian for (64|96) inputs"):
        r = quantize(model, tokenizer, cfg)
    assert all(torch.isfinite(q.weight()).all() for q in r.layers.values())


def test_methods_without_inputs_get_none(monkeypatch, model, tokenizer, text_file):
    calls = spy(monkeypatch, "rtn")
    quantize(model, tokenizer, QuantConfig(base="rtn", bits=3, calib=str(text_file)))
    assert calls and all(c is None for c in calls)
