import pytest
import torch

from requant.quantizers.qtip.trellis import (
    Trellis,
    code_table,
    codes_to_path,
    decode,
    path_to_codes,
    quantize_sequences,
    viterbi,
)

# (L, K, V, T): tiny trellises, covering both state layouts (L − KV ≥ KV and L − KV < KV) and V = 2
TINY = [(4, 1, 1, 8), (4, 2, 1, 6), (3, 2, 1, 6), (5, 1, 2, 10), (6, 2, 2, 8)]


def _stream_states(streams: torch.Tensor, n_bits: int, trellis: Trellis, steps: int) -> torch.Tensor:
    """States of cyclic bitstreams given as integers (first bit = most significant), from the definition:
    step i reads the L bits starting at bit i·KV, wrapping around."""
    full = (1 << n_bits) - 1
    out = []
    for i in range(steps):
        r = (i * trellis.kv) % n_bits
        rot = ((streams << r) | (streams >> (n_bits - r))) & full if r else streams
        out.append(rot >> (n_bits - trellis.L))
    return torch.stack(out, 1)


def _cost(states: torch.Tensor, x: torch.Tensor, trellis: Trellis) -> torch.Tensor:
    recon = trellis.values()[states].reshape(states.shape[0], -1)
    return (recon - x.reshape(1, -1)).square().sum(1)


@pytest.mark.parametrize("code", ["1mad", "3inst"])
def test_code_is_standardized_and_bell_shaped(code):
    t = code_table(12, 1, code)
    assert t.shape == (4096, 1) and abs(float(t.mean())) < 1e-6 and abs(float(t.square().mean()) - 1) < 1e-5
    assert 0.6 < float((t.abs() < 1).float().mean()) < 0.76  # N(0, 1): 0.683
    assert torch.equal(code_table(12, 1, code), t) and code_table(12, 2, code).shape == (4096, 2)


@pytest.mark.parametrize(("L", "K", "V", "T"), TINY)
def test_viterbi_equals_brute_force_over_all_paths(L, K, V, T):
    tr = Trellis(L, K, V)
    steps = T // V
    g = torch.Generator().manual_seed(L * 100 + K * 10 + V)
    x = torch.randn(1, steps, V, generator=g)
    n_bits = L + tr.kv * (steps - 1)  # a free (not tail-biting) path: the first state plus KV bits a step
    streams = torch.arange(1 << n_bits)
    states = torch.stack([(streams >> (n_bits - L - i * tr.kv)) & ((1 << L) - 1) for i in range(steps)], 1)
    best = _cost(states, x, tr).min()
    path = viterbi(x, tr)
    assert ((path[:, 1:] >> tr.kv) == (path[:, :-1] & ((1 << tr.overlap) - 1))).all()
    assert torch.allclose(_cost(path, x, tr), best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("L", "K", "V", "T"), TINY)
def test_exact_tail_biting_equals_brute_force_over_all_streams(L, K, V, T):
    tr = Trellis(L, K, V)
    g = torch.Generator().manual_seed(L + K + V)
    x = torch.randn(3, T, generator=g)
    n_bits = K * T
    states = _stream_states(torch.arange(1 << n_bits), n_bits, tr, T // V)
    res = quantize_sequences(x, tr, exact=True)
    for i in range(3):
        assert torch.allclose(res.cost[i], _cost(states, x[i], tr).min(), rtol=1e-5, atol=1e-6)
    # the stored K-bit pieces are the stream itself: decoding it from the definition gives the reconstruction
    stream = torch.zeros(3, dtype=torch.int64)
    for j in range(T):
        stream = (stream << K) | res.codes[:, j].long()
    ref = tr.values()[_stream_states(stream, n_bits, tr, T // V)].reshape(3, T)
    assert torch.equal(ref, res.recon)


@pytest.mark.parametrize(("L", "K", "V", "T"), [*TINY, (10, 2, 1, 64), (12, 3, 2, 32)])
def test_approximate_tail_biting_is_valid_and_decodes_to_reported_reconstruction(L, K, V, T):
    tr = Trellis(L, K, V)
    x = torch.randn(16, T, generator=torch.Generator().manual_seed(T))
    res = quantize_sequences(x, tr)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == x.shape and int(res.codes.max()) < 1 << K
    assert torch.equal(decode(res.codes, tr), res.recon)
    assert torch.allclose(res.cost, (res.recon - x).square().sum(1))
    path = codes_to_path(res.codes, tr)
    nxt = torch.roll(path, -1, dims=1)  # the last state's successor is the first: the stream wraps
    assert ((nxt >> tr.kv) == (path & ((1 << tr.overlap) - 1))).all()
    assert torch.equal(path_to_codes(path, tr), res.codes)
    if tr.overlap <= 4:
        exact = quantize_sequences(x, tr, exact=True)
        assert (res.cost >= exact.cost - 1e-4).all()


def test_constrained_viterbi_meets_the_overlap():
    tr = Trellis(8, 2, 1)
    x = torch.randn(6, 20, 1, generator=torch.Generator().manual_seed(0))
    ov = torch.tensor([0, 1, 5, 17, 40, 63])
    path = viterbi(x, tr, ov)
    assert torch.equal(path[:, 0] >> tr.kv, ov) and torch.equal(path[:, -1] & 63, ov)


def test_codes_and_paths_round_trip():
    for tr in (Trellis(10, 2, 1), Trellis(12, 3, 2), Trellis(7, 3, 1)):
        codes = torch.randint(0, 1 << tr.K, (5, 24), generator=torch.Generator().manual_seed(tr.L), dtype=torch.uint8)
        assert torch.equal(path_to_codes(codes_to_path(codes, tr), tr), codes)


def test_tcq_beats_the_best_scalar_quantizer_and_respects_shannon():
    # 2 bits/weight on N(0, 1): Lloyd–Max scalar MSE 0.1175, distortion-rate bound 2^(−2R) = 0.0625
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    mse = float(quantize_sequences(x, Trellis(8, 2, 1)).cost.sum() / x.numel())
    assert 0.0625 < mse < 0.1175 * 0.8


def test_invalid_trellises():
    with pytest.raises(ValueError, match="V=3"):
        Trellis(8, 2, 3)
    with pytest.raises(ValueError, match="L=3"):
        Trellis(3, 2, 2)
    with pytest.raises(ValueError, match="code"):
        Trellis(8, 2, 1, "lut")
    with pytest.raises(ValueError, match="cannot hold"):
        quantize_sequences(torch.zeros(1, 4), Trellis(12, 2, 1))
