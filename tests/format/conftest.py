"""Fixtures of the format tests: random quantized layers of any kind, width and sparsity."""

from __future__ import annotations

import pytest
import torch

from requant.model import LayerInfo
from requant.quantizers import LUTTensor, ScaledUniformTensor, TrellisTensor, UniformTensor
from requant.quantizers.qtip.hadamard import pack_signs, random_signs
from requant.results import QuantizedLayer
from requant.sparse import SparseResidual


def random_layer(
    out: int,
    inp: int,
    bits: int,
    kind: str = "lut",
    nnz: int = 0,
    group: int | None = None,
    sym: bool = False,
    seed: int = 0,
) -> QuantizedLayer:
    """A QuantizedLayer with random codes, tables (LUT, scale/zero per group, AWQ's per-input scale or a trellis
    tensor's signs and scale) and sparse residual. Kind "trellis" uses tiles of 4 × 8 (L = 8): shapes must fit."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    if kind == "lut":
        dense = LUTTensor(codes, torch.randn(out, 2**bits, generator=g).half(), bits)
    elif kind == "trellis":
        signs = pack_signs(random_signs(inp, g)), pack_signs(random_signs(out, g))
        dense = TrellisTensor(codes, *signs, torch.tensor([0.03]).half(), bits, 8, 1, "1mad", (4, 8))
    else:
        group = group or inp
        scale = (torch.rand(out, inp // group, generator=g) / 10 + 0.01).half()
        zero = None if sym else torch.randint(0, 2**bits, (out, inp // group), generator=g).half()
        dense = UniformTensor(codes, scale, zero, bits, group)
        if kind == "awq":
            in_scale = (torch.rand(inp, generator=g) * 4 + 0.25).half()
            dense = ScaledUniformTensor(codes, scale, zero, bits, group, in_scale=in_scale)
    index = torch.randperm(out * inp, generator=g)[:nnz].sort().values
    sparse = SparseResidual(index, torch.randn(nnz, generator=g).half(), (out, inp))
    return QuantizedLayer(LayerInfo("blk.0.proj", 0, "proj", out, inp), dense, sparse)


@pytest.fixture
def make_layer():
    return random_layer
