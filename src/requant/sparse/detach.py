"""Algorithm 2: step-wise significant-weight detach driven by a posterior sensitivity (PQI).

Each step scores every weight against the *current* reconstruction, restores the top entries to their
original values (as fp16 sparse residuals, exactly as they will be stored) and rescores. Dense codes
stay fixed. The scorer is a callable, so the loop is testable without a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from ..errors import ConfigError
from .outliers import budget
from .selection import global_top_indices, masked_keys

RANKINGS = ("abs", "positive")
SCOPES = ("global", "module")


def rank_scores(scores: torch.Tensor, ranking: str, *, inplace: bool = False) -> torch.Tensor:
    """Ranking key from signed ΔF_PQI: |ΔF| (default) or max(ΔF, 0) (only entries that raised the loss); with
    `inplace`, written into `scores` (no copy)."""
    if ranking == "abs":
        return scores.abs_() if inplace else scores.abs()
    if ranking == "positive":
        return scores.clamp_min_(0) if inplace else scores.clamp_min(0)
    raise ConfigError(f"ranking {ranking!r} is not allowed; use one of {', '.join(RANKINGS)}")


def select_top(
    keys: Mapping[str, torch.Tensor],
    count: int,
    exclude: Mapping[str, torch.Tensor],
    *,
    scope: str = "global",
) -> dict[str, torch.Tensor]:
    """Masks of the top entries by key, never inside `exclude`.

    global: the `count` largest keys over all layers (keys share units, e.g. nats of loss), by a streaming
    threshold that holds O(count) keys besides one layer's (requant.sparse.selection; ties at the threshold
    go to the earlier layer, then the lower index); module: every layer gets its share of `count` in
    proportion to its size.
    """
    idx = select_top_indices(keys, count, exclude, scope=scope)
    out = {}
    for n, k in keys.items():
        mask = torch.zeros(k.numel(), dtype=torch.bool)
        mask[idx[n]] = True
        out[n] = mask.view(k.shape)
    return out


def select_top_indices(
    keys: Mapping[str, torch.Tensor],
    count: int,
    exclude: Mapping[str, torch.Tensor],
    *,
    scope: str = "global",
) -> dict[str, torch.Tensor]:
    """Flat indices (int64, ascending) of the entries `select_top` marks (see there): O(count) numbers, not a mask
    per layer."""
    if scope not in SCOPES:
        raise ConfigError(f"selection scope {scope!r} is not allowed; use one of {', '.join(SCOPES)}")
    if scope == "global":
        return global_top_indices(keys, count, exclude)
    out = {n: torch.empty(0, dtype=torch.int64) for n in keys}
    if count > 0:
        total = sum(k.numel() for k in keys.values())
        keys_of = masked_keys(keys, exclude)
        for n in keys:
            v = keys_of(n)  # one layer at a time
            c = min(round(count * v.numel() / total), int(torch.isfinite(v).sum()))
            if c:
                out[n] = torch.topk(v, c, sorted=False).indices.sort().values
    return out


class _Union(Mapping[str, torch.Tensor]):
    """`a[n] | b[n]`, computed when asked: one layer's mask at a time instead of a whole-model copy."""

    def __init__(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
        self.a, self.b = a, b

    def __getitem__(self, n: str) -> torch.Tensor:
        return self.a[n] | self.b[n]

    def __iter__(self) -> Iterator[str]:
        return iter(self.b)

    def __len__(self) -> int:
        return len(self.b)


def restore_entries(
    current: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, *, inplace: bool = False
) -> torch.Tensor:
    """current + fp16(original − current) on the mask: bit-identical to storing an fp16 sparse residual; with
    `inplace`, written into `current` (e.g. a memory-mapped tensor) instead of a copy."""
    out = current if inplace else current.clone()
    cur = current[mask].float()  # a gathered copy: read before the masked entries are overwritten
    out[mask] = cur + (original[mask].float() - cur).half().float()
    return out


def detach_step(count: int, significant: float, step: float | None, numel: int) -> int:
    """Entries per detach step for `count` = `significant` percent of `numel`, in steps of `step` percent (None:
    one step). A step that divides the budget a whole number of times k gives k steps: rounding both percentages
    to entries on their own can leave one more step of a single entry (a whole PQI pass for nothing)."""
    if step is None:
        return max(count, 1)
    k = round(significant / step)
    if k >= 1 and math.isclose(significant / step, k, rel_tol=1e-9):
        return max(math.ceil(count / k), 1)
    return max(budget(step, numel), 1)


def step_counts(total: int, step: int) -> list[int]:
    """Entries detached at each step: ceil(total/step) steps of `step`, the last one takes the rest."""
    if step <= 0:
        raise ConfigError(f"detach step {step} must be positive")
    steps = math.ceil(total / step) if total > 0 else 0
    return [min(step, total - i * step) for i in range(steps)]


def stepwise_detach(
    original: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    sparse: Mapping[str, torch.Tensor],
    score_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    total: int,
    step: int,
    *,
    scope: str = "global",
    ranking: str = "abs",
    on_step: Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], None] | None = None,
    start: tuple[int, dict[str, torch.Tensor]] | None = None,
    copy: bool = True,
) -> dict[str, torch.Tensor]:
    """Masks of `total` significant entries chosen in steps of `step`, rescoring the reconstruction each time.

    `sparse` marks entries already stored sparse (never chosen). `score_fn(current)` returns signed
    element-wise sensitivities as tensors the loop owns (they are turned into ranking keys in place).
    `on_step(k, chosen, current)` lets the caller checkpoint; `start=(k, chosen)` resumes after step k. With
    `copy=False` the tensors of `current` are the loop's own: not cloned, and restored entries are written into
    them in place (so a memory-mapped reconstruction stays one).
    """
    cur = {n: t.clone() for n, t in current.items()} if copy else dict(current)
    chosen = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in current.items()}
    counts = step_counts(total, step)
    first = 0
    if start is not None:
        first, prev = start
        chosen = {n: m.clone() for n, m in prev.items()}
        cur = {n: restore_entries(cur[n], original[n], chosen[n], inplace=True) for n in cur}
    for k in range(first, len(counts)):
        keys = score_fn(cur)
        for n, sc in keys.items():  # in place: scores and keys never both in memory
            keys[n] = rank_scores(sc, ranking, inplace=True)
        # Masks held: `chosen` alone; the excluded set is built per layer, the new entries are index lists.
        new = select_top_indices(keys, counts[k], _Union(sparse, chosen), scope=scope)
        del keys
        for n in cur:
            if new[n].numel():
                mask = torch.zeros(chosen[n].shape, dtype=torch.bool)  # one layer's, for the fp16 rounding
                mask.view(-1)[new[n]] = True
                restore_entries(cur[n], original[n], mask, inplace=True)  # the loop's own tensor
                chosen[n] |= mask
        if on_step is not None:
            on_step(k + 1, chosen, cur)
    return chosen
