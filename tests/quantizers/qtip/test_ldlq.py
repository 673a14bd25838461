import pytest
import torch

from requant.errors import NumericalError
from requant.quantizers.qtip.ldlq import block_ldl, block_ldlq, damp_hessian


def _problem(n: int = 24, m: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, dtype=torch.float64, generator=g) @ torch.randn(n, n, dtype=torch.float64, generator=g)
    h = x.T @ x + 0.1 * torch.eye(n, dtype=torch.float64)
    w = torch.randn(m, n, dtype=torch.float64, generator=g)
    return w, h


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 2) / 2


def _sequential_obs(w: torch.Tensor, h: torch.Tensor, block: int) -> torch.Tensor:
    """Slow reference (GPTQ/OBS by definition): quantize a block, then move the remaining targets to the
    least-squares optimum given the fixed blocks, from explicit inverses of the remaining Hessian."""
    target, out, n = w.clone(), torch.empty_like(w), w.shape[1]
    for k in range(0, n, block):
        cur, rest = slice(k, k + block), slice(k + block, n)
        out[:, cur] = _round(target[:, cur])
        if k + block < n:
            delta = out[:, cur] - target[:, cur]
            target[:, rest] -= delta @ h[cur, rest] @ torch.linalg.inv(h[rest, rest])
    return out


@pytest.mark.parametrize("block", [1, 4, 6, 24])
def test_block_ldl_factorizes(block):
    _, h = _problem()
    u, d = block_ldl(h, block)
    n = h.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose((eye + u) @ torch.block_diag(*d) @ (eye + u).T, h, rtol=1e-10, atol=1e-9)
    blk = torch.arange(n) // block
    assert torch.equal(u[blk[:, None] >= blk[None, :]], torch.zeros_like(u[blk[:, None] >= blk[None, :]]))
    assert torch.allclose(d, d.transpose(1, 2)) and (torch.linalg.eigvalsh(d) > 0).all()


@pytest.mark.parametrize("block", [1, 3, 4, 8])
def test_block_ldlq_equals_sequential_obs_reference(block):
    w, h = _problem()
    u, _ = block_ldl(h, block)
    fast = block_ldlq(w, u, block, lambda k, x: _round(x))
    assert torch.allclose(fast, _sequential_obs(w, h, block), atol=1e-9, rtol=0)


@pytest.mark.parametrize("block", [1, 4])
def test_proxy_loss_is_the_d_weighted_quantizer_error(block):
    # ΔW (I + U) = η, so tr(ΔW H ΔWᵀ) = Σ_k tr(η_k D_k η_kᵀ) for any quantizer.
    w, h = _problem(seed=3)
    u, d = block_ldl(h, block)
    etas = []

    def quantize(k, x):
        q = _round(x) + 0.01 * torch.sin(x)  # any map works
        etas.append(q - x)
        return q

    dw = block_ldlq(w, u, block, quantize) - w
    expected = sum(torch.trace(eta @ dk @ eta.T) for eta, dk in zip(etas, d, strict=True))
    assert torch.allclose(torch.trace(dw @ h @ dw.T), expected, rtol=1e-9)


def test_feedback_lowers_proxy_loss_and_identity_hessian_is_plain_rounding():
    w, h = _problem(seed=5)
    u, _ = block_ldl(h, 4)
    fb = block_ldlq(w, u, 4, lambda k, x: _round(x)) - w
    plain = _round(w) - w
    assert torch.trace(fb @ h @ fb.T) < 0.8 * torch.trace(plain @ h @ plain.T)
    u0, _ = block_ldl(torch.eye(24, dtype=torch.float64), 4)
    assert torch.equal(block_ldlq(w, u0, 4, lambda k, x: _round(x)), _round(w))


def test_damping_and_bad_hessians():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0]))
    assert torch.allclose(damp_hessian(h, 0.5).diagonal(), torch.tensor([3.0, 1.0, 5.0], dtype=torch.float64))
    assert torch.equal(damp_hessian(torch.zeros(3, 3), 0.01), torch.eye(3, dtype=torch.float64))
    with pytest.raises(NumericalError, match="NaN or Inf"):
        damp_hessian(torch.full((3, 3), float("nan")), 0.01)
    with pytest.raises(NumericalError, match="not positive definite"):
        block_ldl(-torch.eye(4, dtype=torch.float64), 2)


def test_lazy_super_block_updates_match_the_reference_on_wide_layers():
    w, h = _problem(n=144, m=6, seed=7)  # wider than one 128-column super-block
    for block in (8, 48):
        u, _ = block_ldl(h, block)
        assert torch.allclose(block_ldlq(w, u, block, lambda k, x: _round(x)), _sequential_obs(w, h, block), atol=1e-9)
