import pytest
import torch

from helpers import requant_config
from requant.config import QuantConfig
from requant.errors import ConfigError, NumericalError
from requant.eval import evaluate
from requant.loading import load_model
from requant.model import quantizable_layers
from requant.pipeline import compute_fisher, quantize


def test_budgets_are_met_and_disjoint(model, tokenizer, text_file):
    cfg = QuantConfig(
        base="squeezellm",
        bits=3,
        outliers=0.45,
        significant=0.05,
        calib=str(text_file),
        nsamples=2,
        seqlen=32,
    )
    r = quantize(model, tokenizer, cfg)
    total = sum(q.info.numel for q in r.layers.values())
    info = r.report["sparse"]
    assert info["outlier_entries"] <= round(0.0045 * total)
    assert info["outlier_entries"] >= round(0.0045 * total) * 0.9
    assert r.bit_count().sparse_entries == info["outlier_entries"] + info["sensitive_entries"]


def test_weights_in_model_equal_reconstruction(model, tokenizer, text_file):
    r = quantize(model, tokenizer, QuantConfig(base="rtn", bits=4, group_size=32, calib=str(text_file)))
    for name, q in r.layers.items():
        assert torch.equal(model.get_submodule(name).weight, q.weight())


def test_more_bits_lower_perplexity(tokenizer, text_file, windows):
    from helpers import tiny_llama

    ppl = {}
    for bits in (2, 4, 8):
        m = tiny_llama()
        quantize(m, tokenizer, QuantConfig(base="rtn", bits=bits, calib=str(text_file)))
        ppl[bits] = evaluate(m, windows).perplexity
    fp = evaluate(tiny_llama(), windows).perplexity
    assert ppl[2] > ppl[4] > ppl[8] and abs(ppl[8] - fp) / fp < 0.01


def test_bad_inputs(model, tokenizer):
    with pytest.raises(ConfigError, match="leaves no dense weights"):
        QuantConfig(outliers=60, significant=40)
    with pytest.raises(ConfigError, match="group size 48 does not divide the input width 64"):
        quantize(model, tokenizer, QuantConfig(base="rtn", bits=3, group_size=48))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"model.layers.1.mlp.up_proj"):
        quantize(model, tokenizer, QuantConfig(base="rtn", bits=3))


def test_sym_reaches_the_quantizer(tokenizer, text_file):
    """--sym used to be recorded in the config but never passed on: the layers came out asymmetric."""
    cfg = QuantConfig(base="rtn", bits=4, group_size=32, sym=True, calib=str(text_file))
    from helpers import tiny_llama

    r = quantize(tiny_llama(), tokenizer, cfg)
    assert all(q.dense.zero is None for q in r.layers.values())
    assert r.report["quantizer"]["sym"] is True
    asym = quantize(tiny_llama(), tokenizer, QuantConfig(base="rtn", bits=4, group_size=32, calib=str(text_file)))
    assert all(q.dense.zero is not None for q in asym.layers.values())
    with pytest.raises(ConfigError, match="rtn, gptq"):
        QuantConfig(base="squeezellm", sym=True)


def test_bf16_gradient_passes_leave_every_other_tensor_bit_exact(model, tokenizer, text_file):
    """bf16 Fisher/PQI passes cast the model and back: nothing may stay rounded to bf16 (norms, embeddings,
    buffers), and the master weights the pipeline reads must be the fp32 originals."""
    before = {k: t.clone() for k, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items()}
    names = [i.name for i in quantizable_layers(model)]
    cfg = requant_config(text_file, grad_dtype="bf16")
    compute_fisher(model, tokenizer, cfg, names)
    for k, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
        assert t.dtype == before[k].dtype and torch.equal(t, before[k]), k
    r = quantize(model, tokenizer, cfg)
    assert r.report["sparse"]["significant_entries"] > 0  # the PQI passes ran
    quantized = {f"{n}.weight" for n in names}
    for k, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
        if k not in quantized:
            assert torch.equal(t, before[k]), k
    # sparse entries hold fp16(w − dense) of the fp32 original w, not of a bf16-rounded copy
    for n, q in r.layers.items():
        w, dense = before[f"{n}.weight"].flatten(), q.dense.dequantize().flatten()
        i = q.sparse.index
        err = (q.weight().flatten()[i] - w[i]).abs()
        assert (err <= 2.0**-11 * (w[i] - dense[i]).abs() + 1e-7).all(), n


def test_bf16_gradient_passes_refused_when_offloaded(model_dir, text_file, tmp_path):
    model, tok = load_model(model_dir, offload=tmp_path / "off")
    with pytest.raises(ConfigError, match="--grad-dtype bf16 is not supported with --offload"):
        quantize(model, tok, requant_config(text_file, grad_dtype="bf16"))
