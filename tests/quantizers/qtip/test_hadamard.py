import math

import pytest
import torch

from requant.quantizers.qtip.hadamard import (
    coherent_weight,
    hadamard_base,
    hadamard_matrix,
    hadamard_transform,
    incoherent_hessian,
    incoherent_weight,
    pack_signs,
    paley_hadamard,
    random_signs,
    rht,
    unpack_signs,
)

WIDTHS = [1, 2, 8, 12, 18, 20, 24, 36, 96, 192, 576, 3, 9]


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


@pytest.mark.parametrize("order", [12, 20, 28, 36, 44, 60])
def test_paley_matrices_are_hadamard(order):
    h = paley_hadamard(order)
    assert h is not None and set(h.unique().tolist()) == {-1, 1}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64))


def test_paley_refuses_orders_it_cannot_build():
    assert paley_hadamard(10) is None  # not a multiple of 4
    assert paley_hadamard(92) is None  # 91 = 7·13 and 45 are not prime (92 exists, but not by Paley)


@pytest.mark.parametrize("n", WIDTHS)
def test_transform_is_orthogonal_and_flat(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    kind = hadamard_base(n)[2]
    bound = 1.0 if kind != "dct" else math.sqrt(2.0)
    assert h.abs().max() * math.sqrt(n) <= bound + 1e-12
    if kind != "dct":  # a true Hadamard matrix: every entry is ±1/√n
        assert torch.allclose(h.abs() * math.sqrt(n), torch.ones(n, n, dtype=torch.float64), atol=1e-12)


def test_reference_widths_get_true_hadamard_matrices():
    assert hadamard_base(576)[0] == 16 and hadamard_base(576)[1].shape == (36, 36)
    assert hadamard_base(1536)[0] == 128 and hadamard_base(1536)[1].shape == (12, 12)
    assert hadamard_base(192)[0] == 16 and hadamard_base(192)[1].shape == (12, 12)
    assert [hadamard_base(n)[2] for n in (576, 1536, 192, 64, 18)] == ["paley"] * 3 + ["sylvester", "dct"]


@pytest.mark.parametrize("n", [8, 96, 576, 18])
def test_fast_transform_equals_explicit_kronecker_product(n):
    p, base, _ = hadamard_base(n)
    explicit = torch.kron(_sylvester(p), base)
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard_transform(x), x @ explicit.T, atol=1e-12)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ explicit, atol=1e-12)


@pytest.mark.parametrize("n", [96, 576, 9])
def test_rht_inverts_exactly(n):
    g = torch.Generator().manual_seed(0)
    s = random_signs(n, g)
    x = torch.randn(4, n, dtype=torch.float64, generator=g)
    assert torch.allclose(rht(rht(x, s), s, transpose=True), x, atol=1e-12, rtol=0)
    x32 = x.float()
    assert torch.allclose(rht(rht(x32, s), s, transpose=True), x32, atol=1e-5, rtol=0)


def test_weight_round_trip_and_proxy_loss_invariance():
    g = torch.Generator().manual_seed(1)
    m, n = 24, 36
    s_out, s_in = random_signs(m, g).double(), random_signs(n, g).double()
    w = torch.randn(m, n, dtype=torch.float64, generator=g)
    wt = incoherent_weight(w, s_out, s_in)
    assert torch.allclose(coherent_weight(wt, s_out, s_in), w, atol=1e-12, rtol=0)
    u_out = hadamard_matrix(m) * s_out
    u_in = hadamard_matrix(n) * s_in
    assert torch.allclose(wt, u_out @ w @ u_in.T, atol=1e-12)
    x = torch.randn(100, n, dtype=torch.float64, generator=g)
    h = x.T @ x
    ht = incoherent_hessian(h, s_in)
    assert torch.allclose(ht, u_in @ h @ u_in.T, atol=1e-9)
    dw = torch.randn(m, n, dtype=torch.float64, generator=g)
    dwt = incoherent_weight(dw, s_out, s_in)
    assert torch.allclose(torch.trace(dw @ h @ dw.T), torch.trace(dwt @ ht @ dwt.T), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 576])
def test_sign_packing_round_trip(n):
    s = random_signs(n, torch.Generator().manual_seed(n))
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(unpack_signs(packed, n), s)
