"""The packed layers' forward as torch custom ops (`torch.library`), so torch.compile can capture a decode step.

Eagerly, QuantLinear and ServedLinear call their C kernels directly (a custom op's dispatch costs more than the
call itself at batch 1). Under `torch.compile` (Dynamo tracing) their forward becomes `requant::packed_linear`,
an opaque op with a shape function: the compiled graph calls back into the same eager forward, so its results are
the eager path's, and nothing in the kernels needs to be traceable. A module is named in the op by an integer
handle (a slot in a registry of weak references), which Dynamo bakes into the graph as a constant.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

_LOCK = threading.Lock()
_MODULES: list[weakref.ref] = []
_REGISTERED = False


def handle(module: nn.Module) -> int:
    """The registry slot of a packed module (assigned on first use, kept for its lifetime)."""
    h = getattr(module, "_op_handle", None)
    if h is None:
        with _LOCK:
            h = len(_MODULES)
            _MODULES.append(weakref.ref(module))
        module._op_handle = h
    return h


def _module(h: int) -> nn.Module:
    mod = _MODULES[h]() if 0 <= h < len(_MODULES) else None
    if mod is None:
        raise RuntimeError(f"requant::packed_linear: module handle {h} is gone")
    return mod


def register() -> None:
    """Define requant::packed_linear once per process (idempotent)."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return

        @torch.library.custom_op("requant::packed_linear", mutates_args=())
        def packed_linear(x: torch.Tensor, h: int) -> torch.Tensor:
            return _module(h).forward_eager(x)  # always a fresh tensor, never a view of x

        @packed_linear.register_fake
        def _(x: torch.Tensor, h: int) -> torch.Tensor:
            return x.new_empty(*x.shape[:-1], _module(h).out_features)

        _REGISTERED = True


def prepare(model: nn.Module) -> int:
    """Register the op and give every packed module of `model` its handle, before tracing (a handle assigned
    while Dynamo traces would be a side effect it cannot capture); the number of packed modules."""
    register()
    n = 0
    for mod in model.modules():
        if hasattr(mod, "forward_eager"):
            handle(mod)
            n += 1
    return n


def packed_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's forward through the custom op (what a compiled graph records); needs `prepare` first."""
    h = getattr(module, "_op_handle", None)
    if h is None:
        raise RuntimeError("requant.format.ops.prepare(model) must run before torch.compile traces the model")
    return torch.ops.requant.packed_linear(x, h)


__all__ = ["handle", "packed_linear", "prepare", "register"]
