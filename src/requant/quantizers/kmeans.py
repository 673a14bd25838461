"""Weighted 1-D k-means per row, exact sums (no binning): the core of SqueezeLLM's quantizer.

Each row is sorted once and reduced to float64 prefix sums of w and w·x. In 1-D the nearest-centroid clusters
of sorted centroids are contiguous runs of the sorted row, so a clustering is k-1 boundaries in it.

Two solvers. The exact one (C kernel only) is a dynamic program over the row's distinct values that finds
the global minimum of the weighted SSE (divide and conquer on monotone argmins, O(k·m log m) per row). The
heuristic (C kernel, and the pure-PyTorch reference below, vectorised over rows and starts): Lloyd, where an
iteration is a binary search of the k-1 centroid midpoints plus prefix-sum differences, O(k log n) per row,
from several starts; its fixed points are then polished by moves Lloyd cannot make, each an exact SSE
decrease: merge the cheapest adjacent pair of clusters while splitting the cluster that gains most (moves a
centroid across the row, e.g. into a heavy tail), and move each boundary to its best position within a few
points with its neighbours fixed. Lloyd re-settles the rows that moved. On real layers the heuristic ends a
few percent above the optimum (and ~5% below per-row scikit-learn KMeans).

The C kernel (csrc/kmeans1d.c, rows in parallel) is built on first use by requant.native; without a C
compiler, or with REQUANT_KERNELS=0, the PyTorch reference heuristic runs instead. `backend()` says which.

Zero-weight entries take part only in the final nearest-centroid coding, so the fit is exactly the fit of
the row without them. Rows are independent: the k-means++ draws come from a counter-based generator keyed
by the seed and a hash of the row's weighted entries, so a row's result does not depend on the other rows
or its position, and refitting a subset of rows (Algorithm 1 does) gives those rows' results again.
"""

from __future__ import annotations

import ctypes
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..native import NativeLibrary

__all__ = ["EXACT_BUDGET", "KMeansResult", "backend", "weighted_kmeans_1d"]

_BAND = 2  # a boundary move tries ±_BAND positions
_PP_RUNS = 4  # k-means++ runs on a coreset of _PP_RUNS·k equal-weight runs per row
_POLISH_ROUNDS = 30  # at most this many move-then-Lloyd rounds (they stop earlier when nothing moves)
# A polish move must gain more than this fraction of the row's 1-cluster SSE: prefix-sum rounding is about
# n·1e-16 of it, so smaller "gains" are noise and could make the descent cycle.
_REL_GAIN = 1e-11
_TINY = 1e-300  # keeps (Σw·x)²/Σw = 0/0 at 0 for empty runs (their Σw·x is exactly 0 too)
# The constants above are repeated in csrc/kmeans1d.c (RQ_BAND, ...); test_kmeans checks both paths agree.

_pools: dict[int, ThreadPoolExecutor] = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_uint64
    lib.rq_kmeans1d.argtypes = [p, i32, p, i32, i64, i64, i64, i64, i32, u64, f64, i32, i64, p, p, p, i32]
    lib.rq_kmeans1d.restype = ctypes.c_int
    lib.rq_round.argtypes = [p, p, i64, i32]
    lib.rq_round.restype = None
    lib.rq_row_key.argtypes = [p, p, i64, u64]
    lib.rq_row_key.restype = u64
    lib.rq_uniform.argtypes = [u64, u64]
    lib.rq_uniform.restype = f64


_NATIVE = NativeLibrary(Path(__file__).parent / "csrc" / "kmeans1d.c", 1, _declare)
# Centroid roundings the kernel does itself (its round mode): as `c.clamp(finfo).to(dtype)` below.
_ROUNDING = {None: 0, torch.float64: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
# Rows whose exact DP costs at most k·m·log2(m) <= EXACT_BUDGET are solved exactly by default. At the limit
# (e.g. k = 16 and 16k distinct values) a row takes a few ms on one core, ~10x the heuristic; SmolLM2-135M's
# rows (k <= 16, m <= ~800 distinct values) take 15–100 µs.
EXACT_BUDGET = 1 << 22
_ERRORS = {1: "x contains NaN or infinite values", 2: "weight must be finite and non-negative"}


def backend() -> str:
    """Which implementation weighted_kmeans_1d uses: 'c (loaded (<isa>))' or 'torch (<why not C>)'."""
    return f"c ({_NATIVE.reason})" if _NATIVE.get() is not None else f"torch ({_NATIVE.reason})"


@dataclass(frozen=True)
class KMeansResult:
    """Per-row clustering: centroids (rows, k) float32 ascending, codes (rows, n), objective (rows,) float64.

    `objective` is the weighted SSE Σ w·(x − centroids[code])² in units of weight × x², for the returned
    (possibly rounded) centroids and codes and the effective weights (a row whose weights are all zero is
    fitted, and scored, with uniform weights). Codes are uint8 for k ≤ 256, else int16.
    """

    centroids: torch.Tensor
    codes: torch.Tensor
    objective: torch.Tensor


def kmeans_sample_weights(
    importance: torch.Tensor | None, exclude: torch.Tensor | None, shape: tuple[int, int]
) -> torch.Tensor:
    """k-means sample weights: importance with excluded entries at 0; rows with no weight left fall back to
    uniform weights over their kept entries (SqueezeLLM's rule for all-zero Fisher rows)."""
    keep = torch.ones(shape, dtype=torch.float32) if exclude is None else (~exclude).float()
    if importance is None:
        return keep
    w = importance.float().clamp_min(0) * keep
    dead = w.sum(1) == 0
    if dead.any():
        w[dead] = keep[dead]
    return w


def weighted_kmeans_1d(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    k: int,
    *,
    max_iter: int = 100,
    n_init: int = 3,
    seed: int = 0,
    tol: float = 0.0,
    round_centroids_to: torch.dtype | None = None,
    exact: bool | None = None,
) -> KMeansResult:
    """Cluster each row of x (rows, n) into k weighted 1-D clusters; objective is Σ w·(x − c)² (weight × x²).

    `weight` (rows, n) must be non-negative (None = uniform); zero-weight entries do not move centroids but
    still get the nearest code, and an all-zero row falls back to uniform weights. With `round_centroids_to`
    (e.g. torch.float16) centroids are rounded to that dtype before the final assignment, so codes and
    objective are exact for the stored centroids. A row's result never depends on the other rows.

    `exact`: True solves every row exactly (the global minimum, by dynamic programming in the C kernel;
    RuntimeError without it). None (default) does so for each row whose DP cost k·m·log2(m) (m: its distinct
    weighted values) is at most EXACT_BUDGET, when the C kernel is available, and runs the heuristic
    otherwise. False always runs the heuristic: `n_init` starts, the best per row kept (density^(1/3)
    quantiles, weighted quantiles, then weighted k-means++ draws keyed by `seed` and the row's own entries),
    each by Lloyd until a fixed point or `max_iter` iterations (`tol` > 0 also stops a start once no centroid
    moved more than tol × the row's value range), then polish moves. The heuristic is the same in C and in
    PyTorch (the reference); its objective is typically a few percent above the exact one.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, n), got shape {tuple(x.shape)}")
    if not 1 <= k <= 32768:
        raise ValueError(f"k must be in [1, 32768], got {k}")
    if n_init < 1 or max_iter < 0 or tol < 0:
        raise ValueError("need n_init >= 1, max_iter >= 0 and tol >= 0")
    if weight is not None and weight.shape != x.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match x shape {tuple(x.shape)}")
    rows, n = x.shape
    code_dtype = torch.uint8 if k <= 256 else torch.int16
    if rows == 0 or n == 0:
        return KMeansResult(
            torch.zeros(rows, k, dtype=torch.float32),
            torch.zeros(rows, n, dtype=code_dtype),
            torch.zeros(rows, dtype=torch.float64),
        )
    x = x.detach().cpu().contiguous()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # exact for fp16/bf16
    # The kernel rounds to these dtypes itself and indexes a row with 32-bit integers.
    lib = _NATIVE.get() if round_centroids_to in _ROUNDING and n < 2**31 else None
    if lib is not None:
        budget = 0 if exact is False else (2**63 - 1 if exact else EXACT_BUDGET)
        return _fit_native(lib, x, weight, k, max_iter, n_init, seed, tol, round_centroids_to, budget)
    if exact:
        why = _NATIVE.reason if round_centroids_to in _ROUNDING else f"it does not round to {round_centroids_to}"
        raise RuntimeError(f"exact k-means needs the C kernel, which is unavailable: {why}")
    return _fit_torch(x, weight, k, max_iter, n_init, seed, tol, round_centroids_to)


def _fit_native(lib, x, weight, k, max_iter, n_init, seed, tol, round_to, budget: int) -> KMeansResult:
    """weighted_kmeans_1d through csrc/kmeans1d.c (validated there: it reports non-finite x, bad weights)."""
    rows, n = x.shape
    w_kind, w = 0, None
    if weight is not None:
        w = weight.detach().cpu()
        if w.dtype not in (torch.float32, torch.float64):
            w = w.double()
        w = w.contiguous()
        w_kind = 1 if w.dtype == torch.float32 else 2
    centroids = torch.empty(rows, k, dtype=torch.float32)
    codes = torch.empty(rows, n, dtype=torch.uint8 if k <= 256 else torch.int16)
    objective = torch.empty(rows, dtype=torch.float64)
    err = lib.rq_kmeans1d(
        x.data_ptr(),
        int(x.dtype == torch.float64),
        None if w is None else w.data_ptr(),
        w_kind,
        rows,
        n,
        k,
        max_iter,
        n_init,
        seed % 2**64,
        tol,
        _ROUNDING[round_to],
        budget,
        centroids.data_ptr(),
        codes.data_ptr(),
        objective.data_ptr(),
        torch.get_num_threads(),
    )
    if err & 4:
        raise MemoryError(f"weighted_kmeans_1d: out of memory for rows of {n} entries and k = {k}")
    if err:
        raise ValueError(_ERRORS[1 if err & 1 else 2])
    return KMeansResult(centroids, codes, objective)


def _fit_torch(x, weight, k, max_iter, n_init, seed, tol, round_centroids_to) -> KMeansResult:
    """weighted_kmeans_1d in PyTorch, vectorised over rows and starts: the reference for the C kernel."""
    rows, n = x.shape
    code_dtype = torch.uint8 if k <= 256 else torch.int16
    if not torch.isfinite(x).all():
        raise ValueError(_ERRORS[1])
    w, masked = _effective_weights(weight, x.shape)

    with torch.no_grad():
        # Zero-weight entries sort to the end (key +inf), so row r's weighted points are [0, ends[r]).
        key = torch.where(w > 0, x, math.inf) if masked else x
        order = torch.from_numpy(_argsort_rows(key.numpy()))
        xs_abs = key.gather(1, order).double()
        ends = (w > 0).sum(1) if masked else torch.full((rows,), n)
        # Shift rows by their weighted median: cumulative Σw·x then stays near the row's own spread, so
        # cluster sums (differences of it) lose few digits.
        shift = xs_abs.gather(1, (ends // 2)[:, None])
        xs = xs_abs - shift
        # Finite copy with one padding column; the tail (zero-weight entries, padding) holds the last value.
        xp = torch.cat([xs, xs.gather(1, (ends - 1)[:, None])], dim=1)
        if masked:
            xp = torch.where(torch.arange(n + 1) < ends[:, None], xp, xp[:, n : n + 1])
        ws = w.gather(1, order) if w is not None else None
        wx = xp[:, :n] if ws is None else ws * xp[:, :n]
        # Prefix sums as one complex tensor, Σw + i·Σw·x, so one `take` fetches both (leading zero column).
        pz = torch.zeros(rows, n + 1, dtype=torch.complex128)
        pz[:, 1:] = torch.complex(torch.ones_like(wx) if ws is None else ws, wx).cumsum(1)
        tot = pz[:, n]
        sse1 = ((wx * xp[:, :n]).sum(1) - tot.imag**2 / tot.real).clamp_min(0)
        thresh = (_REL_GAIN * sse1 + _TINY)[:, None]
        base = torch.arange(rows) * (n + 1)

        if k == 1 or n == 1:
            g = torch.cat([base[:, None], (base + ends)[:, None].expand(rows, k)], dim=1)
        else:
            keys = _row_keys(x, w, seed) if n_init > 2 else None
            g = _fit(xs, xp, pz, base, ends, thresh, k, max_iter, n_init, keys, tol)

        c = _centroids(pz.view(-1), g) + shift
        if round_centroids_to is not None:
            info = torch.finfo(round_centroids_to)
            c = c.clamp(info.min, info.max).to(round_centroids_to)  # saturate rather than overflow to inf
        # Code against exactly the centroids that are returned, so the codes are optimal for them.
        c = c.to(torch.float32).double().sort(dim=1).values
        mids = 0.5 * (c[:, 1:] + c[:, :-1])  # exact: c holds float32 values
        inner = torch.searchsorted(xs_abs, mids)
        # Codes along the sorted row: position i gets the number of boundaries ≤ i.
        marks = torch.zeros(rows, n + 1, dtype=code_dtype)
        marks.scatter_add_(1, inner, torch.ones(1, 1, dtype=code_dtype).expand_as(inner))
        sorted_codes = marks.cumsum(1, dtype=code_dtype)[:, :n]
        if masked:
            # The zero-weight tail is not in value order: code those few entries by direct comparison.
            tail = torch.arange(n) >= ends[:, None]
            r = tail.nonzero()[:, 0]
            vals = x.view(-1).take(order[tail] + r * n).double()
            sorted_codes[tail] = (vals[:, None] >= mids[r]).sum(1).to(code_dtype)
        codes = torch.empty(rows, n, dtype=code_dtype).scatter_(1, order, sorted_codes)
        # Summed directly from the unshifted values: prefix sums of w·x² would lose ~1e-8 relative to
        # cancellation, and shifted values lose absolute precision near zero.
        err = x.double() - c.gather(1, codes.long())
        objective = (err * err if w is None else w * err * err).sum(1)
    return KMeansResult(c.float(), codes, objective)


def _effective_weights(weight: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor | None, bool]:
    """float64 weights (None = uniform) with dead rows made uniform, and whether any entry has weight 0."""
    if weight is None:
        return None, False
    if weight.shape != shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match x shape {tuple(shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    lo, hi = w.aminmax()
    if not (lo >= 0 and math.isfinite(hi)):  # also false for NaN
        raise ValueError("weight must be finite and non-negative")
    if lo > 0:
        return w, False
    # SqueezeLLM's convention: a row with no importance at all is clustered as if every entry mattered.
    dead = w.amax(1) == 0
    if dead.any():
        w = torch.where(dead[:, None], 1.0, w)
    return w, bool((w == 0).any())


def _argsort_rows(a: np.ndarray) -> np.ndarray:
    """Row-wise argsort: numpy's SIMD sort, row blocks in threads, is several times faster than torch's."""
    threads = min(torch.get_num_threads(), a.shape[0] // 64)
    if threads <= 1 or a.size < 1 << 16:
        return np.argsort(a, axis=1)
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="requant-kmeans")
    out = np.empty(a.shape, dtype=np.int64)
    step = -(-a.shape[0] // threads)

    def block(i: int) -> None:
        out[i : i + step] = np.argsort(a[i : i + step], axis=1)

    list(pool.map(block, range(0, a.shape[0], step)))
    return out


_GOLDEN = 0x9E3779B97F4A7C15


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - 2**64 if c >= 2**63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 bit patterns (multiplication wraps mod 2^64), as mix64 in kmeans1d.c."""
    z = (z ^ _shr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _i64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def _row_keys(x: torch.Tensor, w: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Per-row random key (rows,) int64: the seed mixed with an order-free hash of the weighted entries.

    Entries of weight 0 are left out, so masking entries of a row changes its key only through what is left.
    """
    xb = x.double().view(torch.int64)
    wb = torch.ones_like(x, dtype=torch.float64) if w is None else w
    term = _mix64(xb ^ (wb.view(torch.int64) * _i64(_GOLDEN)))
    if w is not None:
        term = torch.where(w != 0, term, 0)
    h = term.sum(1)  # wraps mod 2^64, so the order of summation does not matter
    return _mix64(h ^ _mix64(torch.tensor(_i64((seed + _GOLDEN) % 2**64))))


def _row_uniforms(keys: torch.Tensor, count: int) -> torch.Tensor:
    """(rows, count) float64 uniforms in [0, 1): 53 bits of mix64(key + (j+1)·golden) for j < count."""
    j = torch.arange(1, count + 1, dtype=torch.int64) * _i64(_GOLDEN)
    return _shr(_mix64(keys[:, None] + j), 11).double() * 2.0**-53


def _centroids(pzf: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cluster means (A, k) for global boundaries g (A, k+1); an empty cluster copies a neighbour."""
    d = pzf.take(g).diff(dim=1)
    full = d.real > 0
    c = d.imag / d.real
    fwd = torch.where(full, c, -math.inf).cummax(1).values
    bwd = torch.where(full, c, math.inf).flip(1).cummin(1).values.flip(1)
    return torch.where(fwd == -math.inf, bwd, fwd)


def _quantile_edges(cw: torch.Tensor, base: torch.Tensor, ends: torch.Tensor, parts: int) -> torch.Tensor:
    """Global positions (rows, parts+1) cutting each row's weighted points into runs of ~equal weight.

    cw (rows, n+1) is the cumulative weight of the first i points, so searchsorted finds the first i whose
    run reaches each target (the leading 0 never matches, as targets are > 0).
    """
    q = torch.arange(1, parts, dtype=torch.float64) / parts * cw[:, -1:]
    inner = torch.minimum(torch.searchsorted(cw, q), ends[:, None])
    return torch.cat([base[:, None], base[:, None] + inner, (base + ends)[:, None]], dim=1)


def _companding_start(xpf: torch.Tensor, cw: torch.Tensor, base, ends, k: int) -> torch.Tensor:
    """Centroids at the quantiles of density^(1/3), the high-resolution optimal point density for SSE.

    Density comes from 4k equal-weight runs: a run of width Δ has density ∝ 1/Δ, hence a share of
    density^(1/3) ∝ Δ^(2/3). Unlike plain quantiles this gives heavy tails their own centroids.
    """
    parts = 4 * k
    v = xpf.take(_quantile_edges(cw, base, ends, parts))  # run starts, then the padding (= row maximum)
    width = v.diff(dim=1).clamp_min(0)
    mass = width ** (2.0 / 3.0)
    cum = mass.cumsum(1)
    target = (torch.arange(k, dtype=torch.float64) + 0.5) / k * cum[:, -1:]
    j = torch.searchsorted(cum, target).clamp_max(parts - 1)
    m = mass.gather(1, j)
    frac = ((target - cum.gather(1, j) + m) / (m + _TINY)).clamp(0, 1)
    return v.gather(1, j) + frac * width.gather(1, j)


def _quantile_start(xpf: torch.Tensor, cw: torch.Tensor, base, ends, k: int) -> torch.Tensor:
    """Centroids at the weighted (j + ½)/k quantiles."""
    e = _quantile_edges(cw, base, ends, 2 * k)
    return xpf.take(torch.maximum(e[:, 1:-1:2] - 1, base[:, None]))  # the point where the weight crosses


def _kmeanspp_start(pzf: torch.Tensor, cw, base, ends, k: int, draws: int, keys: torch.Tensor) -> torch.Tensor:
    """Weighted k-means++ centroids (rows, draws, k) on a coreset of _PP_RUNS·k equal-weight runs per row.

    A run is represented by its mean and total weight: the k sequential D²-weighted picks then cost O(k²)
    per row instead of O(k·n), while the weighted distribution is preserved. Row r's draws use the uniforms
    of its key (see _row_uniforms).
    """
    rows = base.shape[0]
    d = pzf.take(_quantile_edges(cw, base, ends, _PP_RUNS * k)).diff(dim=1)
    pw = d.real.repeat_interleave(draws, 0)
    pts = (d.imag / (d.real + _TINY)).repeat_interleave(draws, 0)
    u = _row_uniforms(keys, draws * k).view(rows * draws, k)
    d2 = torch.ones_like(pw)
    picks = []
    for j in range(k):
        # Inverse-CDF sampling ∝ w·D² (∝ w for the first pick); with all mass on picks it takes the last run.
        cum = (pw * d2).cumsum(1)
        i = torch.searchsorted(cum, u[:, j : j + 1] * cum[:, -1:], right=True).clamp_max(pw.shape[1] - 1)
        picks.append(pts.gather(1, i))
        d2 = torch.minimum(d2, (pts - picks[-1]) ** 2) if j else (pts - picks[-1]) ** 2
    return torch.cat(picks, dim=1).sort(dim=1).values.view(rows, draws, k)


def _fit(xs, xp, pz, base, ends, thresh, k, max_iter, n_init, keys, tol) -> torch.Tensor:
    """Best-of-n_init Lloyd, then polish; returns global boundaries (rows, k+1) into the flat prefix sums."""
    rows = xs.shape[0]
    pzf, xpf = pz.view(-1), xp.view(-1)
    cw = pz.real.contiguous()
    starts = [_companding_start(xpf, cw, base, ends, k)[:, None]]
    if n_init > 1:
        starts.append(_quantile_start(xpf, cw, base, ends, k)[:, None])
    if n_init > 2:
        starts.append(_kmeanspp_start(pzf, cw, base, ends, k, n_init - 2, keys))
    c0 = torch.cat(starts, dim=1)  # (rows, S, k)
    s = c0.shape[1]
    xs2 = 2 * xs  # Lloyd searches c_j + c_{j+1} in 2x: no halving of the midpoints per iteration
    span = (xp.gather(1, (ends - 1)[:, None]) - xp[:, :1]) * tol
    inner = torch.searchsorted(xs2, (c0[..., 1:] + c0[..., :-1]).view(rows, -1)).view(rows, s, k - 1)
    b = base.view(rows, 1, 1)
    g = torch.cat([b.expand(rows, s, 1), b + inner, (b + ends.view(rows, 1, 1)).expand(rows, s, 1)], dim=2)
    g = _lloyd(pzf, xpf, xs2, g, base, max_iter, span)
    if s > 1:
        d = pzf.take(g).diff(dim=-1)
        gain = (d.imag**2 / (d.real + _TINY)).sum(-1)  # 1-cluster SSE minus the clustering's SSE
        g = g[torch.arange(rows), gain.argmax(1)]
    else:
        g = g[:, 0]
    return _polish(pzf, xpf, xs2, g, base, thresh, max_iter, span)


def _lloyd(pzf, xpf, xs2, g, base, max_iter, span) -> torch.Tensor:
    """Lloyd iterations on global boundaries g (rows, S, k+1) until no row moves (or max_iter)."""
    rows, s, kp1 = g.shape
    out = g
    g = g.clone()
    work = torch.arange(rows)  # rows of `out` still iterating; xs2, g, base, span follow it
    base = base.view(rows, 1, 1)
    prev = None
    for _ in range(max_iter):
        d = pzf.take(g).diff(dim=-1)
        # An empty cluster sits at the first weighted value after its boundary: still between its
        # neighbours' means, and its midpoint with the right neighbour re-seeds it from that cluster.
        # cummax irons out last-bit disorder of the means so the boundaries stay sorted.
        c = torch.where(d.real > 0, d.imag / d.real, xpf.take(g[..., :-1])).cummax(-1).values
        a = g.shape[0]
        inner = torch.searchsorted(xs2, (c[..., 1:] + c[..., :-1]).view(a, -1)).view(a, s, kp1 - 2)
        inner += base
        moved = (inner != g[..., 1:-1]).view(a, -1).any(1)
        if prev is not None:
            moved &= ((c - prev).abs().view(a, -1).amax(1, keepdim=True) > span).view(a)
        g[..., 1:-1] = inner
        n_moved = int(moved.sum())
        if n_moved == 0:
            break
        if n_moved <= a // 2:
            # Shrink the batch so settled rows stop costing work (their boundaries are final).
            out[work] = g
            work, g, xs2, base, span, c = work[moved], g[moved], xs2[moved], base[moved], span[moved], c[moved]
        if span.any():
            prev = c
    out[work] = g
    return out


def _polish(pzf, xpf, xs2, g, base, thresh, max_iter, span) -> torch.Tensor:
    """Rounds of exact improving moves, then Lloyd on the rows that moved, until nothing moves."""
    live = torch.arange(g.shape[0])
    for _ in range(_POLISH_ROUNDS):
        b = g[live]
        before = b.clone()
        _split_merge(pzf, xs2[live], b, base[live], thresh[live])
        _band_sweep(pzf, b, 0, thresh[live])
        _band_sweep(pzf, b, 1, thresh[live])
        moved = (b != before).any(1)
        live, b = live[moved], b[moved]
        if live.numel() == 0:
            break
        g[live] = _lloyd(pzf, xpf, xs2[live], b[:, None], base[live], max_iter, span[live])[:, 0]
    return g


def _split_merge(pzf: torch.Tensor, xs2: torch.Tensor, g: torch.Tensor, base: torch.Tensor, thresh) -> None:
    """In place: merge the adjacent pair that costs least and split the cluster that gains most, if it pays.

    Splits are at the cluster mean. With Σw·x² constant, SSE = const − Σ_j (Σw·x)²_j/Σw_j, so both the
    merge cost and the split gain are exact from the prefix sums.
    """
    a, kp1 = g.shape
    k = kp1 - 1
    zb = pzf.take(g)
    d = zb.diff(dim=1)
    q = d.imag**2 / (d.real + _TINY)
    p = torch.searchsorted(xs2, 2 * d.imag / (d.real + _TINY)) + base[:, None]
    p = torch.minimum(torch.maximum(p, g[:, :-1]), g[:, 1:])
    zp = pzf.take(p)
    left, right = zp - zb[:, :-1], zb[:, 1:] - zp
    split = left.imag**2 / (left.real + _TINY) + right.imag**2 / (right.real + _TINY) - q
    pair = d[:, :-1] + d[:, 1:]
    merge = q[:, :-1] + q[:, 1:] - pair.imag**2 / (pair.real + _TINY)
    net = split[:, :, None] - merge[:, None, :]  # (a, k clusters to split, k-1 pairs (j, j+1) to merge)
    j = torch.arange(k)
    clash = (j[:, None] == j[None, :-1]) | (j[:, None] == j[None, :-1] + 1)  # a split of a merged cluster
    best, idx = net.masked_fill(clash, -math.inf).view(a, -1).max(1)
    do = (best > thresh[:, 0]).nonzero()[:, 0]
    if do.numel() == 0:
        return
    si, mi = idx[do] // (k - 1), idx[do] % (k - 1)
    inner = g[do, 1:-1]
    inner[torch.arange(do.numel()), mi] = p[do, si]  # drop boundary between mi and mi+1, add the split
    g[do, 1:-1] = inner.sort(dim=1).values


def _band_sweep(pzf: torch.Tensor, g: torch.Tensor, parity: int, thresh: torch.Tensor) -> None:
    """In place: move every other inner boundary to its best position within ±_BAND, neighbours fixed.

    Boundaries of one parity share no cluster, so they move independently and at once. With the window
    [lo, hi] fixed, maximising Σ (Σw·x)²/Σw over its two halves minimises their SSE.
    """
    kp1 = g.shape[1]
    cur, lo, hi = g[:, 1 + parity : kp1 - 1 : 2], g[:, parity : kp1 - 2 : 2], g[:, 2 + parity :: 2]
    if cur.shape[1] == 0:
        return
    t = (cur[..., None] + torch.arange(-_BAND, _BAND + 1)).clamp(lo[..., None], hi[..., None])
    zt = pzf.take(t)
    left, right = zt - pzf.take(lo)[..., None], pzf.take(hi)[..., None] - zt
    gain = left.imag**2 / (left.real + _TINY) + right.imag**2 / (right.real + _TINY)
    best, j = gain.max(-1)
    better = best > gain[..., _BAND] + thresh
    g[:, 1 + parity : kp1 - 1 : 2] = torch.where(better, t.gather(-1, j[..., None])[..., 0], cur)
