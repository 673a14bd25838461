"""Post-quantization Integral (docs/method.md): ΔF = ∫₀¹ ∇F(w + tΔw)ᵀΔw dt, discretised by a quadrature rule.

ḡ = Σ_k c_k ∇F(w + t_k Δw) is the path-averaged gradient; ΔF_PQI = Δw ⊙ ḡ is the signed element-wise
attribution (rank by |ΔF_PQI|), and Σ ΔF_PQI the predicted ΔF. Every node sees the same windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, NumericalError
from ..loss import token_nll
from ..model import unit_ref
from ..progress import bar
from .gradients import LossFn, gradient_sums
from .path import check_path, weights_on_path
from .quadrature import quadrature


@dataclass
class PathNode:
    """The loss and its gradient at one point w + tΔw of the path."""

    t: float
    loss: float  # F(w + tΔw), mean token NLL (nats)
    grad_sum: dict[str, torch.Tensor]  # ∇ of the SUMMED token NLL, fp32, on the model's device
    tokens: int  # ∇F of the mean loss = grad_sum / tokens
    derivative: float  # dF/dt = ∇Fᵀ Δw (nats)

    @property
    def grad(self) -> dict[str, torch.Tensor]:
        """∇F of the mean loss (fp32, a new tensor per layer)."""
        return {n: g / self.tokens for n, g in self.grad_sum.items()}


@dataclass
class PQIResult:
    """One PQI pass between w and w̃."""

    scores: dict[str, torch.Tensor]  # signed element-wise ΔF_PQI = Δw ⊙ ḡ, fp32, per layer name
    gbar: dict[str, torch.Tensor]  # path-averaged gradient ḡ = Σ_k c_k ∇F(w + t_k Δw), fp32
    predicted: float  # Σ over all layers of scores (fp64 sum), nats
    nodes: list[float]
    weights: list[float]
    node_losses: list[float]  # F at each node (nats)
    grad_evals: int  # nodes × windows forward+backward passes
    node_derivatives: list[float] | None = None  # dF/dt at each node (nats)


def path_gradients(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    ts: Sequence[float],
    *,
    subset: Sequence[str] | None = None,
    batch_size: int = 1,
    loss_fn: LossFn = token_nll,
    desc: str = "path",
    accumulators: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> Iterator[PathNode]:
    """For each t, yield the loss, fp32 gradient and dF/dt at w + tΔw over all windows (one node at a time).

    Only `subset` moves if given (the others stay at w and get no gradient). The model holds `original`
    again when the generator finishes or is closed, also on error. `accumulators()`, called once per node, gives
    that node's gradient sums their storage (default: fresh tensors on the model's device).
    """
    check_path(model, names, original, quantized, subset)
    moving = list(names) if subset is None else [n for n in names if n in set(subset)]
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    if len(windows) == 0:
        raise ConfigError("no calibration windows given")
    device = unit_ref(model, names[0]).weight.device

    def delta_of(n: str) -> torch.Tensor:
        # Δw for the derivative, one layer at a time (a whole-model copy would raise the peak memory by a model).
        return quantized[n].to(device, torch.float32) - original[n].to(device, torch.float32)

    with weights_on_path(model, names, original, quantized) as set_point:
        for i, t in enumerate(bar(ts, desc=f"{desc} nodes", unit="node")):
            set_point(float(t), subset)
            try:
                # Split across ranks and all-reduced: every rank gets the node's full gradient.
                sums = gradient_sums(
                    model,
                    moving,
                    windows,
                    batch_size=batch_size,
                    desc=f"{desc} t={t:.4f}",
                    loss_fn=loss_fn,
                    into=accumulators() if accumulators is not None else None,
                )
            except NumericalError as e:
                raise NumericalError(f"at path node {i} (t={t:.4g}): {e}") from None
            acc, nll_total, tokens = sums.grads, sums.nll, sums.tokens
            # fp32 BLAS dots per layer (blocked accumulation: ~1e-9 of Σ|terms| here), summed in fp64.
            deriv = sum(torch.dot(acc[n].reshape(-1), delta_of(n).reshape(-1)).item() for n in moving) / tokens
            yield PathNode(float(t), nll_total / tokens, acc, tokens, deriv)


class PathIntegral:
    """Accumulates ḡ = Σ_k c_k ∇F(w + t_k Δw) from path nodes, in any order, and turns it into a PQIResult."""

    def __init__(self, nodes: Sequence[float], weights: Sequence[float]) -> None:
        self.weight_at = dict(zip(map(float, nodes), map(float, weights), strict=True))
        self.gbar: dict[str, torch.Tensor] = {}
        self.seen: dict[float, PathNode] = {}

    def add(self, node: PathNode) -> None:
        """Fold in one node (a no-op for a t the rule does not use); its gradient tensors are reused."""
        c = self.weight_at.get(node.t)
        if c is None or node.t in self.seen:
            return
        self.seen[node.t] = PathNode(node.t, node.loss, {}, node.tokens, node.derivative)
        scale = c / node.tokens
        for n, g in node.grad_sum.items():
            if n in self.gbar:
                self.gbar[n].add_(g, alpha=scale)
            else:
                self.gbar[n] = g.mul_(scale)

    def result(
        self,
        original: Mapping[str, torch.Tensor],
        quantized: Mapping[str, torch.Tensor],
        windows: int,
        *,
        keep_gbar: bool = True,
    ) -> PQIResult:
        """The scores Δw ⊙ ḡ; without `keep_gbar` they are formed in ḡ's own storage (one whole-model fp32 tensor
        fewer; the result's gbar is then empty). Equal bit for bit either way (the product commutes)."""
        missing = sorted(set(self.weight_at) - set(self.seen))
        if missing:
            raise ConfigError(f"path integral is missing nodes t = {', '.join(f'{t:.4g}' for t in missing)}")
        ts = sorted(self.weight_at)
        gbar = {n: g.cpu() for n, g in self.gbar.items()}
        self.gbar = {}
        scores = {}
        for n in list(gbar):
            delta = quantized[n].float() - original[n].float()  # one layer's Δw at a time
            scores[n] = delta.mul_(gbar[n]) if keep_gbar else gbar.pop(n).mul_(delta)
        return PQIResult(
            scores=scores,
            gbar=gbar,
            predicted=sum(s.sum(dtype=torch.float64).item() for s in scores.values()),
            nodes=ts,
            weights=[self.weight_at[t] for t in ts],
            node_losses=[self.seen[t].loss for t in ts],
            grad_evals=len(ts) * windows,
            node_derivatives=[self.seen[t].derivative for t in ts],
        )


def post_quantization_integral(
    model: nn.Module,
    names: Sequence[str],
    original: Mapping[str, torch.Tensor],
    quantized: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    *,
    nodes: int = 32,
    rule: str = "midpoint",
    batch_size: int = 1,
    subset: Sequence[str] | None = None,
    loss_fn: LossFn = token_nll,
    desc: str | None = None,
    keep_gbar: bool = True,
    accumulators: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> PQIResult:
    """PQI between w (original) and w̃ (quantized) over the same calibration windows at every node.

    The named layers' weights are set in place to w + t·Δw (formed in fp32, cast to the model dtype) for
    each node and restored to `original` at the end (also on error). Cost: nodes × windows fwd+bwd.
    With `subset`, only those layers move (the others stay at w) and only they get scores. `desc` names the
    pass in progress output (default: the rule). Without `keep_gbar` the scores take ḡ's storage and the
    result's gbar is empty. `accumulators()` gives each node's fp32 gradient sums their storage (e.g.
    memory-mapped files; default: fresh tensors).
    """
    ts, cs = quadrature(rule, nodes)
    integral = PathIntegral(ts.tolist(), cs.tolist())
    nodes_iter = path_gradients(
        model,
        names,
        original,
        quantized,
        windows,
        ts.tolist(),
        subset=subset,
        batch_size=batch_size,
        loss_fn=loss_fn,
        desc=desc or f"pqi {rule}",
        accumulators=accumulators,
    )
    # closing(): an error here must still run the generator's restore, not wait for garbage collection.
    with contextlib.closing(nodes_iter):
        for node in nodes_iter:
            integral.add(node)
            del node  # let this node's gradients go before the next node's backward
    return integral.result(original, quantized, len(windows), keep_gbar=keep_gbar)
