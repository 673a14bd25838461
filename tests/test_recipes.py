import pytest

from helpers import tiny_llama
from requant.config import EQUAL_BITS, QuantConfig
from requant.errors import ConfigError
from requant.pipeline import quantize
from requant.recipes import equal_bits_group_size, recipe_settings


def test_equal_bits_group_size_reproduces_the_papers_choice():
    # Llama 3.2 1B (inputs 2048 / 8192): AWQ g128 = 3.25 bits; with 0.25% outliers g256 gives 3.245.
    assert equal_bits_group_size([2048, 8192], 0.25) == 256
    assert 32 / 256 + 0.0025 * 48 <= 32 / 128 < 32 / 128 + 0.0025 * 48
    # Setting R (576 / 1536): no divisor of 192 is large enough, so one group per row (the fewest bits).
    assert equal_bits_group_size([576, 1536], 0.25) is None
    assert equal_bits_group_size([576, 1536], 0.0) == 192  # without outliers: the first divisor >= 128
    assert equal_bits_group_size([576, 1536], 0.0, reference=64) == 64
    assert equal_bits_group_size([576, 1536], 0.25, reference=64) == 96  # 1/3 + 0.12 <= 1/2


def test_awq_and_gptq_recipes_ask_for_equal_bits():
    for base in ("awq", "gptq"):
        s = recipe_settings("requant", base)
        assert s["group_size"] == EQUAL_BITS and s["outliers"] == 0.25 and s["significant"] == 0.0


def test_requant_recipe_ranks_by_the_gradient_at_w_tilde_except_at_2_bits():
    for base in ("squeezellm", "rtn"):
        for bits in (None, 3, 4, 8):
            s = recipe_settings("requant", base, bits)
            assert (s["pqi_rule"], s["pqi_nodes"], s["significant"], s["step"]) == ("right", 1, 0.05, 0.025)
        s = recipe_settings("requant", base, 2)
        assert (s["pqi_rule"], s["pqi_nodes"], s["significant"], s["step"]) == ("gauss", 2, 0.05, 0.025)
    assert recipe_settings("requant", "qtip", 2) == recipe_settings("requant", "qtip")  # no width changes there
    assert recipe_settings("requant", "squeezellm", 2) is not recipe_settings("requant", "squeezellm", 2)


def test_pipeline_resolves_equal_bits_from_the_widths(tokenizer, text_file):
    model = tiny_llama(hidden=256, inter=512, layers=1)
    cfg = QuantConfig(
        base="gptq",
        bits=3,
        group_size=EQUAL_BITS,
        outliers=0.25,
        outlier_select="adaptive",
        alg1_steps=1,
        alg1_max_factor=2,
        calib=str(text_file),
        nsamples=2,
        seqlen=64,
    )
    with pytest.warns(UserWarning, match="full-rank"):
        r = quantize(model, tokenizer, cfg)
    assert r.config.group_size == 256 and all(q.dense.group_size == 256 for q in r.layers.values())
    assert r.bit_count().bits_per_weight <= 3 + 32 / 128
    with pytest.raises(ConfigError, match="group size 'g128' must be a positive integer"):
        QuantConfig(base="gptq", group_size="g128")


def _pt(name, base, bits, bpw, wiki, c4):
    return {"name": name, "base": base, "bits": bits, "bits_per_weight": bpw, "wiki:test": wiki, "c4": c4}


def test_best_point_is_the_lowest_mean_log_perplexity_within_the_budget():
    from requant.recipes import best_point

    pts = [
        _pt("a", "qtip", 3, 3.24, 24.0, 50.0),
        _pt("b", "squeezellm", 3, 3.43, 28.0, 40.0),  # worse on wiki, better on the product of both
        _pt("c", "squeezellm", 4, 4.61, 22.0, 44.0),
    ]
    assert best_point(pts, 3.3)["name"] == "a"
    assert best_point(pts, 3.43)["name"] == "b"  # 28·40 < 24·50; the budget bound is inclusive
    assert best_point(pts, 5.0)["name"] == "c"
    assert best_point(pts, 5.0, base="squeezellm", bits=3)["name"] == "b"
    assert best_point(pts, 3.2) is None and best_point(pts, 4.0, base="awq") is None


def test_best_settings_fix_how_to_quantize_not_the_calibration(tmp_path):
    import dataclasses
    import json

    from requant.cli.common import CALIBRATION
    from requant.recipes import BEST_SETTINGS, best_settings

    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    # Every setting is either fixed by the table or the user's (calibration, layers, gradient dtype).
    assert (
        set(BEST_SETTINGS)
        | set(CALIBRATION)
        | {"pqi_nsamples", "grad_dtype", "expert_min_tokens", "include", "exclude"}
        == fields
    )
    cfg = QuantConfig(base="gptq", bits=3, base_options={"grid": "lut"}, outliers=0.45, nsamples=7, seed=1)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"points": [{**_pt("g", "gptq", 3, 3.43, 26.0, 55.0), "config": cfg.to_dict()}]}))
    settings, point = best_settings(3.5, path=table)
    assert point["name"] == "g" and "nsamples" not in settings and "seed" not in settings
    assert QuantConfig(**settings) == QuantConfig(base="gptq", bits=3, base_options={"grid": "lut"}, outliers=0.45)
    with pytest.raises(ConfigError, match=r"--bits-budget 3 is below every measured configuration; allowed: ≥ 3.43"):
        best_settings(3.0, path=table)
    with pytest.raises(ConfigError, match="needs --bits-budget"):
        best_settings(None, path=table)
    with pytest.raises(ConfigError, match="no point with --base qtip"):
        best_settings(4.0, base="qtip", path=table)


def test_the_shipped_table_holds_measured_configs_with_both_texts():
    from requant.recipes import BEST_TEXTS, best_point, best_table

    table = best_table()
    assert table["setting"]["nsamples"] == 32 and len(table["points"]) >= 20
    for p in table["points"]:
        cfg = QuantConfig.from_dict(p["config"])  # every point is a valid configuration of this version
        assert (cfg.base, cfg.bits) == (p["base"], p["bits"]) and all(p[t] > 1 for t in BEST_TEXTS)
        assert cfg.bits <= p["bits_per_weight"] < cfg.bits + 1.7  # codes + tables + sparse entries
    # More bits never pick a worse point (the best within a budget is monotone in the budget).
    picks = [best_point(table["points"], b) for b in (2.25, 3.0, 3.3, 3.5, 4.0, 4.7, 32)]
    scores = [sum(__import__("math").log(p[t]) for t in BEST_TEXTS) for p in picks if p is not None]
    assert scores == sorted(scores, reverse=True)
