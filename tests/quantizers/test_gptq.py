import pytest
import torch

from requant.errors import ConfigError
from requant.quantizers import GPTQQuantizer, LayerInputs, make_quantizer
from requant.quantizers.base import output_error_rows
from requant.quantizers.gptq import gptq_quantize
from requant.quantizers.qtip.ldlq import damp_hessian
from requant.quantizers.rtn import minmax_quantize


def correlated_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) + 2 * torch.eye(n)
    return (torch.randn(tokens, n, generator=g) @ mix) * (0.2 + torch.rand(n, generator=g))


def layer(out: int = 6, n: int = 24, tokens: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(out, n, generator=g)
    x = correlated_inputs(tokens, n, seed)
    return w, x, LayerInputs(hessian=x.T @ x, tokens=tokens)


def obs_reference(w, h, bits, g, *, sym=False, act_order=False, static=False, exclude=None, lut=None):
    """GPTQ from its definition: quantize one column, then update every column not yet quantized by the OBS
    step with the inverse of H restricted to those columns (recomputed each time; no Cholesky, no batches)."""
    w = w.double().clone()
    w0 = w.clone()
    out, n = w.shape
    h = h.double()
    keep = torch.ones(out, n, dtype=torch.bool) if exclude is None else ~exclude
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(n))
    recon = torch.zeros_like(w)
    maxq = 2**bits - 1
    ref = minmax_quantize(w0.float(), bits, g, sym=sym, exclude=exclude)
    scale = ref.scale.double().clone()
    zero = ref.zero.double().clone() if ref.zero is not None else torch.full_like(scale, 2 ** (bits - 1))
    for step, j in enumerate(order):
        free = order[step:]
        hinv = torch.linalg.inv(h[free][:, free])
        if lut is not None:
            c = (w[:, j : j + 1] - lut.double()).abs().argmin(1, keepdim=True)
            q = lut.double().gather(1, c)[:, 0]
        else:
            grp = j // g
            if not static and j % g == 0:  # dynamic groups: from the group's current (updated) columns
                p = minmax_quantize(w[:, j : j + g].float(), bits, g, sym=sym, exclude=~keep[:, j : j + g])
                scale[:, grp] = p.scale.double()[:, 0]
                if p.zero is not None:
                    zero[:, grp] = p.zero.double()[:, 0]
            c = torch.clamp(torch.round(w[:, j] / scale[:, grp]) + zero[:, grp], 0, maxq)
            q = (c - zero[:, grp]) * scale[:, grp]
        q = torch.where(keep[:, j], q, w0[:, j])  # excluded entries end at their own value
        err = (w[:, j] - q) / hinv[0, 0]
        w[:, free] -= err[:, None] * hinv[0][None, :]
        recon[:, j] = q
    return recon


CASES = [
    dict(bits=3),
    dict(bits=2, group_size=8),
    dict(bits=4, group_size=8, sym=True),
    dict(bits=3, act_order=True),
    dict(bits=3, group_size=8, act_order=True),
    dict(bits=3, group_size=8, static_groups=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("with_exclude", [False, True])
def test_equals_obs_definition(kw, with_exclude):
    w, _, inputs = layer()
    exclude = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.1 if with_exclude else None
    q = GPTQQuantizer(**kw).fit(w, exclude=exclude, inputs=inputs)
    g = kw.get("group_size") or w.shape[1]
    static = kw.get("static_groups", kw.get("act_order", False))
    ref = obs_reference(
        w,
        damp_hessian(inputs.hessian, 0.01),
        kw["bits"],
        g,
        sym=kw.get("sym", False),
        act_order=kw.get("act_order", False),
        static=static,
        exclude=exclude,
    )
    keep = torch.ones_like(w, dtype=torch.bool) if exclude is None else ~exclude
    torch.testing.assert_close(q.dequantize()[keep], ref.float()[keep], rtol=0, atol=1e-5)


def test_lut_grid_equals_obs_definition():
    w, _, inputs = layer(out=5, n=20)
    exclude = torch.zeros_like(w, dtype=torch.bool)
    exclude[1, 3] = exclude[4, 0] = True
    q = GPTQQuantizer(3, grid="lut").fit(w, exclude=exclude, inputs=inputs)
    assert q.kind == "lut" and q.lut.shape == (5, 8)
    ref = obs_reference(w, damp_hessian(inputs.hessian, 0.01), 3, 20, exclude=exclude, lut=q.lut.float())
    torch.testing.assert_close(q.dequantize()[~exclude], ref.float()[~exclude], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(group_size=8), dict(grid="lut"), dict(act_order=True, group_size=8)])
def test_excluded_values_do_not_change_the_fit(kw):
    w, _, inputs = layer()
    exclude = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.15
    w2 = w.clone()
    w2[exclude] = 50.0  # far outside every range: must set no range, no k-means weight, no feedback
    a = GPTQQuantizer(3, **kw).fit(w, exclude=exclude, inputs=inputs).dequantize()
    b = GPTQQuantizer(3, **kw).fit(w2, exclude=exclude, inputs=inputs).dequantize()
    torch.testing.assert_close(a[~exclude], b[~exclude], rtol=0, atol=1e-6)


def test_lower_output_error_than_rtn_and_feedback_matters():
    w, _, inputs = layer(out=16, n=48, tokens=400)
    h = inputs.hessian
    for g in (None, 16):
        rtn = make_quantizer("rtn", 3, g).fit(w).dequantize()
        gptq = make_quantizer("gptq", 3, g).fit(w, inputs=inputs).dequantize()
        assert float(output_error_rows(w - gptq, h).sum()) < 0.8 * float(output_error_rows(w - rtn, h).sum())
    # With H = I there is no feedback: GPTQ is plain round-to-nearest.
    ident = LayerInputs(hessian=torch.eye(48), tokens=400)
    torch.testing.assert_close(
        make_quantizer("gptq", 3, 16).fit(w, inputs=ident).dequantize(),
        make_quantizer("rtn", 3, 16).fit(w).dequantize(),
    )


def test_row_subset_refits_exactly():
    w, _, inputs = layer(out=10)
    q = GPTQQuantizer(3, 8)
    assert q.row_independent
    full = q.fit(w, inputs=inputs).dequantize()
    rows = torch.tensor([2, 7, 9])
    torch.testing.assert_close(q.fit(w[rows], inputs=inputs).dequantize(), full[rows], rtol=0, atol=0)


def test_objective_is_layer_output_error():
    w, x, inputs = layer()
    q = GPTQQuantizer(3, 8)
    recon = q.fit(w, inputs=inputs).dequantize()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.1
    direct = (((w - recon) * keep).double() @ x.double().T).square().sum(1)
    torch.testing.assert_close(q.objective(w, recon, keep, inputs), direct, rtol=1e-4, atol=0)


def test_bad_input():
    w, _, inputs = layer()
    with pytest.raises(ConfigError, match="group size 7 does not divide the input width 24"):
        GPTQQuantizer(3, 7).fit(w, inputs=inputs)
    with pytest.raises(ConfigError, match="act-order with dynamic groups is not supported"):
        GPTQQuantizer(3, 8, act_order=True, static_groups=False)
    with pytest.raises(ConfigError, match="needs the layer's calibration inputs"):
        GPTQQuantizer(3).fit(w)
    with pytest.raises(ConfigError, match="lut grid uses one table per output row"):
        GPTQQuantizer(3, 8, grid="lut")
    with pytest.raises(ConfigError, match="grid 'nf4' is not allowed"):
        GPTQQuantizer(3, grid="nf4")
    with pytest.raises(ConfigError, match=r"Hessian is \(8, 8\) but the layer has 24 inputs"):
        GPTQQuantizer(3).fit(w, inputs=LayerInputs(hessian=torch.eye(8), tokens=100))
    x = correlated_inputs(10, 24)  # 10 tokens: rank 10 < 24
    few = LayerInputs(hessian=x.T @ x, tokens=10)
    with pytest.warns(UserWarning, match="10 calibration tokens cannot give a full-rank Hessian for 24 inputs"):
        r = GPTQQuantizer(3).fit(w, inputs=few).dequantize()
    assert torch.isfinite(r).all()


def test_functional_form_matches_quantizer():
    w, _, inputs = layer()
    a = gptq_quantize(w, inputs.hessian, 4, group_size=8)
    b = GPTQQuantizer(4, 8).fit(w, inputs=inputs)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
