"""Exact top-k over many layers without a whole-model copy of the keys: a streaming threshold in two passes.

Pass 1 walks the layers one at a time and keeps only the `count` largest keys seen so far (values, no
indices), so it holds O(count) numbers however many layers there are; the smallest of them is the threshold
τ, the count-th largest key of the whole model. Pass 2 marks, layer by layer, every key above τ and then
keys equal to τ in layer order and row-major index order until `count` are marked (a deterministic rule for
ties). Without ties at τ the marked set is the set of the `count` largest keys, exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch


def running_top_values(chunks: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """The `count` largest finite values over all chunks (fp32, unsorted), keeping O(count) of them at a time.

    `chunks` are 1-D fp32 tensors (one layer's keys each; −inf for entries that may not be chosen)."""
    kept = torch.empty(0, dtype=torch.float32)
    for v in chunks:
        v = v[torch.isfinite(v)]
        if v.numel() > count:
            v = torch.topk(v, count, sorted=False).values
        kept = torch.cat([kept, v])
        if kept.numel() > count:
            kept = torch.topk(kept, count, sorted=False).values
    return kept


def threshold_indices(
    names: Sequence[str], keys_of: Callable[[str], torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """Flat indices (int64, ascending) of the `count` largest finite keys over all named layers (ties at the
    threshold taken in layer order, then index order); O(count) of them in all, not a mask per layer.
    `keys_of(name)` gives a layer's 1-D fp32 keys (−inf: never chosen); it is called twice per layer and may
    build the keys afresh each time."""
    empty = torch.empty(0, dtype=torch.int64)
    kept = running_top_values((keys_of(n) for n in names), count) if count > 0 else torch.empty(0)
    if kept.numel() == 0:
        return {n: empty for n in names}
    tau = kept.min()
    ties_left = kept.numel() - int((kept > tau).sum())  # entries equal to τ still to take
    out: dict[str, torch.Tensor] = {}
    for n in names:
        v = keys_of(n)
        idx = (v > tau).nonzero().squeeze(1)
        if ties_left > 0:
            at = (v == tau).nonzero().squeeze(1)[:ties_left]
            ties_left -= at.numel()
            idx = torch.cat([idx, at]).sort().values
        out[n] = idx
    return out


def threshold_masks(
    names: Sequence[str], keys_of: Callable[[str], torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """Flat boolean masks of the `count` largest finite keys over all named layers (requant's tie rule, as
    `threshold_indices`). `keys_of(name)` gives a layer's 1-D fp32 keys (−inf: never chosen)."""
    sizes: dict[str, int] = {}

    def keys(n: str) -> torch.Tensor:
        v = keys_of(n)
        sizes[n] = v.numel()
        return v

    idx = threshold_indices(names, keys, count)
    out = {}
    for n in names:
        mask = torch.zeros(sizes[n] if n in sizes else keys_of(n).numel(), dtype=torch.bool)
        mask[idx[n]] = True
        out[n] = mask
    return out


def masked_keys(keys: Mapping[str, torch.Tensor], exclude: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`keys_of(name)`: the layer's keys as flat fp32, −inf where `exclude` is set (never chosen)."""

    def keys_of(n: str) -> torch.Tensor:
        # One layer at a time: a masked copy of every layer at once would be another fp32 model copy.
        v = keys[n].float().flatten().clone()
        v[exclude[n].flatten()] = -torch.inf
        return v

    return keys_of


def global_top_masks(
    keys: Mapping[str, torch.Tensor], count: int, exclude: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masks (shaped like the keys) of the `count` largest keys over all layers, never inside `exclude`."""
    flat = threshold_masks(list(keys), masked_keys(keys, exclude), count)
    return {n: m.view(keys[n].shape) for n, m in flat.items()}


def global_top_indices(
    keys: Mapping[str, torch.Tensor], count: int, exclude: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Flat indices (ascending) of the `count` largest keys over all layers, never inside `exclude`: the entries
    `global_top_masks` marks, without a mask per layer."""
    return threshold_indices(list(keys), masked_keys(keys, exclude), count)
