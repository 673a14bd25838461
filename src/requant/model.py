"""Model walking: the quantizable linear layers of a causal LM, found generically.

No per-architecture tables: the decoder blocks are the largest `nn.ModuleList` of identical modules
that contain `nn.Linear`s, and every `nn.Linear` inside them is quantizable by default. Loading a model
from a path is loading.py's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError, InputError

# ----------------------------------------------------------------------------------------------------------
# Layer discovery


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the largest ModuleList of same-type modules that contain nn.Linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise InputError("the model has no decoder blocks with linear layers (nothing to quantize)")
    return best


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable linear layer: its full module name, block index and sub-layer kind."""

    name: str
    block: int | None
    kind: str  # the module's own name inside its parent, e.g. "q_proj"
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def _compile(patterns: Iterable[str] | None, what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def quantizable_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[LayerInfo]:
    """The single source of truth for which layers get quantized, in model order.

    Default: every nn.Linear inside the decoder blocks. `include` regexes (re.search on the full module
    name) replace that default with all nn.Linear modules they match anywhere; `exclude` regexes remove.
    """
    prefix, _ = find_blocks(model)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    tied = _tied_output(model)
    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        block = _block_index(name, prefix)
        chosen = any(p.search(name) for p in inc) if inc else block is not None
        if not chosen or any(p.search(name) for p in exc):
            continue
        if mod is tied:
            raise ConfigError(
                f"layer {name!r} shares its weight with the input embeddings; it cannot be "
                "quantized on its own (exclude it)"
            )
        layers.append(LayerInfo(name, block, name.rsplit(".", 1)[-1], mod.out_features, mod.in_features))
    if not layers:
        raise ConfigError("no quantizable layers selected (check --include/--exclude patterns)")
    return layers


def _block_index(name: str, prefix: str) -> int | None:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _tied_output(model: nn.Module) -> nn.Module | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and out is not None and out.weight is emb.weight:
        return out
    return None


def get_linear(model: nn.Module, name: str) -> nn.Linear:
    mod = model.get_submodule(name)
    assert isinstance(mod, nn.Linear), name
    return mod


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
