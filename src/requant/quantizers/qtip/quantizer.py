"""QTIP as a base method: incoherence processing + BlockLDLQ + tail-biting trellis-coded quantization.

fit(W, inputs=H): W̃ = U_out W U_inᵀ and H̃ = U_in H U_inᵀ (random Hadamard transforms), H̃ damped; the
columns of W̃ are quantized in blocks of `tile[1]` by BlockLDLQ, each block as tiles of tile[0] × tile[1]
weights read row-major as one tail-biting trellis sequence. One fp16 scale per matrix maps W̃ onto the code's
unit variance.

Default tile 16 × 4 (T = 64), not QTIP's GPU-friendly 16 × 16 (T = 256): the Viterbi work and batch are the
same (both scale with the tile's rows), the feedback is 4× finer, and on four layers of R the 2-bit proxy error
is 0–37% lower, for ~2% worse TCQ on the shorter streams (benchmarks/results/qtip.md).

Without calibration inputs H = I: no feedback, plain TCQ of W̃.

`exclude` (entries the caller will store sparse, e.g. outliers): they are set to 0 before the transform, so
the dense part approximates W with those entries removed, D ≈ Q(W − W_o) as in ReQuant's step 4, and the
caller's sparse residual at those positions restores them. (QTIP in the paper uses r_o = 0.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...errors import ConfigError
from ..base import BaseQuantizer, LayerInputs, QuantizedTensor, layer_hessian, output_error_rows
from .hadamard import (
    coherent_weight,
    incoherent_hessian,
    incoherent_weight,
    pack_signs,
    random_signs,
    rht,
    unpack_signs,
)
from .ldlq import block_ldl, block_ldlq, damp_hessian
from .trellis import CODES, Trellis, decode, quantize_sequences, single_thread_if_small

QTIP_BITS = (2, 3, 4)
# Scale of W̃ relative to its RMS, per bits: the least MSE of 1MAD TCQ (L = 10, T = 256) on Gaussian data over
# factors 0.9..1.2 (benchmarks/qtip.py): the code's bounded tails want a wider scale at higher rates.
DEFAULT_SCALE_FACTOR = {2: 1.05, 3: 1.1, 4: 1.15}
_SMALL_LAYER = 1 << 22  # weights up to which a layer is fitted single-threaded (see single_thread_if_small)


def tiles_to_sequences(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """(m, n) → (n/ty · m/tx, tx·ty): tile (r, c) is row c·(m/tx) + r, its entries read row-major."""
    m, n = x.shape
    tx, ty = tile
    return x.reshape(m // tx, tx, n // ty, ty).permute(2, 0, 1, 3).reshape(-1, tx * ty)


def sequences_to_tiles(s: torch.Tensor, shape: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """Inverse of `tiles_to_sequences`."""
    m, n = shape
    tx, ty = tile
    return s.reshape(n // ty, m // tx, tx, ty).permute(1, 2, 0, 3).reshape(m, n)


@dataclass
class TrellisTensor(QuantizedTensor):
    """QTIP's dense part: K-bit pieces of each tile's tail-biting trellis stream, in the transformed space.

    Value = U_outᵀ (scale · code[states]) U_in, states read from the streams (`trellis.decode`),
    U = H diag(s).
    codes hold exactly the K·T bits of every stream, so they count `bits` per weight like any other codes.
    """

    codes: torch.Tensor  # uint8 (out, in), values < 2^bits; position = the weight the piece is stored with
    sign_in: torch.Tensor  # uint8 (ceil(in/8),) bit-packed RHT signs of the inputs
    sign_out: torch.Tensor  # uint8 (ceil(out/8),) bit-packed RHT signs of the outputs
    scale: torch.Tensor  # fp16 (1,)
    bits: int
    L: int
    V: int
    code: str
    tile: tuple[int, int]
    kind: ClassVar[str] = "trellis"
    TABLES: ClassVar[tuple[str, ...]] = ("sign_in", "sign_out", "scale")

    @property
    def trellis(self) -> Trellis:
        return Trellis(self.L, self.bits, self.V, self.code)

    def params(self) -> dict[str, Any]:
        return {"L": self.L, "V": self.V, "code": self.code, "tile": list(self.tile), "tail_biting": True}

    def transformed(self) -> torch.Tensor:
        """The decoded W̃ (out, in) fp32, before undoing the Hadamard transforms."""
        seqs = decode(tiles_to_sequences(self.codes, self.tile), self.trellis)
        return sequences_to_tiles(seqs, self.shape, self.tile) * self.scale.float()

    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The RHT signs (s_out, s_in) as fp32 ±1."""
        out, inp = self.shape
        return unpack_signs(self.sign_out, out), unpack_signs(self.sign_in, inp)

    def dequantize(self) -> torch.Tensor:
        with single_thread_if_small(self.codes.numel(), _SMALL_LAYER):
            return coherent_weight(self.transformed(), *self.signs())

    def linear(self, x: torch.Tensor, transformed: torch.Tensor | None = None) -> torch.Tensor:
        """x Wᵀ for x (..., in) without forming W, as QTIP's kernels do: U_outᵀ (W̃ (U_in x)).

        `transformed` is a cached `self.transformed()` (decode once, reuse per call)."""
        s_out, s_in = self.signs()
        with single_thread_if_small(self.codes.numel(), _SMALL_LAYER):
            wt = self.transformed() if transformed is None else transformed
            return rht(rht(x, s_in) @ wt.to(x.dtype).T, s_out, transpose=True)

    @classmethod
    def _from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TrellisTensor:
        return cls(
            codes=tensors["codes"],
            sign_in=tensors["sign_in"],
            sign_out=tensors["sign_out"],
            scale=tensors["scale"],
            bits=int(meta["bits"]),
            L=int(meta["L"]),
            V=int(meta["V"]),
            code=str(meta["code"]),
            tile=(int(meta["tile"][0]), int(meta["tile"][1])),
        )


class QTIPQuantizer(BaseQuantizer):
    """QTIP (arXiv 2406.11235) without fine-tuning; uses the layer Hessian, ignores importance.

    Encoding cost: O(2^L) per weight (two Viterbi passes, see `trellis`); L = 10 is the CPU default
    (~10–20 µs per weight on the shared 2-core CPU, ~2.5× that at L = 12 for ~3% lower proxy error).
    """

    name = "qtip"
    uses_inputs = True
    supports_exclude = True

    def __init__(
        self,
        bits: int,
        group_size: int | None = None,
        *,
        L: int = 10,
        V: int = 1,
        code: str = "1mad",
        tile: tuple[int, int] = (16, 4),
        damp: float = 0.01,
        scale_factor: float | None = None,
        seed: int = 0,
    ) -> None:
        if group_size is not None:
            raise ConfigError("qtip uses one scale per matrix; --group-size is not allowed with it")
        if bits not in QTIP_BITS:
            raise ConfigError(f"bits {bits} is not supported by qtip; use one of {', '.join(map(str, QTIP_BITS))}")
        super().__init__(bits, None)
        if code not in CODES:
            raise ConfigError(f"trellis code {code!r} is not allowed; use one of {', '.join(CODES)}")
        if V not in (1, 2):
            raise ConfigError(f"V={V} weights per trellis step is not allowed; use 1 or 2")
        if not bits * V <= L <= 16:
            raise ConfigError(f"trellis state bits L={L} must lie in {bits * V}..16 for {bits} bits and V={V}")
        tile = (int(tile[0]), int(tile[1]))
        if min(tile) < 1 or (tile[0] * tile[1]) % V or tile[0] * tile[1] * bits < L:
            raise ConfigError(f"tile {tile} must hold a multiple of V={V} weights and at least L={L} bits")
        if not damp >= 0:
            raise ConfigError(f"Hessian damping {damp} must be non-negative")
        self.trellis = Trellis(L, bits, V, code)
        self.tile = tile
        self.damp = damp
        self.scale_factor = DEFAULT_SCALE_FACTOR[bits] if scale_factor is None else float(scale_factor)
        self.seed = seed

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        if shape[0] % self.tile[0] or shape[1] % self.tile[1]:
            raise ConfigError(
                f"qtip tile {self.tile[0]}x{self.tile[1]} does not divide the shape {shape[0]}x{shape[1]} "
                f"of layer {name}; choose a tile whose sides divide it"
            )

    def fit(
        self,
        weight: torch.Tensor,
        *,
        importance: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> TrellisTensor:
        m, n = weight.shape
        self.check_shape("(unnamed)", (m, n))
        with single_thread_if_small(m * n, _SMALL_LAYER):
            return self._fit(weight, exclude, inputs)

    def _fit(self, weight: torch.Tensor, exclude: torch.Tensor | None, inputs: LayerInputs | None) -> TrellisTensor:
        m, n = weight.shape
        w = weight.double()
        if exclude is not None:
            w = w.masked_fill(exclude, 0.0)
        gen = torch.Generator().manual_seed(self.seed)
        s_in, s_out = random_signs(n, gen), random_signs(m, gen)
        wt = incoherent_weight(w, s_out.double(), s_in.double())
        if inputs is not None and inputs.hessian is not None:
            ht = incoherent_hessian(inputs.hessian.double(), s_in.double())
        else:
            ht = torch.eye(n, dtype=torch.float64)
        u, _ = block_ldl(damp_hessian(ht, self.damp), self.tile[1])
        rms = float(wt.square().mean().sqrt())
        scale = torch.tensor([rms * self.scale_factor if rms > 0 else 1.0]).half()
        s = scale.double()
        codes = torch.empty(m, n, dtype=torch.uint8)
        tx, ty = self.tile

        def quantize_block(k: int, x: torch.Tensor) -> torch.Tensor:
            res = quantize_sequences((x / s).reshape(m // tx, tx * ty), self.trellis)
            codes[:, k * ty : (k + 1) * ty] = res.codes.view(m, ty)
            return res.recon.double().view(m, ty) * s

        block_ldlq(wt, u, ty, quantize_block)
        L, _, V, code = self.trellis.L, self.trellis.K, self.trellis.V, self.trellis.code
        return TrellisTensor(codes, pack_signs(s_in), pack_signs(s_out), scale, self.bits, L, V, code, self.tile)

    def objective(
        self, weight: torch.Tensor, recon: torch.Tensor, keep: torch.Tensor, inputs: LayerInputs | None
    ) -> torch.Tensor | None:
        """Layer output error tr(ΔW H ΔWᵀ) per row, ΔW on the kept entries; without a Hessian, the default."""
        if inputs is None or inputs.hessian is None:
            return None
        return output_error_rows((weight.float() - recon.float()) * keep, layer_hessian(self.name, weight, inputs))

    def describe(self) -> dict[str, Any]:
        t = self.trellis
        return {
            **super().describe(),
            "L": t.L,
            "V": t.V,
            "code": t.code,
            "tile": list(self.tile),
            "damp": self.damp,
            "scale_factor": self.scale_factor,
            "seed": self.seed,
        }
