"""The pipeline end to end on tiny models: the D&S baseline and ReQuant (Algorithms 1 and 2), budgets, the report,
gradient dtypes, resume."""

from dataclasses import replace

import pytest
import torch

import requant.pipeline as pipeline
from helpers import requant_config, tiny_llama, trained_tiny_llama
from requant.config import QuantConfig
from requant.errors import ConfigError, InputError, NumericalError, OutputError
from requant.eval import evaluate
from requant.loading import load_model
from requant.model import quantizable_layers
from requant.pipeline import compute_fisher, quantize


def test_dns_budgets_are_met_and_sparse_sets_disjoint(model, tokenizer, text_file):
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


def test_weights_in_the_model_equal_the_reconstruction(model, tokenizer, text_file):
    r = quantize(model, tokenizer, QuantConfig(base="rtn", bits=4, group_size=32, calib=str(text_file)))
    for name, q in r.layers.items():
        assert torch.equal(model.get_submodule(name).weight, q.weight())


def test_more_bits_give_lower_perplexity(tokenizer, text_file, windows):
    from helpers import tiny_llama

    ppl = {}
    for bits in (2, 4, 8):
        m = tiny_llama()
        quantize(m, tokenizer, QuantConfig(base="rtn", bits=bits, calib=str(text_file)))
        ppl[bits] = evaluate(m, windows).perplexity
    fp = evaluate(tiny_llama(), windows).perplexity
    assert ppl[2] > ppl[4] > ppl[8] and abs(ppl[8] - fp) / fp < 0.01


def test_bad_models_are_refused_by_name(model, tokenizer):
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


# ReQuant: Algorithm 1 outliers, Algorithm 2 detach, resume


def _weights(result):
    return {n: q.weight() for n, q in result.layers.items()}


def test_requant_budgets_are_met_and_sets_disjoint(tokenizer, text_file):
    model = tiny_llama()
    r = quantize(model, tokenizer, requant_config(text_file))
    total = sum(q.info.numel for q in r.layers.values())
    sp = r.report["sparse"]
    assert sp["outlier_entries"] <= round(0.01 * total)
    assert sp["significant_entries"] == round(0.005 * total)
    assert r.bit_count().sparse_entries == sp["outlier_entries"] + sp["significant_entries"]
    assert r.report["detach_steps"] == [round(0.0025 * total), round(0.005 * total) - round(0.0025 * total)]
    assert len(r.report["pqi_passes"]) == 2
    # significant entries hold the original weights (fp16 residual): detaching lowered the PQI-predicted loss
    assert r.report["pqi_passes"][1]["predicted_dF"] < r.report["pqi_passes"][0]["predicted_dF"]
    percents = r.report["algorithm1"]["percent_per_layer"]
    assert len(set(percents.values())) > 1  # ratios differ per layer


def test_block_granularity_shares_a_ratio(tokenizer, text_file):
    cfg = requant_config(text_file, significant=0.0, step=None, alg1_granularity="block")
    r = quantize(tiny_llama(), tokenizer, cfg)
    pct = r.report["algorithm1"]["candidate_per_layer"]
    for block in (0, 1):
        vals = {round(v, 6) for n, v in pct.items() if f"layers.{block}." in n}
        assert len(vals) == 1


def test_requant_beats_random_on_calibration_loss(tokenizer, text_file):
    from requant.data import text_windows
    from requant.eval import evaluate

    win = text_windows(tokenizer, str(text_file), 32, nsamples=2, seed=0)
    ppl = {}
    for sel in ("adaptive", "random"):
        m = trained_tiny_llama(text_file.read_text())
        sig = "pqi" if sel == "adaptive" else "random"
        quantize(m, tokenizer, requant_config(text_file, outlier_select=sel, significant_select=sig, bits=2))
        ppl[sel] = evaluate(m, win).perplexity
    assert ppl["adaptive"] < ppl["random"]


def test_resume_after_interruption_is_bit_identical(tokenizer, text_file, tmp_path, monkeypatch):
    cfg = requant_config(text_file)
    ref = _weights(quantize(tiny_llama(), tokenizer, cfg))
    real = pipeline.post_quantization_integral
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during the second detach step
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "post_quantization_integral", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_llama(), tokenizer, cfg, workdir=tmp_path / "w")
    monkeypatch.setattr(pipeline, "post_quantization_integral", real)
    r = quantize(tiny_llama(), tokenizer, cfg, workdir=tmp_path / "w", resume=True)
    assert set(r.report["resumed_stages"]) >= {"fisher", "alg1", "dense", "detach"}
    got = _weights(r)
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_out_of_disk_leaves_no_corrupt_stage_and_resume_works(tokenizer, text_file, tmp_path, monkeypatch):
    """ENOSPC while storing the second detach step: one clear error, the stale step-1 stage is not kept as if
    it were step 2, and --resume finishes bit-identical to an uninterrupted run."""
    import errno

    import requant.workdir as workdir

    cfg = requant_config(text_file)
    ref = _weights(quantize(tiny_llama(), tokenizer, cfg))
    real = workdir.save_file
    calls = {"detach": 0}

    def full_disk(tensors, path):
        if ".detach." in str(path):
            calls["detach"] += 1
            if calls["detach"] == 2:
                real(tensors, path)  # a partial file is on disk when the error comes
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(workdir, "save_file", full_disk)
    with pytest.raises(OutputError, match=r"no space left on .* while writing '.*detach.safetensors'.*--resume"):
        quantize(tiny_llama(), tokenizer, cfg, workdir=tmp_path / "w")
    w = tmp_path / "w"
    assert not (w / "detach.json").exists() and not list(w.glob(".detach.*"))  # no stage, no temporary
    assert (w / "dense.json").exists()
    monkeypatch.setattr(workdir, "save_file", real)
    r = quantize(tiny_llama(), tokenizer, cfg, workdir=w, resume=True)
    assert "dense" in r.report["resumed_stages"] and "detach" not in r.report["resumed_stages"]
    got = _weights(r)
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_resume_with_another_config_is_refused(tokenizer, text_file, tmp_path):
    quantize(tiny_llama(), tokenizer, requant_config(text_file, significant=0.0, step=None), workdir=tmp_path / "w")
    with pytest.raises(InputError, match=r"different settings.*bits"):
        quantize(
            tiny_llama(),
            tokenizer,
            requant_config(text_file, bits=4, significant=0.0, step=None),
            workdir=tmp_path / "w",
            resume=True,
        )


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"significant": 0.05, "step": 0.1}, "detach step 0.1 must be in"),
        ({"significant": 0.05, "step": 0.0}, "detach step 0.0 must be in"),
        ({"outliers": 99.0, "significant": 1.0}, "leaves no dense weights"),
        ({"pqi_rule": "simpson"}, "PQI rule 'simpson'"),
        ({"pqi_nodes": 0}, "PQI nodes 0"),
        ({"alg1_objective": "hessian"}, "Algorithm 1 objective 'hessian'"),
    ],
)
def test_bad_budgets_are_refused_by_name(text_file, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        requant_config(text_file, **kw)


def test_the_report_keeps_its_json_keys(tokenizer, text_file):
    """Checkpoints store the report and --json prints it: its keys are a contract."""
    r = quantize(tiny_llama(), tokenizer, requant_config(text_file))
    assert list(r.report) == [
        "pqi_passes",
        "algorithm1",
        "detach_steps",
        "timings",
        "bits",
        "sparse",
        "layers",
        "quantizer",
        "calibration_inputs",
        "resumed_stages",
        "world_size",
        "coverage",
    ]
    assert r.report["coverage"]["summary"] == "quantized 100.0% of block weights (7 of 7 matrices in each block)"
    assert {"fisher_s", "outliers_s", "dense_fit_s", "significant_s", "pqi_s", "total_s"} <= set(r.report["timings"])
    assert [p["what"] for p in r.report["pqi_passes"]] == ["detach"] * len(r.report["detach_steps"])
    plain = quantize(tiny_llama(), tokenizer, QuantConfig(base="rtn", bits=4, calib=str(text_file)))
    assert "pqi_passes" not in plain.report and "algorithm1" not in plain.report
    assert plain.report["sparse"] == {
        "sensitive_entries": 0,
        "outlier_entries": 0,
        "significant_entries": 0,
        "sparse_percent": 0.0,
        "values": "restore",
    }


def test_calibration_draws_each_window_set_once_and_as_a_fresh_draw_would(tokenizer, text_file):
    from requant.data import text_windows
    from requant.pipeline import Calibration, Timings

    def fresh(n):
        return text_windows(tokenizer, str(text_file), 32, nsamples=n, seed=0)

    same = Calibration(tiny_llama(), tokenizer, requant_config(text_file, nsamples=3), [], Timings())
    assert same.pqi_windows() is same.windows() and torch.equal(same.windows(), fresh(3))
    fewer = Calibration(tiny_llama(), tokenizer, requant_config(text_file, nsamples=3, pqi_nsamples=2), [], Timings())
    assert torch.equal(fewer.pqi_windows(), fresh(2)) and torch.equal(fewer.windows(), fresh(3))


def test_squeezellm_with_feedback_runs_sequentially_and_lowers_the_output_error(tokenizer, text_file):
    """SqueezeLLM's tables with GPTQ rounding: fitted block by block on calibration inputs, same bits as plain
    SqueezeLLM, and a lower layer-output error than the nearest-entry rounding on every layer."""
    from requant.calibration import layer_inputs
    from requant.quantizers.base import output_error_rows

    common = dict(base="squeezellm", bits=3, calib=str(text_file), nsamples=4, seqlen=32)
    runs = {}
    for fb in (False, True):
        model = tiny_llama()
        ref = {i.name: model.get_submodule(i.name).weight.detach().clone() for i in quantizable_layers(model)}
        r = quantize(model, tokenizer, QuantConfig(**common, base_options={"feedback": True} if fb else {}))
        runs[fb] = (r, ref)
    (plain, ref), (fb, _) = runs[False], runs[True]
    assert fb.report["calibration_inputs"] == "sequential" and plain.report["calibration_inputs"] is None
    assert fb.bit_count().bits_per_weight == plain.bit_count().bits_per_weight
    model = tiny_llama()
    cfg = QuantConfig(**common)
    windows = pipeline.text_windows(tokenizer, cfg.calib, cfg.seqlen, nsamples=cfg.nsamples, seed=cfg.seed)
    names = [i.name for i in quantizable_layers(model)]
    h = {n: x.hessian for n, x in layer_inputs(model, names, windows).items()}
    first = names[0]  # the first layer's inputs are the fp model's in both runs
    errs = [
        float(output_error_rows(ref[first] - r.layers[first].weight().float(), h[first]).sum()) for r in (plain, fb)
    ]
    assert errs[1] < errs[0]


def test_fisher_objective_of_algorithm1_over_rtn(tokenizer, text_file):
    """RTN fits no importance, yet Algorithm 1's fisher objective computes the Fisher and scores by it."""
    cfg = dict(base="rtn", bits=3, outliers=1.0, outlier_select="adaptive", alg1_steps=2, calib=str(text_file))
    runs = {
        o: quantize(tiny_llama(), tokenizer, QuantConfig(**cfg, alg1_objective=o, nsamples=2, seqlen=32))
        for o in ("base", "fisher")
    }
    assert "fisher_s" in runs["fisher"].report["timings"] and "fisher_s" not in runs["base"].report["timings"]
    a, b = (runs[o].report["algorithm1"]["objective_no_outliers"] for o in ("base", "fisher"))
    assert a != b  # the same dense fit, scored with and without the Fisher's weights
    for r in runs.values():
        assert r.report["sparse"]["outlier_entries"] <= round(0.01 * sum(q.info.numel for q in r.layers.values()))


def test_fitted_sparse_values_keep_the_positions_and_lower_every_layers_output_error(tokenizer, text_file):
    """--sparse-values fit: the same dense part and sparse positions as restoring (the fit comes after every
    selection), values solved on the fp model's layer inputs, a lower output error on every layer."""
    from requant.calibration import layer_inputs
    from requant.sparse.values import output_error

    cfg = requant_config(text_file, base="rtn", bits=3)
    runs = {}
    for values in ("restore", "fit"):
        model = tiny_llama()
        ref = {i.name: model.get_submodule(i.name).weight.detach().clone() for i in quantizable_layers(model)}
        runs[values] = quantize(model, tokenizer, replace(cfg, sparse_values=values))
    restore, fit = runs["restore"], runs["fit"]
    assert fit.report["sparse"]["values"] == "fit" and "output_error" not in restore.report["sparse"]
    reported = fit.report["sparse"]["output_error"]
    assert reported["fit"] < reported["restore"]
    windows = pipeline.text_windows(tokenizer, cfg.calib, cfg.seqlen, nsamples=cfg.nsamples, seed=cfg.seed)
    h = {n: x.hessian for n, x in layer_inputs(tiny_llama(), list(ref), windows).items()}
    for n, q in fit.layers.items():
        r = restore.layers[n]
        assert torch.equal(q.dense.dequantize(), r.dense.dequantize())
        assert torch.equal(q.sparse.index, r.sparse.index)
        assert output_error(ref[n], q.weight(), h[n]) <= output_error(ref[n], r.weight(), h[n]) * (1 + 1e-6)
    total = sum(output_error(ref[n], q.weight(), h[n]) for n, q in fit.layers.items())
    assert total == pytest.approx(reported["fit"], rel=1e-6)


def test_detach_refit_refits_the_dense_part_without_every_sparse_entry(tokenizer, text_file, tmp_path):
    """--detach-refit: the same sparse positions (chosen before the refit), the dense part equal to the base's fit
    with all of them left out, stored as its own stage; without detached entries it is refused."""
    from requant.quantizers import make_quantizer

    cfg = requant_config(text_file, base="rtn", bits=3)
    plain = quantize(tiny_llama(), tokenizer, cfg)
    model = tiny_llama()
    ref = {i.name: model.get_submodule(i.name).weight.detach().clone() for i in quantizable_layers(model)}
    refit = quantize(model, tokenizer, replace(cfg, detach_refit=True), workdir=tmp_path / "w")
    assert "refit_s" in refit.report["timings"] and (tmp_path / "w" / "refit.json").is_file()
    q = make_quantizer("rtn", 3)
    changed = 0
    for n, layer in refit.layers.items():
        mask = layer.sparse.mask()
        assert torch.equal(mask, plain.layers[n].sparse.mask())
        assert torch.equal(layer.dense.dequantize(), q.fit(ref[n], exclude=mask).dequantize())
        changed += not torch.equal(layer.dense.dequantize(), plain.layers[n].dense.dequantize())
    assert changed  # rows with detached entries got new scales
    with pytest.raises(ConfigError, match="detach refit needs detached entries"):
        replace(cfg, significant_select="fisher", detach_refit=True)


def test_detach_refit_of_an_importance_weighted_base_keeps_its_fisher(tokenizer, text_file):
    """SqueezeLLM's refit is weighted by the same Fisher as its first fit (not plain k-means)."""
    from requant.quantizers import make_quantizer

    cfg = replace(requant_config(text_file), detach_refit=True)
    model = tiny_llama()
    names = [i.name for i in quantizable_layers(model)]
    ref = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    fisher = compute_fisher(model, tokenizer, cfg, names)
    r = quantize(model, tokenizer, cfg, fisher=fisher)
    q = make_quantizer("squeezellm", 3)
    for n in names[:3]:
        mask = r.layers[n].sparse.mask()
        expect = q.fit(ref[n], importance=fisher[n], exclude=mask).dequantize()
        assert torch.equal(r.layers[n].dense.dequantize(), expect)
