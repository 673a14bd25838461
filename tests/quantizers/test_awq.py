import pytest
import torch

from requant.errors import ConfigError
from requant.quantizers import AWQQuantizer, LayerInputs, QuantizedTensor, ScaledUniformTensor, make_quantizer
from requant.quantizers.awq import awq_scale, scaled_quantize


def layer(out: int = 6, n: int = 32, tokens: int = 300, seed: int = 0):
    """A weight and inputs with a few salient channels (large |x|), AWQ's premise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    x = torch.randn(tokens, n, generator=g) * (0.1 + torch.rand(n, generator=g))
    x[:, :3] *= 8
    return w, x, LayerInputs(hessian=x.T @ x, tokens=tokens, extra={"abs_mean": x.abs().mean(0)})


def slow_output_error(w, x, alpha, bits, g, exclude=None, shrink=1.0):
    """‖(W − Q(W s)/s) X‖² from scratch: explicit inputs, one group at a time, plain Python min-max grid."""
    act = x.abs().mean(0).double()
    s = act.pow(alpha).clamp(min=1e-4)
    s = (s / (s.max() * s.min()).sqrt()).half().double()
    ws = w.double() * s
    keep = torch.ones_like(w, dtype=torch.bool) if exclude is None else ~exclude
    maxq = 2**bits - 1
    deq = torch.zeros_like(ws)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            v, k = ws[r, c0 : c0 + g], keep[r, c0 : c0 + g]
            if not k.any():
                continue  # nothing kept: no error
            bound = float(v[k].abs().max()) * shrink
            v = v.clamp(-bound, bound)
            lo, hi = float(v[k].min()), float(v[k].max())
            scale = float(torch.tensor((hi - lo) / maxq).half())
            zero = min(max(round(-lo / scale), 0), maxq)
            deq[r, c0 : c0 + g] = (torch.clamp(torch.round(v / scale) + zero, 0, maxq) - zero) * scale
    delta = (w.double() - deq / s) * keep
    return float((delta @ x.double().T).square().sum())


@pytest.mark.parametrize("g", [8, 32])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_chosen_alpha_minimises_the_grid_objective(g, with_exclude):
    w, x, inputs = layer()
    exclude = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.1 if with_exclude else None
    found = AWQQuantizer(3, g, n_grid=10).search(w, exclude=exclude, inputs=inputs)
    brute = [slow_output_error(w, x, a, 3, g, exclude) for a in found.alphas]
    assert found.alphas == [i / 10 for i in range(10)]
    torch.testing.assert_close(torch.tensor(found.errors), torch.tensor(brute), rtol=2e-4, atol=0)
    assert brute[found.alphas.index(found.alpha)] <= min(brute) * (1 + 1e-4)
    assert found.alpha > 0  # the salient channels make plain RTN (α = 0) lose


def test_clip_ratio_minimises_each_groups_error():
    _, x, inputs = layer(out=3, n=16)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 16, generator=g) * torch.randn(3, 16, generator=g).exp()  # heavy tails: clipping pays
    found = AWQQuantizer(2, 8, n_grid=10, max_shrink=0.5).search(w, inputs=inputs)
    assert (found.clip < 1).any()
    ratios = [1 - i / 10 for i in range(5)]
    for r in range(3):
        for grp in range(2):
            cols = slice(8 * grp, 8 * grp + 8)

            def err(shrink: float, r=r, cols=cols) -> float:
                only = torch.ones_like(w, dtype=torch.bool)
                only[r, cols] = False  # score this one group: every other entry excluded
                return slow_output_error(w, x, found.alpha, 2, 8, only, shrink)

            errs = [err(s) for s in ratios]
            chosen = float(found.clip[r, grp])
            i = min(range(5), key=lambda i: abs(ratios[i] - chosen))
            assert chosen == pytest.approx(ratios[i], abs=1e-6)
            assert errs[i] <= min(errs) * (1 + 1e-4)


def test_tensor_reconstructs_scaled_grid_and_round_trips():
    w, _, inputs = layer()
    t = AWQQuantizer(4, 8).fit(w, inputs=inputs)
    assert isinstance(t, ScaledUniformTensor) and t.kind == "awq"
    assert t.in_scale.dtype == torch.float16 and t.in_scale.shape == (32,)
    plain = scaled_quantize(w, t.in_scale, 4, 8)  # no clipping: same codes where the clip kept the range
    base = (t.codes.float().view(6, 4, 8) - t.zero.float()[..., None]) * t.scale.float()[..., None]
    torch.testing.assert_close(t.dequantize(), base.view(6, 32) / t.in_scale.float())
    meta, tensors = t.to_state()
    back = QuantizedTensor.from_state(meta, tensors)
    assert torch.equal(back.dequantize(), t.dequantize())
    # The channel scale is one more fp16 table: 16 bits per input on top of g8's scale + zero.
    assert t.bit_count().table_bits == plain.bit_count().table_bits == 16 * (6 * 4 * 2 + 32)


def test_never_worse_than_rtn_on_the_objective():
    for seed in range(3):
        w, _, inputs = layer(seed=seed)
        found = AWQQuantizer(3, 8).search(w, inputs=inputs)
        rtn = make_quantizer("rtn", 3, 8).fit(w).dequantize()
        rtn_err = float(((w - rtn).double() @ inputs.hessian.double() * (w - rtn).double()).sum())
        assert found.errors[0] == pytest.approx(rtn_err, rel=1e-4)  # α = 0 is plain RTN
        assert min(found.errors) <= found.errors[0]


def test_excluded_values_do_not_change_the_fit():
    w, _, inputs = layer()
    exclude = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.15
    w2 = w.clone()
    w2[exclude] = 40.0
    a = AWQQuantizer(3, 8).fit(w, exclude=exclude, inputs=inputs).dequantize()
    b = AWQQuantizer(3, 8).fit(w2, exclude=exclude, inputs=inputs).dequantize()
    torch.testing.assert_close(a[~exclude], b[~exclude], rtol=0, atol=0)


def test_rms_fallback_without_abs_mean():
    w, x, inputs = layer()
    rms = LayerInputs(hessian=inputs.hessian, tokens=inputs.tokens)
    found = AWQQuantizer(3, 8).search(w, inputs=rms)
    want = awq_scale((x.square().mean(0)).sqrt(), found.alpha)
    torch.testing.assert_close(found.in_scale.float(), want.float(), rtol=2e-3, atol=0)


def test_bad_input():
    w, _, inputs = layer()
    with pytest.raises(ConfigError, match="group size 12 does not divide the input width 32"):
        AWQQuantizer(3, 12).fit(w, inputs=inputs)
    with pytest.raises(ConfigError, match="awq needs the layer's calibration inputs"):
        AWQQuantizer(3, 8).fit(w)
    with pytest.raises(ConfigError, match="grid size 0 must be a positive integer"):
        AWQQuantizer(3, 8, n_grid=0)
