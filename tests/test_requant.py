"""The ReQuant pipeline end to end on tiny models: budgets, Algorithm 1/2 wiring, resume."""

import pytest
import torch

import requant.pipeline as pipeline
from helpers import requant_config, tiny_llama, trained_tiny_llama
from requant.errors import ConfigError, InputError, OutputError
from requant.pipeline import quantize


def _weights(result):
    return {n: q.weight() for n, q in result.layers.items()}


def test_requant_budgets_and_disjoint_sets(tokenizer, text_file):
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


def test_resume_with_other_config_is_refused(tokenizer, text_file, tmp_path):
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
def test_bad_budgets(text_file, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        requant_config(text_file, **kw)
