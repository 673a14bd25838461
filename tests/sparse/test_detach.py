import pytest
import torch

from requant.errors import ConfigError
from requant.sparse.detach import (
    detach_step,
    rank_scores,
    restore_entries,
    select_top,
    step_counts,
    stepwise_detach,
)
from requant.sparse.outliers import budget
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


def test_a_step_that_divides_the_budget_gives_that_many_steps():
    n = 134_217_728  # 0.5% and 0.25% of it round to 671,089 and 335,544: one entry would be left for a third step
    count = budget(0.5, n)
    assert len(step_counts(count, budget(0.25, n))) == 3
    assert step_counts(count, detach_step(count, 0.5, 0.25, n)) == [335_545, 335_544]
    assert step_counts(budget(0.3, n), detach_step(budget(0.3, n), 0.3, 0.15, n)) == [201_327, 201_326]
    assert detach_step(count, 0.5, 0.2, n) == budget(0.2, n)  # no whole number of steps: the step as given
    assert detach_step(count, 0.5, None, n) == count and detach_step(0, 0.5, None, n) == 1


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


def _stepwise_reference(original, current, sparse, score_fn, total, step, *, scope, ranking):
    """The loop as it was before it held index lists: whole-model exclude and new-entry masks each step."""
    cur = {n: t.clone() for n, t in current.items()}
    chosen = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in current.items()}
    for c in step_counts(total, step):
        keys = {n: rank_scores(sc, ranking) for n, sc in score_fn(cur).items()}
        exclude = {n: sparse[n] | chosen[n] for n in cur}
        new = select_top(keys, c, exclude, scope=scope)
        for n in cur:
            if new[n].any():
                cur[n] = restore_entries(cur[n], original[n], new[n])
                chosen[n] |= new[n]
    return chosen, cur


@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("ranking", ["abs", "positive"])
@pytest.mark.parametrize("seed", range(3))
def test_stepwise_detach_equals_the_mask_reference(scope, ranking, seed):
    g = torch.Generator().manual_seed(seed)
    orig = {"a": torch.randn(32, 40, generator=g), "b": torch.randn(9, 7, generator=g), "c": torch.randn(1, 50)}
    cur0 = {n: (t * 2).round() / 2 for n, t in orig.items()}
    sparse = {n: torch.rand(t.shape, generator=g) < 0.1 for n, t in orig.items()}

    def score(cur):  # signed, with ties (rounded), like a PQI score
        return {n: ((cur[n] - orig[n]) * (orig[n] + 0.3)).mul(8).round() for n in cur}

    seen = []
    got = stepwise_detach(
        orig, cur0, sparse, score, total=150, step=40, scope=scope, ranking=ranking,
        on_step=lambda k, ch, cur: seen.append({n: t.clone() for n, t in cur.items()}),
    )  # fmt: skip
    ref, ref_cur = _stepwise_reference(orig, cur0, sparse, score, 150, 40, scope=scope, ranking=ranking)
    for n in orig:
        assert torch.equal(got[n], ref[n])
        assert torch.equal(seen[-1][n], ref_cur[n])  # the reconstruction, bit for bit
        assert not (got[n] & sparse[n]).any()


@pytest.mark.parametrize("scope", ["global", "module"])
def test_select_top_indices_are_the_masks_entries(scope):
    from requant.sparse.detach import select_top_indices

    g = torch.Generator().manual_seed(5)
    keys = {"a": torch.randn(20, 30, generator=g).abs().round(), "b": torch.randn(7, 3, generator=g).abs().round()}
    exclude = {n: torch.rand(k.shape, generator=g) < 0.3 for n, k in keys.items()}
    for count in (0, 1, 33, 400, 10_000):
        masks = select_top(keys, count, exclude, scope=scope)
        idx = select_top_indices(keys, count, exclude, scope=scope)
        for n in keys:
            assert torch.equal(idx[n], masks[n].flatten().nonzero().squeeze(1)), (n, count)
