import pytest
import torch

from requant.errors import ConfigError
from requant.quantizers import LUTTensor, SqueezeLLMQuantizer
from requant.quantizers.kmeans import kmeans_sample_weights


def test_sample_weights_zero_masked_and_fall_back_per_row():
    imp = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    ex = torch.tensor([[False, True, False], [False, False, True], [False, True, False]])
    sw = kmeans_sample_weights(imp, ex, (3, 3))
    assert torch.equal(sw[0], torch.tensor([1.0, 0.0, 3.0]))
    assert torch.equal(sw[1], torch.tensor([1.0, 1.0, 0.0]))  # all-zero row: uniform over kept entries
    assert torch.equal(sw[2], torch.tensor([1.0, 0.0, 1.0]))  # only weight was excluded: same fallback


def test_fit_gives_fp16_lut_and_nearest_codes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 96, generator=g)
    imp = torch.rand(8, 96, generator=g)
    q = SqueezeLLMQuantizer(3).fit(w, importance=imp)
    assert isinstance(q, LUTTensor) and q.lut.dtype == torch.float16 and q.lut.shape == (8, 8)
    dist = (w[:, :, None] - q.lut.float()[:, None, :]).abs()
    chosen = dist.gather(2, q.codes.long()[..., None]).squeeze(2)
    assert torch.allclose(chosen, dist.min(2).values)


def test_excluded_outlier_does_not_pull_a_centroid():
    w = torch.linspace(-1, 1, 64).repeat(2, 1)
    w[0, 10] = 50.0
    ex = torch.zeros_like(w, dtype=torch.bool)
    ex[0, 10] = True
    q = SqueezeLLMQuantizer(2).fit(w, exclude=ex)
    assert q.lut[0].float().abs().max() <= 1.0 + 1e-3


def test_group_size_refused():
    with pytest.raises(ConfigError, match="group-size"):
        SqueezeLLMQuantizer(3, 64)


def test_feedback_keeps_the_tables_and_lowers_the_output_error():
    """With feedback the tables are the plain fit's; the codes trade weight error for layer-output error."""
    from requant.quantizers import LayerInputs, make_quantizer
    from requant.quantizers.base import output_error_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    inputs = LayerInputs(hessian=x.T @ x, tokens=512)
    fisher = torch.rand(24, 64, generator=g)
    plain = make_quantizer("squeezellm", 3).fit(w, importance=fisher)
    fb_q = make_quantizer("squeezellm", 3, feedback=True)
    fb = fb_q.fit(w, importance=fisher, inputs=inputs)
    assert (fb_q.uses_inputs, fb_q.sequential) == (True, True) and not make_quantizer("squeezellm", 3).uses_inputs
    assert torch.equal(fb.lut, plain.lut)
    assert not torch.equal(fb.codes, plain.codes)
    err = {
        k: float(output_error_rows(w - q.dequantize().float(), inputs.hessian).sum())
        for k, q in (("plain", plain), ("feedback", fb))
    }
    assert err["feedback"] < 0.8 * err["plain"]
    ex = torch.zeros_like(w, dtype=torch.bool)
    ex[3, 5] = True
    assert make_quantizer("squeezellm", 3, feedback=True).fit(
        w, importance=fisher, exclude=ex, inputs=inputs
    ).lut.shape == (24, 8)
    with pytest.raises(ConfigError, match="LayerInputs"):
        fb_q.fit(w, importance=fisher)
    with pytest.raises(ConfigError, match="feedback='yes'"):
        make_quantizer("squeezellm", 3, feedback="yes")
