"""Helpers for the sensitivity tests: a quantization path on a tiny Llama, toy polynomial losses."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from requant.model import quantizable_layers
from requant.quantizers import make_quantizer


def rtn_weights(model: nn.Module, bits: int = 3) -> tuple[list[str], dict, dict]:
    """(layer names, fp32 original weights, fp32 RTN-quantized weights) of every quantizable layer."""
    names = [layer.name for layer in quantizable_layers(model)]
    q = make_quantizer("rtn", bits)
    original = {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in names}
    quantized = {n: q.fit(original[n]).dequantize() for n in names}
    return names, original, quantized


class Toy(nn.Module):
    """One Linear layer; the loss is a polynomial of the given degree in its weight."""

    def __init__(self, degree: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.degree = degree
        self.lin = nn.Linear(5, 3, bias=False).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 5, generator=g, dtype=torch.float64))


def toy_loss(model: Toy, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ over rows of Σ_j (Wx − 1)_j^degree, and the row count: a polynomial of `degree` in W."""
    return (model.lin(x) - 1.0).pow(model.degree).sum(), len(x)


def toy_problem(degree: int, seed: int = 0) -> tuple[Toy, list[str], dict, dict, torch.Tensor]:
    model = Toy(degree, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = model.lin.weight.detach().clone()
    return (
        model,
        ["lin"],
        {"lin": w},
        {"lin": w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64)},
        torch.randn(8, 5, generator=g, dtype=torch.float64),
    )


def nll64(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token NLL summed in float64 (for finite-difference checks on a float64 model)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"), (
        targets.numel()
    )


class MLPLM(nn.Module):
    """A float64 next-token model (embedding → tanh MLP → logits) with no hidden fp32 casts, for
    finite-difference checks: the Llama RMSNorm computes in fp32 even in a float64 model."""

    def __init__(self, vocab: int = 16, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim).double()
        self.up = nn.Linear(dim, 2 * dim).double()
        self.down = nn.Linear(2 * dim, vocab).double()

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.down(torch.tanh(self.up(self.emb(input_ids)))))


def mlp_problem(seed: int = 0) -> tuple[MLPLM, list[str], dict, dict, torch.Tensor]:
    """A float64 MLP LM, its two layers, float64 original and perturbed weights, and token windows."""
    model = MLPLM(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    names = ["up", "down"]
    original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    quantized = {n: w + 0.3 * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype) for n, w in original.items()}
    return model, names, original, quantized, torch.randint(0, 16, (3, 10), generator=g)
