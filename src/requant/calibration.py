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

Units (model.py): linear and transposed linear modules are watched by forward pre-hooks. The experts of a fused
3-D parameter are watched by a TorchFunctionMode (`_ExpertCalls`): the model's eager experts loop calls
`F.linear(x, W[e])` with a view of the parameter, so the expert is the view's offset along axis 0 and x holds
exactly the tokens routed to it. Each expert gets its own statistics; an expert routed fewer than
`min_tokens` tokens gets the pooled statistics of all experts of its parameter instead (`ExpertFallback`),
and one that nothing reached at all the identity Hessian (the weight-only objective).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import distributed
from .errors import ConfigError, InputError
from .model import UnitRef, find_blocks, unit_ref
from .progress import bar
from .quantizers import LayerInputs

__all__ = [
    "DEFAULT_EXPERT_MIN_TOKENS",
    "ExpertTokens",
    "InputStatistics",
    "expert_token_counts",
    "layer_inputs",
    "sequential_fit",
]

# Fewer routed calibration tokens than this and an expert's own statistics are not trusted (QuantConfig's
# expert_min_tokens): a Σxxᵀ from a handful of rows is far from full rank and its Fisher is mostly noise.
DEFAULT_EXPERT_MIN_TOKENS = 32


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (after the last module we need)."""


class _Accumulator:
    """Σ x xᵀ (fp32), Σ |x| (fp64) and the row count of one input tensor."""

    def __init__(self, width: int | None = None, device: torch.device | None = None) -> None:
        self.hessian: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        if width is not None:  # allocated up front: every rank holds it, also without a routed token
            self.hessian = torch.zeros(width, width, dtype=torch.float32, device=device)
            self.abs_sum = torch.zeros(width, dtype=torch.float64, device=device)

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
        if self.tokens == 0:  # nothing reached it: the identity (the weight-only objective), unit mean |x|
            n = self.hessian.shape[0]
            return LayerInputs(hessian=torch.eye(n), tokens=0, extra={"abs_mean": torch.ones(n)})
        # Σxxᵀ is symmetric in exact arithmetic; addmm's blocking can leave last-bit asymmetry.
        h = (self.hessian + self.hessian.T).mul_(0.5).cpu()
        return LayerInputs(
            hessian=h, tokens=self.tokens, extra={"abs_mean": (self.abs_sum / self.tokens).float().cpu()}
        )

    @staticmethod
    def pooled(parts: Sequence[_Accumulator]) -> _Accumulator:
        """The sums of several accumulators (an expert's siblings)."""
        out = _Accumulator()
        for a in parts:
            if a.hessian is None or a.abs_sum is None or a.tokens == 0:
                continue
            if out.hessian is None:
                out.hessian, out.abs_sum = a.hessian.clone(), a.abs_sum.clone()
            else:
                out.hessian += a.hessian
                out.abs_sum += a.abs_sum
            out.tokens += a.tokens
        if out.hessian is None and parts:  # every sibling empty: keep the width for the identity
            h = parts[0].hessian
            assert h is not None
            out.hessian, out.abs_sum = torch.zeros_like(h), torch.zeros(h.shape[0], dtype=torch.float64)
        return out


_LINEAR_FUNCS = {F.linear}
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _ExpertCalls(TorchFunctionMode):
    """Calls `see(unit name, x)` for every product of x with a slice W[e] of a watched fused parameter:
    `F.linear(x, W[e])` for a parameter stored (E, out, in), `x @ W[e]` for one stored (E, in, out).

    The expert is found from the view itself (its storage offset along axis 0), so no hook on the model's
    code is needed; a product that reads a slice against its declared layout is refused (the units would be
    the wrong matrices)."""

    def __init__(self, watched: Mapping[str, UnitRef], see: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.see = see
        # parameter → (its unit name prefix, stored transposed)
        self.params: dict[int, tuple[torch.Tensor, str, bool]] = {}
        for name, ref in watched.items():
            if ref.index is not None:
                self.params[id(ref.param)] = (ref.param, name.rpartition(".")[0], ref.transposed)

    def _expert(self, w: object) -> tuple[str, bool] | None:
        base = getattr(w, "_base", None) if isinstance(w, torch.Tensor) else None
        hit = self.params.get(id(base)) if base is not None else None
        if hit is None or w.dim() != 2:  # type: ignore[union-attr]
            return None
        p, prefix, transposed = hit
        e = (w.storage_offset() - p.storage_offset()) // p.stride(0)  # type: ignore[union-attr]
        return f"{prefix}.{e}", transposed

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS or func in _MATMUL_FUNCS:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            hit = self._expert(w)
            if hit is not None and isinstance(x, torch.Tensor):
                name, transposed = hit
                if transposed != (func in _MATMUL_FUNCS):
                    raise InputError(
                        f"expert weight {name} is read as {'x @ W' if func in _MATMUL_FUNCS else 'F.linear(x, W)'}, "
                        f"against its declared {'(in, out)' if transposed else '(out, in)'} layout"
                    )
                self.see(name, x)
        return func(*args, **kwargs)


class InputStatistics:
    """Accumulates the inputs of the named units, one accumulator per distinct input tensor: forward pre-hooks
    on linear modules, a TorchFunctionMode for the experts of fused parameters (each expert its own
    accumulator). Call `new_pass()` before each forward pass; use as a context manager to stop watching.

    `min_tokens`: an expert routed fewer tokens gets the pooled statistics of all experts of its parameter
    (`fallback` lists them after `result()`; `tokens` holds every expert's own count)."""

    def __init__(self, model: nn.Module, names: Sequence[str], *, min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS) -> None:
        self.names = list(names)
        self.min_tokens = min_tokens
        self.acc: dict[str, _Accumulator] = {}
        self.owner: dict[str, str] = {}  # layer → the layer whose accumulator holds its input
        self.tokens: dict[str, int] = {}  # expert unit → tokens routed to it (after result())
        self.fallback: list[str] = []  # experts given their siblings' pooled statistics (after result())
        self._last: tuple[torch.Tensor, str] | None = None
        self._reduced = False
        refs = {n: unit_ref(model, n) for n in self.names}
        self.experts = {n: r for n, r in refs.items() if r.index is not None}
        for n, r in self.experts.items():  # allocated up front: the same owners on every rank
            w = r.weight
            self.acc[n] = _Accumulator(w.shape[1], w.device)
            self.owner[n] = n
        self._handles = [
            model.get_submodule(n).register_forward_pre_hook(self._hook(n), with_kwargs=True)
            for n, r in refs.items()
            if r.index is None
        ]
        self._mode: _ExpertCalls | None = None
        if self.experts:
            self._mode = _ExpertCalls(self.experts, self._see_expert)
            self._mode.__enter__()

    def _see_expert(self, name: str, x: torch.Tensor) -> None:
        if name in self.acc:
            self.acc[name].add(x)

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
        """LayerInputs per named unit; units that read one tensor share one object.

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
        shared = {o: a.result() for o, a in self.acc.items() if o not in self.experts}
        out = {n: shared[self.owner[n]] for n in self.names if n not in self.experts}
        siblings: dict[str, list[str]] = {}
        for n in self.experts:
            siblings.setdefault(n.rpartition(".")[0], []).append(n)
        self.tokens, self.fallback = {}, []
        for group in siblings.values():
            pooled: LayerInputs | None = None
            for n in group:
                a = self.acc[n]
                self.tokens[n] = a.tokens
                if a.tokens >= max(self.min_tokens, 1):
                    out[n] = a.result()
                    continue
                self.fallback.append(n)
                if pooled is None:
                    pooled = _Accumulator.pooled([self.acc[m] for m in group]).result()
                out[n] = pooled
        return {n: out[n] for n in self.names}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def __enter__(self) -> InputStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
        self._last = None


class ExpertTokens:
    """Counts the calibration tokens routed to each named expert unit while active (a context manager)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        refs = {n: unit_ref(model, n) for n in names}
        self.counts = {n: 0 for n, r in refs.items() if r.index is not None}
        self._mode = _ExpertCalls({n: refs[n] for n in self.counts}, self._see)

    def _see(self, name: str, x: torch.Tensor) -> None:
        if name in self.counts:
            self.counts[name] += x.numel() // x.shape[-1]

    def __enter__(self) -> ExpertTokens:
        if self.counts:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.counts:
            self._mode.__exit__(*exc)


@torch.no_grad()
def expert_token_counts(model: nn.Module, names: Sequence[str], windows: torch.Tensor) -> dict[str, int]:
    """Tokens of the windows routed to each expert unit among `names` (summed over ranks); {} without experts."""
    with ExpertTokens(model, names) as counter:
        if not counter.counts:
            return {}
        for w in bar(_my_windows(windows), desc="expert routing", unit="window"):
            _run(model, w)
    keys = sorted(counter.counts)
    totals = distributed.all_reduce_scalars(*(counter.counts[k] for k in keys))
    return {k: int(t) for k, t in zip(keys, totals, strict=True)}


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
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    *,
    desc: str = "calibration inputs",
    min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS,
    stats_out: list[InputStatistics] | None = None,
) -> dict[str, LayerInputs]:
    """Input statistics of each named unit over the windows (n, L), from one forward pass each.

    Passes stop after the last decoder block holding a named layer when every named layer is in a block.
    `stats_out` receives the InputStatistics (its expert token counts and fallbacks).
    """
    prefix, blocks = find_blocks(model)
    idx = [_block_of(n, prefix) for n in names]
    last = None if any(i is None for i in idx) else blocks[max(idx)]  # type: ignore[type-var]
    mine = _my_windows(windows)
    with InputStatistics(model, names, min_tokens=min_tokens) as stats, _stop_after(last):
        if stats_out is not None:
            stats_out.append(stats)
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
    """Temporarily give the named units these (out, in) weights."""
    saved = {}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                dst = unit_ref(model, n).weight
                saved[n] = dst.detach().clone()
                dst.copy_(w.to(dst.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                unit_ref(model, n).weight.copy_(w)


@torch.no_grad()
def sequential_fit(
    model: nn.Module,
    names: Sequence[str],
    windows: torch.Tensor,
    fit: Callable[[str, LayerInputs], torch.Tensor],
    *,
    desc: str = "sequential fit",
    min_tokens: int = DEFAULT_EXPERT_MIN_TOKENS,
    on_stats: Callable[[InputStatistics], None] | None = None,
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
                with InputStatistics(model, layer_names, min_tokens=min_tokens) as stats:
                    for h in hidden:
                        stats.new_pass()
                        _call_block(block, h, args, kwargs)
                    inputs = stats.result()
                if on_stats is not None:
                    on_stats(stats)
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
            inputs = layer_inputs(
                model, outside, windows, desc="calibration inputs (outside blocks)", min_tokens=min_tokens
            )
        for n in outside:
            fit(n, inputs[n])
