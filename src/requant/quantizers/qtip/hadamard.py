"""Incoherence processing: random Hadamard transforms (RHT) on both sides of a weight (QuIP#, 2402.04396).

A transform of width n is U = H_n · diag(s), s a random ±1 vector and H_n an orthonormal Hadamard-like matrix
applied in O(n log n + n·h) without forming it:

- n = 2^k: the Sylvester Hadamard matrix, by the fast Walsh–Hadamard butterfly (symmetric).
- n = 2^k · h with h a Hadamard order reachable by Paley's constructions over a prime field (12 = 11 + 1,
  20, 36 = 2·(17 + 1), 28, 44, ...): H_n = H_{2^k} ⊗ H_h / √n. R's widths are all of this kind:
  576 = 16·36, 1536 = 128·12, 192 = 16·12 (Hadamard matrices of order 3 or 9 do not exist, but 12 and 36 do).
- otherwise, n = 2^k · m with m odd and no reachable Hadamard order m·2^j: H_n = H_{2^k} ⊗ C_m with C_m the
  orthonormal DCT-II matrix of order m. Its entries are bounded by √(2/m), so H_n's are by √(2/n):
  incoherent up to a factor √2 instead of exactly flat.

The weight W (out, in) is stored as W̃ = U_out W U_inᵀ and the layer Hessian H (in, in) becomes
H̃ = U_in H U_inᵀ, so the proxy loss tr(ΔW H ΔWᵀ) is the same in both spaces.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) over GF(q), χ the quadratic character (Legendre symbol), χ(0) = 0."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Paley I, q ≡ 3 (mod 4) prime: H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew; order q + 1."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.int64) + s


def _paley2(q: int) -> torch.Tensor:
    """Paley II, q ≡ 1 (mod 4) prime: C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]; order 2(q + 1)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, -1], [-1, -1]])
    b = torch.tensor([[1, 1], [1, -1]])
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


def paley_hadamard(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix (int64) of `order` from Paley's constructions over a prime field, or None."""
    if order % 4:
        return None
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return _paley1(order - 1)
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return _paley2(order // 2 - 1)
    return None


def dct2_matrix(m: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of order m (fp64)."""
    k = torch.arange(m, dtype=torch.float64)[:, None]
    i = torch.arange(m, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (i + 0.5) * k / m) * math.sqrt(2.0 / m)
    c[0] /= math.sqrt(2.0)
    return c


@lru_cache(maxsize=64)
def hadamard_base(n: int) -> tuple[int, torch.Tensor, str]:
    """(p, B, kind) with n = p · len(B): p a power of two, B (h, h) orthonormal fp64, kind 'sylvester' |
    'paley' | 'dct'. H_n = H_p ⊗ B with H_p the normalized Sylvester matrix."""
    if n < 1:
        raise ValueError(f"transform width must be positive, got {n}")
    p = n & -n
    m = n // p
    if m == 1:
        return p, torch.ones(1, 1, dtype=torch.float64), "sylvester"
    j = 1
    while j <= p:  # the smallest Paley order m·j with j | p leaves the most work to the fast butterfly
        h = paley_hadamard(m * j)
        if h is not None:
            return p // j, h.double() / math.sqrt(m * j), "paley"
        j *= 2
    return p, dct2_matrix(m), "dct"


def _fwht(x: torch.Tensor, p: int) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform (Sylvester order) over dim −2 of size p, a power of two."""
    batch, m = x.shape[:-2], x.shape[-1]
    h = 1
    while h < p:
        x = x.reshape(*batch, p // (2 * h), 2, h, m)
        a, b = x[..., 0, :, :], x[..., 1, :, :]
        x = torch.stack((a + b, a - b), dim=-3)
        h *= 2
    return x.reshape(*batch, p, m) / math.sqrt(p)


def hadamard_transform(x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """H_n x (or H_nᵀ x) along the last dim of x, n = x.shape[-1]; H_n orthonormal (see module doc)."""
    n = x.shape[-1]
    p, base, _ = hadamard_base(n)
    h = base.shape[0]
    y = _fwht(x.reshape(*x.shape[:-1], p, h), p)  # H_p is symmetric
    if h > 1:
        b = base.to(x.dtype)
        y = y @ (b if transpose else b.T)  # (H_p ⊗ B) x  =  H_p X Bᵀ  with X = x viewed (p, h)
    return y.reshape(x.shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal H_n as a dense matrix (for tests and small widths)."""
    return hadamard_transform(torch.eye(n, dtype=dtype)).T.contiguous()


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random ±1 vector (fp32) of length n."""
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def rht(x: torch.Tensor, signs: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """U x with U = H diag(signs) along the last dim; with transpose, Uᵀ x = diag(signs) Hᵀ x."""
    s = signs.to(x.dtype)
    if transpose:
        return hadamard_transform(x, transpose=True) * s
    return hadamard_transform(x * s)


def incoherent_weight(w: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """W̃ = U_out W U_inᵀ for W (out, in)."""
    a = rht(w, s_in)  # rows: U_in w_r, i.e. W U_inᵀ
    return rht(a.T, s_out).T


def coherent_weight(wt: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """W = U_outᵀ W̃ U_in, the inverse of `incoherent_weight`."""
    a = rht(wt, s_in, transpose=True)
    return rht(a.T, s_out, transpose=True).T


def incoherent_hessian(h: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """H̃ = U_in H U_inᵀ for a symmetric H (in, in), so tr(ΔW H ΔWᵀ) = tr(ΔW̃ H̃ ΔW̃ᵀ)."""
    a = rht(h, s_in)  # H U_inᵀ (H symmetric: its rows are its columns)
    return rht(a.T, s_in)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 vector → uint8 bit-packed (1 bit per sign, little-endian within a byte; bit set = −1)."""
    bits = (signs < 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_signs`: the first n signs as fp32 ±1."""
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].float()
