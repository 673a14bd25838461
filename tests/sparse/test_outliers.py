import pytest
import torch

from requant.errors import ConfigError
from requant.sparse import iqr_outlier_masks, topk_masks_per_module
from requant.sparse.outliers import _quartiles, iqr_thresholds


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02,
        "b": torch.randn(32, 256, generator=g) * 0.05,
    }


def test_quartiles_match_numpy_linear_rule():
    w = torch.randn(1001)
    q1, q3 = _quartiles(w)
    ref = torch.quantile(w, torch.tensor([0.25, 0.75]))
    assert q1 == pytest.approx(float(ref[0]), abs=1e-7) and q3 == pytest.approx(float(ref[1]), abs=1e-7)


@pytest.mark.parametrize("pct", [0.05, 0.45, 2.0])
def test_iqr_share_is_largest_not_above_target(pct):
    w = _weights()
    masks, r = iqr_outlier_masks(w, pct)
    total = sum(x.numel() for x in w.values())
    got = sum(int(m.sum()) for m in masks.values())
    target = round(pct / 100 * total)
    assert got <= target
    # masks agree with the thresholds of the returned R
    thr = iqr_thresholds(w, r)
    for n in w:
        assert torch.equal(masks[n], w[n].abs() > thr[n])
    # a slightly smaller R would exceed the target (the share is as large as allowed)
    thr2 = iqr_thresholds(w, r * (1 - 1e-6))
    assert sum(int((w[n].abs() > thr2[n]).sum()) for n in w) >= got


def test_iqr_respects_skip_and_zero_budget():
    w = _weights()
    skip = {n: x.abs() > x.abs().median() * 4 for n, x in w.items()}
    masks, _ = iqr_outlier_masks(w, 0.5, skip=skip)
    assert not any((masks[n] & skip[n]).any() for n in w)
    masks0, _ = iqr_outlier_masks(w, 0.0)
    assert not any(m.any() for m in masks0.values())
    with pytest.raises(ConfigError, match="outlier percent 100"):
        iqr_outlier_masks(w, 100)


def test_topk_per_module_counts_and_order():
    s = {"a": torch.arange(1000.0).view(10, 100), "b": torch.rand(4, 50)}
    m = topk_masks_per_module(s, 1.0)
    assert int(m["a"].sum()) == 10 and int(m["b"].sum()) == 2
    assert m["a"].flatten()[-10:].all() and not m["a"].flatten()[:-10].any()
