"""Trellis-coded quantization (TCQ) on QTIP's bitshift trellis (arXiv 2406.11235), vectorised over sequences.

The (L, K, V) bitshift trellis: a sequence of T weights is coded by a cyclic bitstream of K·T bits. Step i
(i = 0 .. S−1, S = T/V) reads the L-bit window that starts at bit i·K·V (wrapping around) as its state s_i and
emits V values code[s_i]. Consecutive states overlap in L − KV bits: s_{i+1} >> KV == s_i mod 2^(L−KV).
Tail-biting (the stream wraps) makes the stream exactly K bits per weight, with no start-up bits.

Codes are computed from the state by a fixed hash (no stored codebook), then standardized over the 2^L states:
- "1mad": one multiply-add mod 2^32 (an LCG step), then the sum of the word's four bytes, which is close to
  Gaussian by the central limit theorem (QTIP's 1MAD idea);
- "3inst": the same LCG step, then mask/XOR the word into two fp16 bit patterns of moderate magnitude and add
  them (QTIP's 3INST idea).
For V = 2 the second value hashes the first word once more.

Encoding is the Viterbi algorithm over all 2^L states: O(2^L · T) time and 4 · 2^(L−KV) · T/V bytes of stored
best-predecessor costs per sequence (L = 12, K = 2, V = 1: ~4k·T operations, 4 KiB per step). Measured on the
shared 2-core CPU: ~5–10 µs per weight at L = 10, ~2.5× that at L = 12 (benchmarks/results/qtip.md). Exact
tail-biting costs 2^(L−KV) runs; the default approximation (QTIP's) costs two: run once on the sequence rotated
by half its length, read the overlap bits where the ends meet, then run once constrained to that overlap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

CODES = ("1mad", "3inst")
_LCG_A, _LCG_B = 34038481, 76625530  # multiplier and increment of the hash's LCG step (mod 2^32)
_MASK32 = (1 << 32) - 1


@dataclass(frozen=True)
class Trellis:
    """An (L, K, V) bitshift trellis with a computed code: L-bit states, K bits/weight, V weights per step."""

    L: int
    K: int
    V: int = 1
    code: str = "1mad"

    def __post_init__(self) -> None:
        if self.V not in (1, 2):
            raise ValueError(f"V={self.V}: only 1 or 2 weights per step are supported")
        if self.code not in CODES:
            raise ValueError(f"code {self.code!r} is not one of {', '.join(CODES)}")
        if not 1 <= self.K * self.V <= 8:
            raise ValueError(f"K·V={self.K * self.V} must be in 1..8")
        if not self.K * self.V <= self.L <= 20:
            raise ValueError(f"L={self.L} must lie in K·V..20")

    @property
    def kv(self) -> int:
        return self.K * self.V

    @property
    def n_states(self) -> int:
        return 1 << self.L

    @property
    def overlap(self) -> int:
        """Bits shared by consecutive states (and by the last and first state of a tail-biting stream)."""
        return self.L - self.kv

    def values(self) -> torch.Tensor:
        """The code: fp32 (2^L, V), standardized to mean 0 and mean square 1 over the states."""
        return code_table(self.L, self.V, self.code)


def _lcg(x: torch.Tensor) -> torch.Tensor:
    return (x * _LCG_A + _LCG_B) & _MASK32


def _byte_sum(x: torch.Tensor) -> torch.Tensor:
    return ((x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)).double()


def _fp16_pair_sum(x: torch.Tensor) -> torch.Tensor:
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60  # keep sign, low exponent bits and mantissa; fix the high exponent
    halves = torch.stack((x >> 16, x & 0xFFFF), -1)
    halves = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)
    return halves.view(torch.float16).double().sum(-1)


@lru_cache(maxsize=16)
def code_table(L: int, V: int, code: str) -> torch.Tensor:
    """Values of the computed code for every L-bit state: fp32 (2^L, V), standardized (see module doc)."""
    x = torch.arange(1 << L, dtype=torch.int64)
    f = _byte_sum if code == "1mad" else _fp16_pair_sum
    cols = []
    for _ in range(V):
        x = _lcg(x)
        cols.append(f(x))
    t = torch.stack(cols, -1)
    t = t - t.mean()
    return (t / t.square().mean().sqrt()).float()


@dataclass
class TrellisCodes:
    """Result of coding B sequences: K-bit pieces of each bitstream (B, T) uint8, the reconstruction
    (B, T) fp32 and its squared error per sequence (B,)."""

    codes: torch.Tensor
    recon: torch.Tensor
    cost: torch.Tensor


def step_costs(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Squared error of every state minus ‖x‖² (constant per step, so argmins are unchanged):
    x (..., V), table (2^L, V) → (..., 2^L)."""
    c2 = table.square().sum(1)
    if table.shape[1] == 1:
        return torch.addcmul(c2, x, table[:, 0], value=-2.0)
    return torch.addmm(c2, x.reshape(-1, x.shape[-1]), table.T, alpha=-2.0).view(*x.shape[:-1], -1)


_STEP_CHUNK_ENTRIES = 1 << 18  # step costs computed per call (B·steps·2^L entries): cache-sized chunks
_SMALL_STEP = 1 << 20  # up to this many B·2^L entries a step runs single-threaded (single_thread_if_small)


@contextmanager
def single_thread_if_small(n_entries: int, limit: int = _SMALL_STEP) -> Iterator[None]:
    """One intra-op thread while working on at most `limit` entries at a time: there, thread start-up and
    contention cost more than the work (measured on the shared 2-core machine: 2 threads made a Viterbi step
    ~10× and a BlockLDLQ pass ~20× slower under load)."""
    old = torch.get_num_threads()
    if n_entries <= limit and old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def viterbi(x: torch.Tensor, trellis: Trellis, overlap: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares state path (B, S) int64 for x (B, S, V) on the trellis (not wrapping around).

    With `overlap` (B,) the path is constrained to s_0 >> KV == overlap == s_{S−1} mod 2^(L−KV), i.e. to
    tail-biting streams whose ends meet in those bits.
    """
    kv, ov, n = trellis.kv, trellis.overlap, trellis.n_states
    with single_thread_if_small(x.shape[0] * n):
        return _viterbi(x, trellis.values().to(x.device), kv, ov, n, overlap)


def _viterbi(
    x: torch.Tensor, table: torch.Tensor, kv: int, ov: int, n: int, overlap: torch.Tensor | None
) -> torch.Tensor:
    """Forward pass keeps only each step's best predecessor cost per overlap value (fp32 (B, 2^ov)); the
    back-tracking recomputes the 2^kv candidate costs of the chosen state, so no argmin over all states
    is needed in the forward pass (several times cheaper on CPU than min() with indices)."""
    b, s_len, _ = x.shape
    dev = x.device
    states = torch.arange(n, device=dev)
    low_ov = (1 << ov) - 1
    # Layout "newest chunk outermost": position p holds state ((p mod 2^ov) << kv) | (p >> ov), so adding the
    # best predecessor cost broadcasts over the outer axis and predecessors group along a middle axis.
    fast = ov >= kv
    state_at = ((states & low_ov) << kv) | (states >> ov) if fast else states
    tab = table[state_at]
    bests = torch.empty(s_len, b, 1 << ov, device=dev)
    best_at = bests.unbind(0)
    cost = step_costs(x[:, 0], tab)
    if overlap is not None:
        cost.masked_fill_((state_at[None] >> kv) != overlap[:, None], torch.inf)
    chunk = max(1, _STEP_CHUNK_ENTRIES // (b * n))
    for c0 in range(1, s_len, chunk):
        e = step_costs(x[:, c0 : c0 + chunk], tab)  # (B, chunk, 2^L)
        for j, ej in enumerate(e.unbind(1)):
            best = best_at[c0 + j]
            if fast:  # state [h | m | t] sits at t·2^ov + h·2^(ov−kv) + m; its successors need [m | t]
                best.view(b, 1 << (ov - kv), 1 << kv).copy_(
                    cost.view(b, 1 << kv, 1 << kv, 1 << (ov - kv)).amin(2).transpose(1, 2)
                )
                cost = ej.view(b, 1 << kv, 1 << ov).add(best[:, None, :]).view(b, n)
            else:  # natural order: predecessors of s are h·2^ov + (s >> kv)
                torch.amin(cost.view(b, 1 << kv, 1 << ov), 1, out=best)
                cost = ej.view(b, 1 << ov, 1 << kv).add(best[:, :, None]).view(b, n)
    if overlap is not None:
        cost.masked_fill_((state_at[None] & low_ov) != overlap[:, None], torch.inf)
    s = state_at[cost.argmin(1)]
    out = [s]
    c2 = table.square().sum(1)
    heads = torch.arange(1 << kv, device=dev)[None] << ov
    x_at = x.unbind(1)
    for i in range(s_len - 1, 0, -1):
        cand = heads | (s >> kv)[:, None]  # (B, 2^kv) predecessors of the chosen state
        c = c2[cand] - 2.0 * (table[cand] * x_at[i - 1][:, None, :]).sum(-1)
        if i > 1:
            c += best_at[i - 1].gather(1, cand >> kv)
        elif overlap is not None:
            c.masked_fill_((cand >> kv) != overlap[:, None], torch.inf)
        s = cand.gather(1, c.argmin(1, keepdim=True))[:, 0]
        out.append(s)
    return torch.stack(out[::-1], 1)


def _as_steps(x: torch.Tensor, trellis: Trellis) -> torch.Tensor:
    b, t = x.shape
    if t % trellis.V:
        raise ValueError(f"sequence length {t} is not a multiple of V={trellis.V}")
    if trellis.K * t < trellis.L:
        raise ValueError(f"a stream of K·T={trellis.K * t} bits cannot hold an L={trellis.L}-bit state")
    return x.reshape(b, t // trellis.V, trellis.V)


def path_to_codes(path: torch.Tensor, trellis: Trellis) -> torch.Tensor:
    """States (B, S) of a tail-biting path → the stream's K-bit pieces (B, S·V) uint8, in stream order."""
    top = path >> trellis.overlap  # the KV bits each step shifts in, which start its window
    if trellis.V == 1:
        return top.to(torch.uint8)
    pieces = torch.stack((top >> trellis.K, top & ((1 << trellis.K) - 1)), -1)
    return pieces.reshape(path.shape[0], -1).to(torch.uint8)


def codes_to_path(codes: torch.Tensor, trellis: Trellis) -> torch.Tensor:
    """K-bit pieces (B, T) of cyclic streams → the state of every step (B, T/V) int64."""
    c = codes.long().reshape(codes.shape[0], -1, trellis.V)
    chunk = (c[..., 0] << trellis.K) | c[..., 1] if trellis.V == 2 else c[..., 0]
    kv, n_chunks = trellis.kv, -(-trellis.L // trellis.kv)
    acc = torch.zeros_like(chunk)
    for j in range(n_chunks):  # the L-bit window starting at chunk i spans chunks i .. i + n_chunks − 1
        acc = (acc << kv) | torch.roll(chunk, -j, dims=1)
    return acc >> (n_chunks * kv - trellis.L)


def decode(codes: torch.Tensor, trellis: Trellis) -> torch.Tensor:
    """Reconstruction (B, T) fp32 of tail-biting streams given as K-bit pieces (B, T)."""
    path = codes_to_path(codes, trellis)
    return trellis.values().to(codes.device)[path].reshape(codes.shape)


def quantize_sequences(x: torch.Tensor, trellis: Trellis, *, exact: bool = False) -> TrellisCodes:
    """Code each row of x (B, T) as a tail-biting stream of K·T bits minimizing the squared error.

    exact=False: QTIP's two-pass approximation of the tail-biting optimum; exact=True: the optimum, by one
    constrained run per value of the L − KV overlap bits (2^(L−KV) runs: for tiny trellises and tests).
    """
    steps = _as_steps(x.float(), trellis)
    # bound the stored best costs (4 · S · 2^(L−KV) bytes per sequence, times 2^(L−KV) runs when exact)
    per_seq = 4 * steps.shape[1] << (trellis.overlap * (2 if exact else 1))
    chunk = max(1, min(_PATH_MEMORY_BYTES // per_seq, _CACHE_ENTRIES >> trellis.L))
    path = torch.cat([_tail_biting_path(c, trellis, exact) for c in steps.split(chunk)])
    codes = path_to_codes(path, trellis)
    recon = decode(codes, trellis)
    return TrellisCodes(codes, recon, (recon - x.float()).square().sum(1))


_PATH_MEMORY_BYTES = 64 << 20
_CACHE_ENTRIES = 1 << 18  # sequences per Viterbi call: B·2^L up to this stays cache-sized (measured fastest)


def _tail_biting_path(steps: torch.Tensor, trellis: Trellis, exact: bool) -> torch.Tensor:
    b, s_len, _ = steps.shape
    if exact:
        n_ov = 1 << trellis.overlap
        rep = steps.repeat_interleave(n_ov, 0)
        ov = torch.arange(n_ov, device=steps.device).repeat(b)
        paths = viterbi(rep, trellis, ov)
        recon = trellis.values().to(steps.device)[paths].reshape(b * n_ov, -1)
        err = (recon - rep.reshape(b * n_ov, -1)).square().sum(1).view(b, n_ov)
        return paths[err.argmin(1) + torch.arange(b, device=steps.device) * n_ov]
    half = s_len // 2
    rot = viterbi(torch.roll(steps, -half, dims=1), trellis)
    ov = rot[:, s_len - half] >> trellis.kv  # the original step 0, inside the rotated run
    return viterbi(steps, trellis, ov)
