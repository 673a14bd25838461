import pytest
import torch

from requant.errors import ConfigError
from requant.sparse.detach import rank_scores, restore_entries, select_top, step_counts, stepwise_detach
from requant.sparse.residual import SparseResidual


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(6, 10, generator=g), "b": torch.randn(4, 5, generator=g)}


def test_global_topk_equals_concatenated_topk():
    keys = _layers(1)
    exclude = {n: torch.zeros(k.shape, dtype=torch.bool) for n, k in keys.items()}
    exclude["a"][0, :3] = True
    masks = select_top(keys, 7, exclude, scope="global")
    flat = torch.cat([keys[n].masked_fill(exclude[n], -torch.inf).flatten() for n in keys])
    ref = torch.zeros_like(flat, dtype=torch.bool)
    ref[torch.topk(flat, 7).indices] = True
    assert torch.equal(torch.cat([masks[n].flatten() for n in keys]), ref)


def test_module_scope_splits_by_size():
    keys = _layers(2)
    none = {n: torch.zeros(k.shape, dtype=torch.bool) for n, k in keys.items()}
    masks = select_top(keys, 8, none, scope="module")
    assert int(masks["a"].sum()) == round(8 * 60 / 80) and int(masks["b"].sum()) == round(8 * 20 / 80)
    with pytest.raises(ConfigError, match="scope 'x'"):
        select_top(keys, 1, none, scope="x")


def test_rankings():
    s = torch.tensor([-3.0, 1.0, 2.0])
    assert torch.equal(rank_scores(s, "abs"), torch.tensor([3.0, 1.0, 2.0]))
    assert torch.equal(rank_scores(s, "positive"), torch.tensor([0.0, 1.0, 2.0]))


def test_step_counts():
    assert step_counts(10, 5) == [5, 5]
    assert step_counts(11, 5) == [5, 5, 1]
    assert step_counts(0, 5) == []
    with pytest.raises(ConfigError):
        step_counts(3, 0)


def test_restore_matches_sparse_residual_exactly():
    w, d = _layers(3)["a"], (_layers(3)["a"] * 3).round() / 3
    m = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(restore_entries(d, w, m), SparseResidual.restore(w, d, m).add_to(d))


def test_stepwise_rescoring_and_resume():
    orig = _layers(4)
    cur0 = {n: (t * 2).round() / 2 for n, t in orig.items()}
    sparse = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in orig.items()}
    sparse["a"][1, 1] = True
    calls = []

    def score(cur):  # a posterior score: the error that remains, squared
        calls.append({n: t.clone() for n, t in cur.items()})
        return {n: (cur[n] - orig[n]) ** 2 for n in cur}

    steps = []
    chosen = stepwise_detach(
        orig,
        cur0,
        sparse,
        score,
        total=9,
        step=4,
        on_step=lambda k, ch, cur: steps.append((k, {n: m.clone() for n, m in ch.items()})),
    )
    assert len(calls) == 3 and sum(int(m.sum()) for m in chosen.values()) == 9
    assert not chosen["a"][1, 1]
    # the second scoring saw the first step's entries restored
    first = steps[0][1]
    for n in orig:
        assert torch.allclose(calls[1][n][first[n]], orig[n][first[n]], atol=1e-3)
    # resuming after step 1 gives the same final choice
    again = stepwise_detach(orig, cur0, sparse, score, total=9, step=4, start=steps[0])
    assert all(torch.equal(again[n], chosen[n]) for n in orig)
