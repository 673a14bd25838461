"""The streaming global top-k equals the former exact selection (every layer's top-k candidates merged)."""

import pytest
import torch

from requant.sparse.detach import select_top
from requant.sparse.selection import global_top_masks, running_top_values, threshold_masks


def _merged_candidates(keys, count, exclude):
    """The former implementation: each layer's own top-`count` as candidates, one topk over all of them."""
    out = {n: torch.zeros(k.numel(), dtype=torch.bool) for n, k in keys.items()}
    cand_v, cand_l, cand_i = [], [], []
    for li, n in enumerate(keys):
        v = keys[n].float().flatten().clone()
        v[exclude[n].flatten()] = -torch.inf
        top = torch.topk(v, min(count, v.numel()), sorted=False)
        cand_v.append(top.values)
        cand_i.append(top.indices)
        cand_l.append(torch.full((top.values.numel(),), li, dtype=torch.long))
    values, layer, index = torch.cat(cand_v), torch.cat(cand_l), torch.cat(cand_i)
    finite = torch.isfinite(values)
    values, layer, index = values[finite], layer[finite], index[finite]
    best = torch.topk(values, min(count, values.numel()), sorted=False).indices
    names = list(keys)
    for li in layer[best].unique().tolist():
        out[names[li]][index[best[layer[best] == li]]] = True
    return {n: m.view(keys[n].shape) for n, m in out.items()}


def _problem(seed, shapes=((64, 48), (7, 5), (128, 96), (1, 300))):
    g = torch.Generator().manual_seed(seed)
    keys = {f"l{i}": torch.randn(s, generator=g).abs() for i, s in enumerate(shapes)}
    exclude = {n: torch.rand(k.shape, generator=g) < 0.2 for n, k in keys.items()}
    keys["l1"][0, 0] = float("nan")  # never chosen, like -inf
    return keys, exclude


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [0, 1, 17, 500, 5000, 30000])
def test_streaming_threshold_equals_merged_candidates(seed, count):
    keys, exclude = _problem(seed)
    got = global_top_masks(keys, count, exclude)
    ref = _merged_candidates(keys, count, exclude)
    for n in keys:
        assert torch.equal(got[n], ref[n]), (n, count)
        assert not (got[n] & exclude[n]).any()
    finite = sum(int((torch.isfinite(k) & ~exclude[n]).sum()) for n, k in keys.items())
    assert sum(int(m.sum()) for m in got.values()) == min(count, finite)
    assert select_top(keys, count, exclude, scope="global").keys() == got.keys()


def test_running_top_values_hold_the_k_largest():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) for n in (10, 1000, 3, 250)]
    kept = running_top_values(iter(chunks), 40)
    assert torch.equal(kept.sort().values, torch.cat(chunks).topk(40).values.sort().values)


def test_ties_at_the_threshold_go_to_earlier_layers_then_lower_indices():
    keys = {"a": torch.tensor([1.0, 3.0, 2.0, 2.0]), "b": torch.tensor([2.0, 5.0, 2.0])}
    masks = threshold_masks(list(keys), lambda n: keys[n], 4)
    assert masks["a"].tolist() == [False, True, True, True] and masks["b"].tolist() == [False, True, False]
    masks = threshold_masks(list(keys), lambda n: keys[n], 6)
    assert masks["a"].tolist() == [False, True, True, True] and masks["b"].tolist() == [True, True, True]
