"""BlockLDLQ (QuIP#, arXiv 2402.04396): GPTQ-style error feedback from the block LDL decomposition of H.

With H = (I + U) D (I + U)ᵀ, U strictly upper block-triangular and D block-diagonal (blocks of g inputs),
column blocks are quantized in order as  Ŵ_k = Q(W_k + (W_{<k} − Ŵ_{<k}) U_{<k,k}).  The error ΔW = Ŵ − W then
satisfies ΔW (I + U) = η, η the quantizer's own error on its inputs, so the proxy loss is
tr(ΔW H ΔWᵀ) = Σ_k tr(η_k D_k η_kᵀ). For g = 1 this is LDLQ, which equals GPTQ/OPTQ (QuIP, arXiv 2307.13304).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import NumericalError


def damp_hessian(h: torch.Tensor, rel: float) -> torch.Tensor:
    """H + rel · mean(diag H) · I in fp64 (an all-zero H becomes I: no information, plain rounding)."""
    h = h.double()
    mean = h.diagonal().mean()
    if not torch.isfinite(h).all():
        raise NumericalError("the layer Hessian has NaN or Inf entries")
    if mean <= 0:
        return torch.eye(h.shape[0], dtype=torch.float64)
    return h + rel * mean * torch.eye(h.shape[0], dtype=torch.float64)


def block_ldl(h: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) with H = (I + U) D (I + U)ᵀ: U (n, n) strictly upper block-triangular, D (n/g, g, g) fp64.

    H must be symmetric positive definite and n a multiple of `block`.
    """
    n = h.shape[0]
    if n % block:
        raise ValueError(f"block size {block} does not divide the width {n}")
    h = h.double()
    # An upper unit-triangular A with H = A diag(d) Aᵀ is the reversed lower Cholesky factor of reversed H.
    try:
        chol = torch.linalg.cholesky(h.flip(0, 1))
    except RuntimeError as e:  # torch raises LinAlgError, a RuntimeError
        raise NumericalError(f"the damped Hessian is not positive definite: {e}") from None
    diag = chol.diagonal()
    a = (chol / diag).flip(0, 1)
    d = diag.flip(0).square()
    nb = n // block
    # Fold each diagonal block of A into D: A = A_b · blockdiag(A_kk), so H = A_b (A_kk D_k A_kkᵀ) A_bᵀ.
    akk = torch.stack([a[i * block : (i + 1) * block, i * block : (i + 1) * block] for i in range(nb)])
    dk = d.view(nb, block)
    d_blocks = akk @ (dk[:, :, None] * akk.transpose(1, 2))
    inv = torch.linalg.solve_triangular(akk, torch.eye(block, dtype=torch.float64).expand(nb, -1, -1), upper=True)
    a_b = torch.einsum("ikg,kgh->ikh", a.view(n, nb, block), inv).reshape(n, n)
    blk = torch.arange(n) // block
    return torch.where(blk[:, None] < blk[None, :], a_b, 0.0), d_blocks


def block_ldlq(
    w: torch.Tensor,
    u: torch.Tensor,
    block: int,
    quantize_block: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Ŵ (out, in) by BlockLDLQ: `quantize_block(k, X)` gets the k-th column block X (out, g), feedback
    included, and returns its reconstruction; U comes from `block_ldl` of the (damped) Hessian."""
    n = w.shape[1]
    w = w.to(u.dtype)
    err = torch.zeros_like(w)  # W − Ŵ on the blocks done so far
    feedback = torch.zeros_like(w)  # (W − Ŵ) U from the finished super-blocks
    recon = torch.empty_like(w)
    # GPTQ's lazy batching: feedback within a super-block of ~128 columns is added block by block, and the
    # finished super-block updates every later column in one wide matmul (skinny matmuls are slow on CPU).
    sb = max(block, 128 // block * block)
    for s0 in range(0, n, sb):
        s1 = min(n, s0 + sb)
        for c0 in range(s0, s1, block):
            cols = slice(c0, c0 + block)
            x = w[:, cols] + feedback[:, cols] + err[:, s0:c0] @ u[s0:c0, cols]
            recon[:, cols] = quantize_block(c0 // block, x).to(w.dtype)
            err[:, cols] = w[:, cols] - recon[:, cols]
        if s1 < n:
            feedback[:, s1:] += err[:, s0:s1] @ u[s0:s1, s1:]
    return recon
