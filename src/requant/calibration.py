"""Layer-input statistics from calibration windows, for base methods that use inputs (AWQ, GPTQ, QTIP).

For each distinct input tensor (q/k/v read one tensor, gate/up another) we accumulate Σ x xᵀ (fp32, in × in),
Σ |x| per input channel and the token count, once; the layers that read it share one `LayerInputs`.

Two modes:
  * `layer_inputs`: one pass over the model as it is (forward pre-hooks on the layers); memory is the sum of
    the statistics (Σ in² floats over distinct inputs).
  * `sequential_fit`: GPTQ's order, block by block. A block's inputs for all windows are the outputs of the
    blocks before it *as quantized*; its layers' statistics are gathered, the layers fitted, and the windows
    propagated through the quantized block. Activations held: one block's inputs, n × L × hidden.

Architecture-generic: blocks come from `model.find_blocks`, and each block is called again with the positional
and keyword arguments (masks, rotary tables) the model itself passed to that block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import ConfigError
from .model import find_blocks, get_linear
from .progress import bar
from .quantizers import LayerInputs

__all__ = ["InputStatistics", "layer_inputs", "sequential_fit"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (after the last module we need)."""


class _Accumulator:
    """Σ x xᵀ (fp32), Σ |x| (fp64) and the row count of one input tensor."""

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.hessian is None:
            n = x.shape[1]
            self.hessian = torch.zeros(n, n, dtype=torch.float32, device=x.device)
            self.abs_sum = torch.zeros(n, dtype=torch.float64, device=x.device)
        self.hessian.addmm_(x.T, x)
        assert self.abs_sum is not None
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum this accumulator over the torch.distributed ranks (a no-op in one process)."""
        assert self.hessian is not None and self.abs_sum is not None
        parts = {"hessian": self.hessian, "abs_sum": self.abs_sum}
        distributed.all_reduce_(parts)
        (tokens,) = distributed.all_reduce_scalars(self.tokens)
        self.tokens = int(tokens)

    def result(self) -> LayerInputs:
        assert self.hessian is not None and self.abs_sum is not None
        # Σxxᵀ is symmetric in exact arithmetic; addmm's blocking can leave last-bit asymmetry.
        h = (self.hessian + self.hessian.T).mul_(0.5).cpu()
        return LayerInputs(
            hessian=h, tokens=self.tokens, extra={"abs_mean": (self.abs_sum / self.tokens).float().cpu()}
        )


class InputStatistics:
    """Forward pre-hooks that accumulate the inputs of the named linear layers, one accumulator per distinct
    input tensor. Call `new_pass()` before each forward pass; use as a context manager to remove the hooks."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.acc: dict[str, _Accumulator] = {}
        self.owner: dict[str, str] = {}  # layer → the layer whose accumulator holds its input
        self._last: tuple[torch.Tensor, str] | None = None
        self._reduced = False
        self._handles = [
            get_linear(model, n).register_forward_pre_hook(self._hook(n), with_kwargs=True) for n in self.names
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            # Layers reading the same tensor are called back to back (q, k, v; gate, up): an identity check
            # against the previous call finds them without holding more than one activation.
            if self._last is not None and self._last[0] is x:
                owner = self._last[1]
            else:
                owner = name
                self.acc.setdefault(name, _Accumulator()).add(x)
                self._last = (x, name)
            if self.owner.setdefault(name, owner) != owner:
                raise RuntimeError(f"layer {name} read a different input tensor than in the first pass")

        return hook

    def new_pass(self) -> None:
        if self._reduced:
            raise RuntimeError("InputStatistics: no passes after result() (the sums are already reduced)")
        self._last = None

    def result(self) -> dict[str, LayerInputs]:
        """LayerInputs per named layer; layers that read one tensor share one object.

        Under torchrun each rank has seen its share of the windows: the sums are all-reduced here, once,
        in sorted order (every rank found the same owners, the model being the same).
        """
        missing = [n for n in self.names if n not in self.owner]
        if missing:
            raise RuntimeError(f"layer {missing[0]} was not called during the calibration passes")
        if not self._reduced:
            for owner in sorted(self.acc):
                self.acc[owner].all_reduce()
            self._reduced = True
        shared = {o: a.result() for o, a in self.acc.items()}
        return {n: shared[self.owner[n]] for n in self.names}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> InputStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
        self._last = None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _block_of(name: str, prefix: str) -> int | None:
    head = prefix + "."
    if not name.startswith(head):
        return None
    idx = name[len(head) :].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


@contextmanager
def _stop_after(module: nn.Module | None) -> Iterator[None]:
    """Raise _Stop once `module` has run (None: run the whole model)."""
    if module is None:
        yield
        return

    def hook(*_: object) -> None:
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _run(model: nn.Module, window: torch.Tensor) -> None:
    with suppress(_Stop):
        model(input_ids=window[None].to(_device(model)), use_cache=False)


def _my_windows(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the windows; every rank needs at least one to find the layers' shared inputs."""
    k = distributed.world_size()
    if len(windows) < k:
        raise ConfigError(
            f"{len(windows)} calibration window(s) cannot be split across {k} processes; "
            f"use --nsamples {k} or more, or fewer processes"
        )
    return windows[list(distributed.shard(len(windows)))]


@torch.no_grad()
def layer_inputs(
    model: nn.Module, names: Sequence[str], windows: torch.Tensor, *, desc: str = "calibration inputs"
) -> dict[str, LayerInputs]:
    """Input statistics of each named linear layer over the windows (n, L), from one forward pass each.

    Passes stop after the last decoder block holding a named layer when every named layer is in a block.
    """
    prefix, blocks = find_blocks(model)
    idx = [_block_of(n, prefix) for n in names]
    last = None if any(i is None for i in idx) else blocks[max(idx)]  # type: ignore[type-var]
    mine = _my_windows(windows)
    with InputStatistics(model, names) as stats, _stop_after(last):
        for w in bar(mine, desc=desc, unit="window"):
            stats.new_pass()
            _run(model, w)
        return stats.result()


@torch.no_grad()
def _block_inputs(
    model: nn.Module, blocks: Sequence[nn.Module], first: int, last: int, windows: torch.Tensor
) -> tuple[list[torch.Tensor], dict[int, tuple[tuple, dict]]]:
    """The hidden states entering `blocks[first]` for every window, and the other args/kwargs of each block's
    call from `first` to `last`, as the model itself makes it. Blocks may differ here: a model alternating
    sliding-window and full attention passes each block its own mask, so one block's call does not fit all.
    The first window runs through block `last` to see every call; the others stop at block `first`."""
    hidden: list[torch.Tensor] = []
    calls: dict[int, tuple[tuple, dict]] = {}

    def hook_for(b: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if b == first:
                hidden.append((args[0] if args else kwargs["hidden_states"]).detach())
            if b not in calls:
                calls[b] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if b == last or (b == first and len(hidden) > 1):
                raise _Stop

        return hook

    handles = [blocks[b].register_forward_pre_hook(hook_for(b), with_kwargs=True) for b in range(first, last + 1)]
    try:
        for w in windows:
            _run(model, w)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def _call_block(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the named linear layers these weights."""
    saved = {}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                lin = get_linear(model, n)
                saved[n] = lin.weight.detach().clone()
                lin.weight.copy_(w.to(lin.weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                get_linear(model, n).weight.copy_(w)


@torch.no_grad()
def sequential_fit(
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    fit: Callable[[str, LayerInputs], torch.Tensor],
    *,
    desc: str = "sequential fit",
) -> None:
    """Fit the named layers block by block on the inputs the already-quantized model gives them (GPTQ order).

    `fit(name, inputs)` quantizes one layer and returns the weight ŵ it will have (out, in); a block's windows
    are propagated with those weights. The model's weights are unchanged on return. Layers outside the
    decoder blocks (e.g. an included lm_head) are fitted last, on one pass with every block quantized.
    """
    prefix, blocks = find_blocks(model)
    by_block: dict[int, list[str]] = {}
    outside = []
    for n in names:
        b = _block_of(n, prefix)
        if b is None:
            outside.append(n)
        else:
            by_block.setdefault(b, []).append(n)
    done: dict[str, torch.Tensor] = {}
    if by_block:
        first = min(by_block)
        # Each rank propagates only its windows (its share of the activation memory); the statistics are
        # all-reduced in InputStatistics.result(), so every rank fits the same layers identically.
        hidden, calls = _block_inputs(model, blocks, first, max(by_block), _my_windows(windows))
        for b in bar(range(first, max(by_block) + 1), desc=desc, unit="block"):
            block = blocks[b]
            args, kwargs = calls[b]
            layer_names = by_block.get(b, [])
            if layer_names:
                with InputStatistics(model, layer_names) as stats:
                    for h in hidden:
                        stats.new_pass()
                        _call_block(block, h, args, kwargs)
                    inputs = stats.result()
                recon = {n: fit(n, inputs[n]) for n in layer_names}
                del inputs
            else:
                recon = {}
            if b < max(by_block):
                with _weights(model, recon):
                    hidden = [_call_block(block, h, args, kwargs) for h in hidden]
            if outside:
                done.update(recon)
        del hidden
    if outside:
        with _weights(model, done):
            inputs = layer_inputs(model, outside, windows, desc="calibration inputs (outside blocks)")
        for n in outside:
            fit(n, inputs[n])
