"""--widen-bits: per-layer code widths planned from the Fisher-weighted error, through the pipeline and the format."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import byte_tokenizer, tiny_llama, word_text
from requant.config import QuantConfig
from requant.errors import CheckpointError, ConfigError
from requant.format import load_checkpoint, load_quantized, save_checkpoint, set_kernel_mode
from requant.pipeline import quantize
from requant.widths import fisher_error, plan_widths


def test_plan_takes_the_best_gain_per_bit_that_still_fits():
    gain = {"a": 10.0, "b": 9.0, "c": 1.0, "d": -1.0, "e": 3.0}
    cost = {"a": 10, "b": 3, "c": 1, "d": 1, "e": 4}
    # per bit: b 3.0, a 1.0, c 1.0 (a is earlier), e 0.75, d < 0 (never)
    assert plan_widths(gain, cost, 100) == ["b", "a", "c", "e"]
    assert plan_widths(gain, cost, 12) == ["b", "c", "e"]  # a does not fit after b; smaller ones still do
    assert plan_widths(gain, cost, 0) == []
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        gains = {str(i): float(x) for i, x in enumerate(torch.randn(12, generator=g))}
        costs = {str(i): int(c) for i, c in enumerate(torch.randint(1, 50, (12,), generator=g))}
        room = int(torch.randint(0, 300, (1,), generator=g))
        chosen = plan_widths(gains, costs, room)
        assert sum(costs[n] for n in chosen) <= room and all(gains[n] > 0 for n in chosen)
        left = room - sum(costs[n] for n in chosen)
        assert all(costs[n] > left for n in gains if n not in chosen and gains[n] > 0)  # nothing else fits


def test_fisher_error_is_the_weighted_square():
    w, r, f = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.5]]), torch.tensor([[2.0, 4.0]])
    assert fisher_error(w, r, f) == pytest.approx(2 * 0.25 + 4 * 0.25)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "t.txt"
    word_text(text, seed=5)
    cfg = QuantConfig(base="squeezellm", bits=3, outliers=0.5, significant=0.1, calib=str(text), nsamples=2, seqlen=32)
    tok = byte_tokenizer()
    out = {}
    for widen in (0.0, 0.3):
        model = tiny_llama()
        out[widen] = (model, tok, quantize(model, tok, replace(cfg, widen_bits=widen)))
    return out


def test_widened_layers_get_one_bit_more_within_the_budget(runs):
    _, _, narrow = runs[0.0]
    _, _, mixed = runs[0.3]
    w = mixed.report["widths"]
    assert "widths" not in narrow.report and w["bits"] == 4 and 0 < len(w["layers"]) < len(mixed.layers)
    for n, q in mixed.layers.items():
        assert q.dense.bits == (4 if n in w["layers"] else 3)
    extra = mixed.bit_count().bits_per_weight - narrow.bit_count().bits_per_weight
    assert 0 < extra <= 0.3 and extra == pytest.approx(w["extra_bits_per_weight"], abs=1e-9)
    assert w["fisher_error"]["planned"] < w["fisher_error"]["narrow"]
    numel = {n: q.info.numel for n, q in mixed.layers.items()}
    assert w["share"] == pytest.approx(sum(numel[n] for n in w["layers"]) / sum(numel.values()))
    assert mixed.report["sparse"]["sparse_percent"] == pytest.approx(0.6, abs=0.01)  # the sparse budget is kept


def test_a_mixed_width_checkpoint_round_trips(runs, tmp_path):
    model, tok, result = runs[0.3]
    ckpt = save_checkpoint(tmp_path / "mixed", model, tok, result, dense="fp32")
    loaded, _ = load_quantized(ckpt)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    set_kernel_mode(loaded, "reference")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    _, _, back = load_checkpoint(ckpt)
    assert back.bit_count() == result.bit_count()
    plain = AutoModelForCausalLM.from_pretrained(ckpt)  # transformers builds each layer at its stored width
    set_kernel_mode(plain, "reference")
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    # The summary check still refuses a layer stored at a width the config does not allow.
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["config"]["widen_bits"] = 0.0
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="stored with 4 bits"):
        load_checkpoint(ckpt)


def test_bad_widths_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"bits \+ 1 = 5"):
        QuantConfig(bits=4, widen_bits=0.2)
    with pytest.raises(ConfigError, match=r"widen bits -0\.1"):
        QuantConfig(widen_bits=-0.1)
    assert QuantConfig(base="rtn", widen_bits=0.2).needs_fisher  # the plan weighs errors by the Fisher


@pytest.mark.parametrize("base", ["squeezellm", "qtip"])
def test_the_dense_fit_takes_the_plans_fits_when_it_excludes_nothing(base, monkeypatch, tmp_path):
    """Detached entries only: the dense fit would repeat the width plan's fit, so it reuses it — bit-identical to
    fitting again (the plan's fits dropped), and with no layer fitted a third time."""
    import requant.pipeline as pipeline

    text = tmp_path / "t.txt"
    word_text(text, seed=7)
    cfg = QuantConfig(
        base=base, bits=2, significant=0.2, significant_select="pqi", step=0.1, pqi_nodes=1, pqi_rule="right",
        widen_bits=0.3, calib=str(text), nsamples=2, seqlen=32,
    )  # fmt: skip
    fitted: list[int] = []
    real_fit, real_widen = pipeline.fit_dense, pipeline.widen_layers

    def counting_fit(quantizer, weights, **kw):
        fitted.append(len(weights))
        return real_fit(quantizer, weights, **kw)

    def forgetful_widen(run):
        real_widen(run)
        assert len(run.planned) == len(run.layers)
        run.planned = {}

    monkeypatch.setattr(pipeline, "fit_dense", counting_fit)
    tok = byte_tokenizer()
    reused = quantize(tiny_llama(), tok, cfg)
    assert fitted == [0]  # the dense stage fitted no layer
    monkeypatch.setattr(pipeline, "widen_layers", forgetful_widen)
    again = quantize(tiny_llama(), tok, cfg)
    assert fitted[1] == len(again.layers)
    assert 0 < len(reused.report["widths"]["layers"]) < len(reused.layers)
    for n, q in reused.layers.items():
        assert torch.equal(q.dense.dequantize(), again.layers[n].dense.dequantize()), n
        assert torch.equal(q.sparse.index, again.layers[n].sparse.index), n
        assert torch.equal(q.sparse.value, again.layers[n].sparse.value), n
