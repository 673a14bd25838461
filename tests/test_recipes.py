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
