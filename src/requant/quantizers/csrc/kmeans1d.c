/* Weighted 1-D k-means per row (SqueezeLLM's quantizer), called through ctypes by requant.quantizers.kmeans.
 *
 * Each row: validate, gather the entries of positive weight, sort them (stable LSD radix sort, so ties keep
 * their column order), shift by the middle value and take float64 prefix sums of w and w·x. Nearest-centroid
 * clusters of sorted centroids are contiguous runs, so a clustering is k-1 boundaries in the sorted row.
 *
 * Exact solution (rows whose cost k·m·log2(m) is within the caller's budget): equal values are merged, then
 * a dynamic program over the m distinct values finds the global minimum of the weighted SSE (see "Exact
 * solution" below: divide and conquer on monotone argmins, breadth first, small parts exhaustively).
 *
 * Heuristic (the other rows; the same algorithm as the PyTorch reference in kmeans.py): starts at
 * density^(1/3) quantiles, weighted quantiles, then weighted k-means++ on a coreset of equal-weight runs;
 * Lloyd from each (k-1 binary searches of centroid midpoints per iteration), the best start kept, then
 * polish moves (split the cluster that gains most while merging the cheapest adjacent pair; move each
 * boundary within ±RQ_BAND), each followed by Lloyd, until nothing moves.
 *
 * Finally: centroids rounded as the caller stores them, codes for every entry (zero-weight ones included)
 * against those centroids, and the objective summed directly from the unshifted values.
 *
 * Rows are independent: the k-means++ random numbers come from a counter-based generator keyed by the seed
 * and a hash of the row's weighted entries, so a row's result never depends on the other rows (or on its
 * position), and refitting a subset of rows reproduces those rows bit for bit.
 *
 * Threads: each call starts up to `threads`-1 detached helpers that claim rows from an atomic counter; the
 * caller claims rows too and waits only for rows already claimed, never for a helper to wake up, so a helper
 * descheduled on a busy machine costs nothing (an OpenMP barrier would stall the call; OpenMP is also not
 * available with every compiler). The job record is reference counted, so a late helper finds no row left
 * and frees it. Calls take microseconds to milliseconds, so starting threads per call (~20 µs) is cheap and
 * avoids a persistent pool (nothing to survive fork).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RQ_BAND 2
#define RQ_PP_RUNS 4
#define RQ_POLISH_ROUNDS 30
#define RQ_REL_GAIN 1e-11
#define RQ_TINY 1e-300
/* Prefix-sum differences of w below this fraction of the row's total weight are rounding noise (~1e-16 of
 * it): the exact DP counts such a cluster's gain as 0, and centroids are kept within their cluster's values. */
#define RQ_WMIN 1e-12
#define RQ_MAX_THREADS 64
#ifndef RQ_BLOCK
#define RQ_BLOCK 128 /* parts of the DP with at most this many (i, a) pairs are searched exhaustively */
#endif
#ifndef RQ_LAYER_BOUND
#define RQ_LAYER_BOUND 1
#endif

int rq_abi_version(void) { return 1; }

const char *rq_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "generic";
#endif
}

/* ------------------------------------------------------------------------------------------------------
 * Hashing and random numbers (mirrored in kmeans.py: _mix64, _row_keys, _row_uniforms) */

#define RQ_GOLDEN 0x9E3779B97F4A7C15ull

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t dbits(double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* uniform in [0, 1): 53 random bits */
static inline double uniform(uint64_t key, uint64_t j) {
    return (double)(mix64(key + (j + 1) * RQ_GOLDEN) >> 11) * 0x1.0p-53;
}

/* ------------------------------------------------------------------------------------------------------
 * fp16 rounding, as torch: double -> float (round to nearest even) -> half (round to nearest even) */

static float f32_to_f16_to_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = u & 0x80000000u;
    uint32_t a = u ^ sign;
    uint32_t h;                                 /* half bits without sign */
    if (a >= 0x7f800000u) {                     /* inf or nan */
        h = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (a >= 0x477ff000u) {              /* rounds to >= 65520: overflow */
        h = 0x7c00u;
    } else if (a < 0x38800000u) {               /* below the smallest normal half: subnormal or zero */
        if (a < 0x33000000u) {                  /* < 2^-25: rounds to 0 (2^-25 itself is a tie to even 0) */
            h = 0;
        } else {
            const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
            const uint32_t shift = 126 - e;     /* value = mant * 2^(e-150); half unit 2^-24 */
            h = mant >> shift;
            const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
            if (rem > halfway || (rem == halfway && (h & 1))) h++;
        }
    } else {
        h = ((a >> 13) - (112u << 10));         /* rebias exponent 127 -> 15 */
        const uint32_t rem = a & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    }
    /* back to float: exact */
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff, out;
    if (e == 0x1f) {
        out = 0x7f800000u | (m << 13);
    } else if (e == 0) {
        if (m == 0) {
            out = 0;
        } else { /* subnormal half: normalise */
            int s = 0;
            while (!(m & 0x400u)) { m <<= 1; s++; }
            out = ((uint32_t)(113 - s) << 23) | ((m & 0x3ffu) << 13);
        }
    } else {
        out = ((e + 112u) << 23) | (m << 13);
    }
    out |= sign;
    float r;
    memcpy(&r, &out, sizeof r);
    return r;
}

static float f32_to_bf16_to_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        u = (u | 0x00400000u) & 0xffff0000u; /* NaN stays a (quiet) NaN */
    } else {
        u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even on the upper 16 bits */
        u &= 0xffff0000u;
    }
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

/* A centroid as kmeans.py stores it: clamp to the target's finite range, double -> float -> target
 * (round mode 0: float32 without clamping, 1: float16, 2: bfloat16, 3: float32 clamped). */
static float round_centroid(double v, int mode) {
    static const double lim[4] = {INFINITY, 65504.0, 0x1.fe0000p+127, 0x1.fffffep+127};
    v = v > lim[mode] ? lim[mode] : (v < -lim[mode] ? -lim[mode] : v);
    const float f = (float)v;
    return mode == 1 ? f32_to_f16_to_f32(f) : (mode == 2 ? f32_to_bf16_to_f32(f) : f);
}

/* For tests: out[i] = round_centroid(in[i], mode). */
void rq_round(const double *in, float *out, int64_t n, int mode) {
    for (int64_t i = 0; i < n; i++) out[i] = round_centroid(in[i], mode);
}

/* ------------------------------------------------------------------------------------------------------
 * One row */

typedef struct {
    double w, s; /* prefix sums of w and w·(x - shift) */
} pw_t;

typedef struct {
    uint64_t key;
    uint32_t idx;
} item_t;

typedef struct {
    int32_t lo, hi;
} dp_span_t;

typedef struct {
    int64_t n, k, n_starts, max_iter, exact_budget;
    int n_init, round_mode, x_f64, w_kind; /* w_kind: 0 none, 1 float32, 2 float64 */
    uint64_t seed;
    double tol;
} params_t;

typedef struct { /* per-thread scratch, sized for one row */
    item_t *items, *tmp;
    double *xs, *ws; /* sorted kept values (shifted; xs[m] repeats the last) and weights */
    pw_t *P;
    int64_t *g, *gbest, *gtmp; /* boundaries: n_starts x (k+1), k+1, k+1 */
    double *c, *prev, *q, *split, *merge, *mids;
    int64_t *p;
    double *run_w, *run_x, *d2, *cum, *v, *width, *mass; /* coreset / companding, up to 4k+1 */
    int64_t *edges;
    double *starts; /* n_starts x k */
    double *W, *Sv, *f0, *f1; /* exact DP: prefix sums and two layers of f, m + 1 each */
    int32_t *opt;             /* exact DP: (k+1) x (m+1) argmins */
    int32_t *pos;             /* exact DP: sorted position after each distinct value, m + 1 */
    dp_span_t *stack;         /* divide-and-conquer queue */
} scratch_t;

static inline uint64_t sortable(double v) {
    uint64_t u = dbits(v);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

/* Stable LSD radix sort of items by key, 8 bits per pass, skipping bytes that all keys share. */
static item_t *radix_sort(item_t *a, item_t *b, int64_t m) {
    uint32_t hist[8][256];
    memset(hist, 0, sizeof hist);
    for (int64_t i = 0; i < m; i++) {
        uint64_t k = a[i].key;
        for (int d = 0; d < 8; d++) hist[d][(k >> (8 * d)) & 0xff]++;
    }
    for (int d = 0; d < 8; d++) {
        uint32_t *h = hist[d];
        if (h[(a[0].key >> (8 * d)) & 0xff] == (uint32_t)m) continue; /* every key has this byte */
        uint32_t sum = 0;
        for (int j = 0; j < 256; j++) {
            uint32_t c = h[j];
            h[j] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < m; i++) b[h[(a[i].key >> (8 * d)) & 0xff]++] = a[i];
        item_t *t = a;
        a = b;
        b = t;
    }
    return a;
}

/* Stable LSD radix sort of 64-bit words by their upper 32 bits (float32 key above a column index). */
static uint64_t *radix_sort32(uint64_t *a, uint64_t *b, int64_t m) {
    uint32_t hist[4][256];
    memset(hist, 0, sizeof hist);
    for (int64_t i = 0; i < m; i++) {
        const uint32_t k = (uint32_t)(a[i] >> 32);
        hist[0][k & 0xff]++;
        hist[1][(k >> 8) & 0xff]++;
        hist[2][(k >> 16) & 0xff]++;
        hist[3][k >> 24]++;
    }
    for (int d = 0; d < 4; d++) {
        uint32_t *h = hist[d];
        const int sh = 32 + 8 * d;
        if (h[(a[0] >> sh) & 0xff] == (uint32_t)m) continue;
        uint32_t sum = 0;
        for (int j = 0; j < 256; j++) {
            uint32_t c = h[j];
            h[j] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < m; i++) b[h[(a[i] >> sh) & 0xff]++] = a[i];
        uint64_t *t = a;
        a = b;
        b = t;
    }
    return a;
}

static inline uint32_t sortable32(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* first i in [0, m) with 2·xs[i] >= t, else m */
static inline int64_t search2(const double *xs, int64_t m, double t) {
    int64_t lo = 0, len = m;
    while (len > 0) {
        int64_t half = len >> 1;
        if (2.0 * xs[lo + half] < t) {
            lo += half + 1;
            len -= half + 1;
        } else {
            len = half;
        }
    }
    return lo;
}

/* search2 starting from a guess h in [0, m]: galloping, O(log distance), for boundaries that move little */
static inline int64_t search2_near(const double *xs, int64_t m, double t, int64_t h) {
    if (h < m && 2.0 * xs[h] < t) { /* answer in (h, m] */
        int64_t lo = h + 1, step = 1;
        while (lo + step <= m && 2.0 * xs[lo + step - 1] < t) {
            lo += step;
            step <<= 1;
        }
        int64_t len = (lo + step <= m ? lo + step : m + 1) - lo; /* answer in [lo, lo + len - 1] */
        len -= 1;
        while (len > 0) {
            int64_t half = len >> 1;
            if (2.0 * xs[lo + half] < t) {
                lo += half + 1;
                len -= half + 1;
            } else {
                len = half;
            }
        }
        return lo;
    }
    /* answer in [0, h]: xs[h] >= t/2 (or h = m) */
    int64_t hi = h, step = 1;
    while (hi - step >= 0 && 2.0 * xs[hi - step] >= t) {
        hi -= step;
        step <<= 1;
    }
    int64_t lo = hi - step + 1 > 0 ? hi - step + 1 : 0; /* 2·xs[lo-1] < t or lo = 0; answer in [lo, hi] */
    int64_t len = hi - lo;
    while (len > 0) {
        int64_t half = len >> 1;
        if (2.0 * xs[lo + half] < t) {
            lo += half + 1;
            len -= half + 1;
        } else {
            len = half;
        }
    }
    return lo;
}

/* first i in [0, len) with a[i] >= t, else len */
static inline int64_t lower_bound(const double *a, int64_t len, double t) {
    int64_t lo = 0;
    while (len > 0) {
        int64_t half = len >> 1;
        if (a[lo + half] < t) {
            lo += half + 1;
            len -= half + 1;
        } else {
            len = half;
        }
    }
    return lo;
}

/* (Σw·x)²/Σw of the sorted points [a, b): the SSE decrease a cluster gives over Σw·x² */
static inline double seg_q(const pw_t *P, int64_t a, int64_t b) {
    const double w = P[b].w - P[a].w, s = P[b].s - P[a].s;
    return s * s / (w + RQ_TINY);
}

/* Positions e[0..parts] cutting the m weighted points into runs of about equal weight: e[t] is the first i
 * with P[i].w >= t/parts of the total (targets increase, so one walk finds them all). */
static void quantile_edges(const pw_t *P, int64_t m, int64_t parts, int64_t *e) {
    const double tot = P[m].w;
    int64_t i = 0;
    e[0] = 0;
    for (int64_t t = 1; t < parts; t++) {
        const double q = (double)t / (double)parts * tot;
        while (i < m && P[i].w < q) i++;
        e[t] = i;
    }
    e[parts] = m;
}

/* Centroids at the quantiles of density^(1/3) (see kmeans.py, _companding_start). */
static void companding_start(scratch_t *S, int64_t k, double *out) {
    const int64_t parts = 4 * k;
    for (int64_t t = 0; t <= parts; t++) S->v[t] = S->xs[S->edges[t]];
    double acc = 0;
    for (int64_t t = 0; t < parts; t++) {
        double wd = S->v[t + 1] - S->v[t];
        wd = wd > 0 ? wd : 0;
        S->width[t] = wd;
        S->mass[t] = pow(wd, 2.0 / 3.0);
        acc += S->mass[t];
        S->cum[t] = acc;
    }
    for (int64_t j = 0; j < k; j++) {
        const double target = ((double)j + 0.5) / (double)k * acc;
        int64_t i = lower_bound(S->cum, parts, target);
        if (i > parts - 1) i = parts - 1;
        const double mm = S->mass[i];
        double frac = (target - S->cum[i] + mm) / (mm + RQ_TINY);
        frac = frac < 0 ? 0 : (frac > 1 ? 1 : frac);
        out[j] = S->v[i] + frac * S->width[i];
    }
}

/* Centroids at the weighted (j + ½)/k quantiles. */
static void quantile_start(scratch_t *S, int64_t k, double *out) {
    for (int64_t j = 0; j < k; j++) { /* edge 2j+1 of 2k parts is edge 4j+2 of 4k parts */
        int64_t pos = S->edges[4 * j + 2] - 1;
        out[j] = S->xs[pos > 0 ? pos : 0];
    }
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void sort_small(double *a, int64_t k) {
    if (k > 64) {
        qsort(a, (size_t)k, sizeof *a, cmp_double);
        return;
    }
    for (int64_t i = 1; i < k; i++) {
        double v = a[i];
        int64_t j = i - 1;
        while (j >= 0 && a[j] > v) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = v;
    }
}

/* Weighted k-means++ on a coreset of RQ_PP_RUNS·k equal-weight runs (see kmeans.py, _kmeanspp_start). */
static void kmeanspp_start(scratch_t *S, int64_t k, uint64_t key, int64_t draw, double *out) {
    const int64_t R = RQ_PP_RUNS * k;
    if (draw == 0) { /* the coreset is the same for every draw */
        for (int64_t t = 0; t < R; t++) {
            const pw_t a = S->P[S->edges[t]], b = S->P[S->edges[t + 1]];
            S->run_w[t] = b.w - a.w;
            S->run_x[t] = (b.s - a.s) / (b.w - a.w + RQ_TINY);
        }
    }
    for (int64_t t = 0; t < R; t++) S->d2[t] = 1.0;
    for (int64_t j = 0; j < k; j++) {
        double acc = 0;
        for (int64_t t = 0; t < R; t++) {
            acc += S->run_w[t] * S->d2[t];
            S->cum[t] = acc;
        }
        const double target = uniform(key, (uint64_t)(draw * k + j)) * acc;
        int64_t lo = 0, len = R; /* first t with cum[t] > target (searchsorted right) */
        while (len > 0) {
            int64_t half = len >> 1;
            if (S->cum[lo + half] <= target) {
                lo += half + 1;
                len -= half + 1;
            } else {
                len = half;
            }
        }
        if (lo > R - 1) lo = R - 1;
        const double pick = S->run_x[lo];
        out[j] = pick;
        for (int64_t t = 0; t < R; t++) {
            const double d = S->run_x[t] - pick;
            const double dd = d * d;
            S->d2[t] = (j == 0 || dd < S->d2[t]) ? dd : S->d2[t];
        }
    }
    sort_small(out, k);
}

/* Lloyd iterations on boundaries g[0..k] (g[0] = 0, g[k] = m) until a fixed point or max_iter. */
static void lloyd(scratch_t *S, int64_t m, int64_t k, int64_t *g, int64_t max_iter, double span) {
    const pw_t *P = S->P;
    const double *xs = S->xs;
    double *c = S->c, *prev = S->prev;
    int have_prev = 0;
    for (int64_t it = 0; it < max_iter; it++) {
        for (int64_t j = 0; j < k; j++) {
            const double w = P[g[j + 1]].w - P[g[j]].w;
            /* an empty cluster sits at the first value after its boundary: it re-seeds from its neighbour */
            double cj = w > 0 ? (P[g[j + 1]].s - P[g[j]].s) / w : xs[g[j]];
            if (j > 0 && cj < c[j - 1]) cj = c[j - 1]; /* irons out last-bit disorder */
            c[j] = cj;
        }
        int moved = 0;
        for (int64_t j = 1; j < k; j++) {
            const int64_t b = search2_near(xs, m, c[j - 1] + c[j], g[j]);
            moved |= b != g[j];
            g[j] = b;
        }
        if (span > 0) {
            if (have_prev) {
                double mx = 0;
                for (int64_t j = 0; j < k; j++) mx = fmax(mx, fabs(c[j] - prev[j]));
                if (!(mx > span)) moved = 0;
            }
            memcpy(prev, c, (size_t)k * sizeof *c);
            have_prev = 1;
        }
        if (!moved) break;
    }
}

/* Merge the adjacent pair that costs least while splitting the cluster that gains most (at its mean), if
 * the net gain exceeds thresh. Returns whether it moved. */
static int split_merge(scratch_t *S, int64_t m, int64_t k, int64_t *g, double thresh) {
    if (k < 3) return 0;
    const pw_t *P = S->P;
    double *q = S->q, *split = S->split, *merge = S->merge;
    int64_t *p = S->p;
    for (int64_t j = 0; j < k; j++) {
        const double w = P[g[j + 1]].w - P[g[j]].w, s = P[g[j + 1]].s - P[g[j]].s;
        q[j] = s * s / (w + RQ_TINY);
        int64_t pj = search2(S->xs, m, 2 * s / (w + RQ_TINY));
        pj = pj < g[j] ? g[j] : (pj > g[j + 1] ? g[j + 1] : pj);
        p[j] = pj;
        split[j] = seg_q(P, g[j], pj) + seg_q(P, pj, g[j + 1]) - q[j];
    }
    for (int64_t j = 0; j + 1 < k; j++) merge[j] = q[j] + q[j + 1] - seg_q(P, g[j], g[j + 2]);
    /* best split per merge, excluding the two merged clusters: the top three splits suffice */
    int64_t top[3] = {-1, -1, -1};
    for (int64_t j = 0; j < k; j++) {
        if (top[0] < 0 || split[j] > split[top[0]]) {
            top[2] = top[1];
            top[1] = top[0];
            top[0] = j;
        } else if (top[1] < 0 || split[j] > split[top[1]]) {
            top[2] = top[1];
            top[1] = j;
        } else if (top[2] < 0 || split[j] > split[top[2]]) {
            top[2] = j;
        }
    }
    double best = -INFINITY;
    int64_t bs = -1, bm = -1;
    for (int64_t mi = 0; mi + 1 < k; mi++) {
        for (int t = 0; t < 3; t++) {
            const int64_t s = top[t];
            if (s < 0) break;
            if (s == mi || s == mi + 1) continue;
            const double net = split[s] - merge[mi];
            if (net > best) {
                best = net;
                bs = s;
                bm = mi;
            }
            break;
        }
    }
    if (!(best > thresh)) return 0;
    /* drop boundary g[bm+1] (between bm and bm+1), insert p[bs], keep the inner boundaries sorted */
    int64_t *inner = S->gtmp, cnt = 0;
    for (int64_t j = 1; j < k; j++)
        if (j != bm + 1) inner[cnt++] = g[j];
    const int64_t add = p[bs];
    int64_t i = cnt;
    while (i > 0 && inner[i - 1] > add) {
        inner[i] = inner[i - 1];
        i--;
    }
    inner[i] = add;
    memcpy(g + 1, inner, (size_t)(k - 1) * sizeof *g);
    return 1;
}

/* Move every other inner boundary (parity) to its best position within ±RQ_BAND, neighbours fixed. */
static int band_sweep(const pw_t *P, int64_t k, int64_t *g, int parity, double thresh) {
    int moved = 0;
    for (int64_t b = 1 + parity; b < k; b += 2) {
        const int64_t lo = g[b - 1], hi = g[b + 1], cur = g[b];
        const double here = seg_q(P, lo, cur) + seg_q(P, cur, hi);
        double best = -INFINITY;
        int64_t bt = cur;
        for (int64_t d = -RQ_BAND; d <= RQ_BAND; d++) {
            int64_t t = cur + d;
            t = t < lo ? lo : (t > hi ? hi : t);
            const double gain = seg_q(P, lo, t) + seg_q(P, t, hi);
            if (gain > best) {
                best = gain;
                bt = t;
            }
        }
        if (best > here + thresh && bt != cur) {
            g[b] = bt;
            moved = 1;
        }
    }
    return moved;
}

/* Boundaries from starting centroids c0 (k, ascending). */
static void boundaries_from(const double *xs, int64_t m, int64_t k, const double *c0, int64_t *g) {
    g[0] = 0;
    for (int64_t j = 1; j < k; j++) g[j] = search2_near(xs, m, c0[j - 1] + c0[j], g[j - 1]); /* sums increase */
    g[k] = m;
}

static double clustering_gain(const pw_t *P, int64_t k, const int64_t *g) {
    double t = 0;
    for (int64_t j = 0; j < k; j++) t += seg_q(P, g[j], g[j + 1]);
    return t;
}

/* ------------------------------------------------------------------------------------------------------
 * Exact solution: dynamic program over the sorted distinct values
 *
 * f_j(i) = min over a < i of f_{j-1}(a) - (S_i - S_a)²/(W_i - W_a) is minus the largest Σ (Σw·x)²/Σw of j
 * contiguous clusters of the first i points, i.e. their SSE minus Σw·x². The cost is concave Monge, so the
 * minimising a is non-decreasing in i (divide and conquer: O(m log m) per j) and in j (opt_{j-1}(i) <=
 * opt_j(i) bounds each search from below). */

#ifndef RQ_VW /* lanes of the DP scan: 4 doubles (one ymm) measured fastest, also with AVX-512 (AMD Zen 4) */
#if defined(__AVX__)
#define RQ_VW 4
#else
#define RQ_VW 2
#endif
#endif
typedef double vdbl __attribute__((vector_size(RQ_VW * 8)));
typedef int64_t vlng __attribute__((vector_size(RQ_VW * 8)));

#define RQ_SELECT(mask, a, b) (((a) & (mask)) | ((b) & ~(mask)))
#define RQ_SELECTD(mask, a, b) ((vdbl)RQ_SELECT(mask, (vlng)(a), (vlng)(b)))

#if defined(__clang__)
#define RQ_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define RQ_SHUFFLE(v, ...) __builtin_shuffle(v, (vlng){__VA_ARGS__})
#endif

/* Lane-wise: keep (v, i) of the other half where it is smaller, or equal with a smaller index. */
#define RQ_FOLD(...)                                                             \
    do {                                                                         \
        const vdbl ov = RQ_SHUFFLE(vbest, __VA_ARGS__);                          \
        const vlng oi = RQ_SHUFFLE(vba, __VA_ARGS__);                            \
        const vlng take = (ov < vbest) | ((ov == vbest) & (oi < vba));           \
        vbest = RQ_SELECTD(take, ov, vbest);                                     \
        vba = RQ_SELECT(take, oi, vba);                                          \
    } while (0)

/* min over a in [a0, a1] of f[a] - q(a, i) with q = (Si - S[a])²/(Wi - W[a]), and its smallest argmin.
 * A cluster lighter than wmin (rounding noise of the prefix sums) gains q = 0 instead of noise/noise. Vector
 * loads read up to 2·RQ_VW - 1 entries past a1 (the arrays are padded); those lanes are masked out by index. No
 * branch depends on the data, so scans of one level overlap in the CPU. */
static inline double dp_scan(const double *W, const double *Sv, const double *f, int64_t a0, int64_t a1, double Wi,
                             double Si, double wmin, int64_t *arg) {
    const vdbl zero = {0}, inf = zero + INFINITY;
    vlng vidx;
    for (int l = 0; l < RQ_VW; l++) vidx[l] = a0 + l;
    /* two independent accumulators, 2·RQ_VW candidates per iteration: most scans take one */
    vdbl vbest = inf, vbest2 = inf;
    vlng vba = vidx, vba2 = vidx;
    for (int64_t a = a0; a <= a1; a += 2 * RQ_VW) {
        vdbl w, sv, fv, w2, sv2, fv2;
        memcpy(&w, W + a, sizeof w);
        memcpy(&sv, Sv + a, sizeof sv);
        memcpy(&fv, f + a, sizeof fv);
        memcpy(&w2, W + a + RQ_VW, sizeof w);
        memcpy(&sv2, Sv + a + RQ_VW, sizeof sv);
        memcpy(&fv2, f + a + RQ_VW, sizeof fv);
        const vlng idx2 = vidx + RQ_VW;
        const vdbl ds = Si - sv, dw = Wi - w, ds2 = Si - sv2, dw2 = Wi - w2;
        const vdbl q = RQ_SELECTD(dw > wmin, ds * ds / dw, zero);
        const vdbl q2 = RQ_SELECTD(dw2 > wmin, ds2 * ds2 / dw2, zero);
        const vdbl v = RQ_SELECTD(vidx <= a1, fv - q, inf);
        const vdbl v2 = RQ_SELECTD(idx2 <= a1, fv2 - q2, inf);
        const vlng lt = v < vbest, lt2 = v2 < vbest2;
        vbest = RQ_SELECTD(lt, v, vbest);
        vba = RQ_SELECT(lt, vidx, vba);
        vbest2 = RQ_SELECTD(lt2, v2, vbest2);
        vba2 = RQ_SELECT(lt2, idx2, vba2);
        vidx = idx2 + RQ_VW;
    }
    { /* merge the accumulators: lane-wise, smaller value, or equal value with smaller index */
        const vlng take = (vbest2 < vbest) | ((vbest2 == vbest) & (vba2 < vba));
        vbest = RQ_SELECTD(take, vbest2, vbest);
        vba = RQ_SELECT(take, vba2, vba);
    }
#if RQ_VW == 8
    RQ_FOLD(4, 5, 6, 7, 0, 1, 2, 3);
    RQ_FOLD(2, 3, 0, 1, 6, 7, 4, 5);
    RQ_FOLD(1, 0, 3, 2, 5, 4, 7, 6);
#elif RQ_VW == 4
    RQ_FOLD(2, 3, 0, 1);
    RQ_FOLD(1, 0, 3, 2);
#else
    RQ_FOLD(1, 0);
#endif
    *arg = vba[0];
    return vbest[0];
}

/* f_j(i), opt_j(i) for every i in [lo, hi] by trying every a in [alo, ahi] (a < i): lanes hold consecutive i,
 * so each keeps its own minimum and nothing is folded across lanes. For small parts this beats halving them
 * further: the scans of a divide and conquer are short and wait on each other's latency. */
static void dp_block(const double *W, const double *Sv, const double *fprev, double *fcur, int32_t *opt, int64_t lo,
                     int64_t hi, int64_t alo, int64_t ahi, double wmin) {
    const vdbl zero = {0}, inf = zero + INFINITY;
    vlng iota;
    for (int l = 0; l < RQ_VW; l++) iota[l] = l;
    for (int64_t i0 = lo; i0 <= hi; i0 += RQ_VW) {
        vdbl wi, si;
        memcpy(&wi, W + i0, sizeof wi);
        memcpy(&si, Sv + i0, sizeof si);
        const vlng vi = iota + i0;
        vdbl best = inf;
        vlng arg = vi - 1;
        const int64_t top = ahi < i0 + RQ_VW - 2 ? ahi : i0 + RQ_VW - 2; /* the largest a any lane may use */
        for (int64_t a = alo; a <= top; a++) { /* scalars broadcast across the lanes */
            const vdbl ds = si - Sv[a], dw = wi - W[a];
            const vdbl q = RQ_SELECTD(dw > wmin, ds * ds / dw, zero);
            const vdbl v = RQ_SELECTD(vi > a, fprev[a] - q, inf);
            const vlng lt = v < best;
            best = RQ_SELECTD(lt, v, best);
            arg = RQ_SELECT(lt, (vlng){0} + a, arg);
        }
        for (int l = 0; l < RQ_VW && i0 + l <= hi; l++) {
            fcur[i0 + l] = best[l];
            opt[i0 + l] = (int32_t)arg[l];
        }
    }
}

/* f_j(i) and opt_j(i) for i in [ilo, ihi] by divide and conquer; optprev (opt_{j-1}) is a lower bound where
 * defined (i <= prev_hi), NULL for none. The split of [ilo, ihi] into halves does not depend on the data, and a
 * part [lo, hi] searches a in [opt(lo - 1), opt(hi + 1)]: the parts run breadth first from a queue, so the
 * scans of one level are independent and overlap in the CPU (depth first, each waited for its parent). */
static void dp_layer(const double *W, const double *Sv, const double *fprev, double *fcur, int32_t *opt,
                     const int32_t *optprev, int64_t prev_hi, int64_t ilo, int64_t ihi, int64_t alo, double wmin,
                     dp_span_t *queue) {
    int64_t head = 0, tail = 0;
    queue[tail++] = (dp_span_t){(int32_t)ilo, (int32_t)ihi};
    while (head < tail) {
        const dp_span_t sp = queue[head++];
        int64_t a0 = sp.lo == ilo ? alo : opt[sp.lo - 1];
        int64_t a1 = sp.hi == ihi ? ihi - 1 : opt[sp.hi + 1];
        if (a0 < a1 && (sp.hi - sp.lo + 1) * (a1 - a0 + 1) <= RQ_BLOCK) {
            dp_block(W, Sv, fprev, fcur, opt, sp.lo, sp.hi, a0, a1, wmin);
            continue;
        }
        if (a0 == a1) { /* every i of the part has the same argmin: no search (about half the parts) */
            const double fa = fprev[a0], wa = W[a0], sa = Sv[a0];
            for (int64_t i = sp.lo; i <= sp.hi; i++) {
                const double ds = Sv[i] - sa, dw = W[i] - wa;
                fcur[i] = fa - (dw > wmin ? ds * ds / dw : 0.0);
                opt[i] = (int32_t)a0;
            }
            continue;
        }
        const int64_t mid = sp.lo + (sp.hi - sp.lo) / 2;
        a1 = a1 < mid - 1 ? a1 : mid - 1;
        if (RQ_LAYER_BOUND && optprev && mid <= prev_hi && optprev[mid] > a0) a0 = optprev[mid] < a1 ? optprev[mid] : a1;
        int64_t arg;
        fcur[mid] = dp_scan(W, Sv, fprev, a0, a1, W[mid], Sv[mid], wmin, &arg);
        opt[mid] = (int32_t)arg;
        if (sp.lo < mid) queue[tail++] = (dp_span_t){sp.lo, (int32_t)(mid - 1)};
        if (mid < sp.hi) queue[tail++] = (dp_span_t){(int32_t)(mid + 1), sp.hi};
    }
}

/* Optimal boundaries g[0..k] of the m > k sorted distinct points with prefix sums W, Sv (m + 1 each). */
static void exact_boundaries(scratch_t *S, int64_t m, int64_t k, int64_t *g) {
    const double *W = S->W, *Sv = S->Sv;
    double *fprev = S->f0, *fcur = S->f1;
    int32_t *opt = S->opt; /* (k+1) x (m+1): opt_j(i) at opt[j*(m+1) + i] */
    const int64_t stride = m + 1;
    const double wmin = RQ_WMIN * W[m];
    /* j = 1: one cluster [0, i) */
    for (int64_t i = 1; i <= m - k + 1; i++) {
        fprev[i] = W[i] > wmin ? -Sv[i] * Sv[i] / W[i] : 0.0;
        opt[stride + i] = 0;
    }
    for (int64_t j = 2; j < k; j++) {
        /* i in [j, m - (k - j)]: every cluster keeps at least one point */
        dp_layer(W, Sv, fprev, fcur, opt + j * stride, j > 2 ? opt + (j - 1) * stride : NULL, m - (k - j + 1), j,
                 m - (k - j), j - 1, wmin, S->stack);
        double *t = fprev;
        fprev = fcur;
        fcur = t;
    }
    int64_t arg;
    dp_scan(W, Sv, fprev, k - 1, m - 1, W[m], Sv[m], wmin, &arg);
    g[k] = m;
    g[k - 1] = arg;
    for (int64_t j = k - 1; j >= 1; j--) g[j - 1] = opt[j * stride + g[j]];
}

/* ------------------------------------------------------------------------------------------------------
 * Heuristic solution: best-of-starts Lloyd, then polish moves (the reference algorithm of kmeans.py) */

static void heuristic_boundaries(const params_t *pr, scratch_t *S, int64_t m, int64_t k, uint64_t h, int64_t *g) {
    double sx = 0, sxx = 0;
    for (int64_t i = 0; i < m; i++) {
        const double wx = S->ws[i] * S->xs[i];
        sx += wx;
        sxx += wx * S->xs[i];
    }
    double sse1 = sxx - sx * sx / S->P[m].w;
    sse1 = sse1 > 0 ? sse1 : 0;
    const double thresh = RQ_REL_GAIN * sse1 + RQ_TINY;
    const double span = (S->xs[m - 1] - S->xs[0]) * pr->tol;
    const int64_t ns = pr->n_starts;
    double *c0 = S->starts;
    /* All three starts cut the row into equal-weight runs: 4k of them (t/(2k) and 2t/(4k) of the total weight
     * are the same doubles, so the 2k-run edges are every other one of these). */
    _Static_assert(RQ_PP_RUNS == 4, "the k-means++ coreset uses the 4k-run edges");
    quantile_edges(S->P, m, 4 * k, S->edges);
    companding_start(S, k, c0);
    if (ns > 1) quantile_start(S, k, c0 + k);
    if (ns > 2) {
        const uint64_t key = mix64(h ^ mix64(pr->seed + RQ_GOLDEN));
        for (int64_t d = 0; d < ns - 2; d++) kmeanspp_start(S, k, key, d, c0 + (2 + d) * k);
    }
    double best = -INFINITY;
    for (int64_t s = 0; s < ns; s++) {
        int64_t *gs = S->g + s * (k + 1);
        boundaries_from(S->xs, m, k, c0 + s * k, gs);
        lloyd(S, m, k, gs, pr->max_iter, span);
        const double gain = clustering_gain(S->P, k, gs);
        if (gain > best) {
            best = gain;
            memcpy(g, gs, (size_t)(k + 1) * sizeof *g);
        }
    }
    for (int r = 0; r < RQ_POLISH_ROUNDS; r++) {
        int moved = split_merge(S, m, k, g, thresh);
        moved |= band_sweep(S->P, k, g, 0, thresh);
        moved |= band_sweep(S->P, k, g, 1, thresh);
        if (!moved) break;
        lloyd(S, m, k, g, pr->max_iter, span);
    }
}

/* DP cost estimate k·m·⌈log2(m+1)⌉ (scans of the divide and conquer) */
static int64_t exact_cost(int64_t m, int64_t k) {
    int64_t lg = 1;
    while ((int64_t)1 << lg <= m) lg++;
    return k * m * lg;
}

/* ------------------------------------------------------------------------------------------------------
 * One row */

/* Fit one row: returns 0, or 1 for a non-finite x, 2 for a negative or non-finite weight. */
static int fit_row(const params_t *pr, scratch_t *S, const void *xrow, const void *wrow, float *cent,
                   void *codes, double *objective) {
    const int64_t n = pr->n, k = pr->k;
    const float *xf = (const float *)xrow;
    const double *xd = (const double *)xrow;
    const float *wf = (const float *)wrow;
    const double *wd = (const double *)wrow;
#define XV(i) (pr->x_f64 ? xd[i] : (double)xf[i])
#define WV(i) (pr->w_kind == 2 ? wd[i] : (double)wf[i])

    /* one pass: validate, and gather the weighted entries as sort keys (float32 x: the key above the column
     * index in one word; float64 x: key and index side by side) */
    int uniform_w = pr->w_kind == 0, bad_x = 0, bad_w = 0;
    int64_t m = 0;
    uint64_t *wa = (uint64_t *)S->items, *wb = (uint64_t *)S->tmp;
#define GATHER(i)                                                         \
    do {                                                                  \
        if (pr->x_f64) {                                                  \
            S->items[m].key = sortable(xd[i]);                            \
            S->items[m].idx = (uint32_t)(i);                              \
        } else {                                                          \
            wa[m] = (uint64_t)sortable32(xf[i]) << 32 | (uint64_t)(i);    \
        }                                                                 \
        m++;                                                              \
    } while (0)
    for (int64_t i = 0; i < n; i++) {
        const double x = XV(i);
        bad_x |= !isfinite(x);
        if (uniform_w) {
            GATHER(i);
        } else {
            const double w = WV(i);
            bad_w |= !(w >= 0) || !isfinite(w);
            if (w > 0) GATHER(i);
        }
    }
    if (bad_x) return 1;
    if (bad_w) return 2;
    if (m == 0) { /* SqueezeLLM's rule: a row without importance counts every entry, with weight 1 */
        uniform_w = 1;
        for (int64_t i = 0; i < n; i++) GATHER(i);
    }
#undef GATHER
    const int masked = m < n;
    const int64_t kept = m; /* m becomes the number of distinct values when they are merged */
#define KEPT(i) (!masked || WV(i) != 0)
#define WEFF(i) (uniform_w ? 1.0 : WV(i))

    /* stable radix sort: ties stay in column order */
    const uint64_t *order32 = pr->x_f64 ? NULL : radix_sort32(wa, wb, m);
    const item_t *order64 = pr->x_f64 ? radix_sort(S->items, S->tmp, m) : NULL;
#define ORDER(i) (order32 ? (int64_t)(uint32_t)order32[i] : (int64_t)order64[i].idx)
    /* Values shifted by the middle one, so prefix sums of w·x stay near the row's own spread. Equal values
     * always share a cluster in some optimum, so the DP runs over the distinct values: W, Sv hold the prefix
     * sums at the end of each run of equal values, pos the sorted position there (branch-free: the entry of
     * the current run is rewritten until the run ends). */
    const double shift = XV(ORDER(m / 2));
    double pw = 0, ps = 0, prev = 0;
    int64_t d = 0;
    S->P[0].w = S->P[0].s = 0;
    S->W[0] = S->Sv[0] = 0;
    S->pos[0] = 0;
    for (int64_t i = 0; i < m; i++) {
        const int64_t j = ORDER(i);
        const double x = XV(j) - shift, w = WEFF(j);
        d += i == 0 || x != prev;
        prev = x;
        pw += w;
        ps += w * x;
        S->xs[i] = x;
        S->ws[i] = w;
        S->P[i + 1].w = S->W[d] = pw;
        S->P[i + 1].s = S->Sv[d] = ps;
        S->pos[d] = (int32_t)(i + 1);
    }
    S->xs[m] = S->xs[m - 1];
    const int exact = k > 1 && n > 1 && exact_cost(d, k) <= pr->exact_budget;

    int64_t *g = S->gbest;
    if (k == 1 || n == 1) {
        g[0] = 0;
        for (int64_t j = 1; j <= k; j++) g[j] = m;
    } else if (exact && d <= k) { /* each distinct value its own cluster, the rest empty */
        for (int64_t j = 0; j <= k; j++) g[j] = S->pos[j < d ? j : d];
    } else if (exact) {
        for (int64_t i = d + 1; i <= d + 2 * RQ_VW; i++) { /* padding read by masked vector lanes */
            S->W[i] = S->W[d];
            S->Sv[i] = S->Sv[d];
        }
        memset(S->f0, 0, (size_t)(d + 1 + 2 * RQ_VW) * sizeof(double));
        memset(S->f1, 0, (size_t)(d + 1 + 2 * RQ_VW) * sizeof(double));
        exact_boundaries(S, d, k, g);
        for (int64_t j = 0; j <= k; j++) g[j] = S->pos[g[j]];
    } else {
        uint64_t h = 0; /* order-free hash of the weighted entries: the key of the k-means++ draws */
        if (pr->n_starts > 2)
            for (int64_t i = 0; i < n; i++)
                if (KEPT(i)) h += mix64(dbits(XV(i)) ^ dbits(WEFF(i)) * RQ_GOLDEN);
        heuristic_boundaries(pr, S, m, k, h, g);
    }
#undef KEPT
#undef WEFF

    /* centroids: cluster means, an empty cluster copies its left neighbour (or the first full one) */
    double *c = S->c;
    int64_t first_full = -1;
    for (int64_t j = 0; j < k; j++) {
        const double w = S->P[g[j + 1]].w - S->P[g[j]].w;
        if (w > 0) {
            double cj = (S->P[g[j + 1]].s - S->P[g[j]].s) / w;
            /* a weighted mean lies within its values; only rounding of very light clusters could leave them */
            cj = cj < S->xs[g[j]] ? S->xs[g[j]] : (cj > S->xs[g[j + 1] - 1] ? S->xs[g[j + 1] - 1] : cj);
            if (first_full >= 0 && cj < c[j - 1]) cj = c[j - 1];
            c[j] = cj;
            if (first_full < 0) first_full = j;
        } else {
            c[j] = first_full >= 0 ? c[j - 1] : NAN;
        }
    }
    for (int64_t j = 0; j < first_full; j++) c[j] = c[first_full];
    for (int64_t j = 0; j < k; j++) c[j] = round_centroid(c[j] + shift, pr->round_mode);
    sort_small(c, k);
    for (int64_t j = 0; j < k; j++) cent[j] = (float)c[j];

    /* codes: the number of centroid midpoints <= x. Along the sorted weighted entries it only grows; the
     * zero-weight ones (not in the sorted list) search the midpoints. */
    int64_t pk = 1;
    while (pk < k) pk <<= 1;
    double *mids = S->mids;
    for (int64_t j = 0; j + 1 < k; j++) mids[j] = 0.5 * (c[j] + c[j + 1]); /* exact for float32 c */
    for (int64_t j = k - 1; j < pk; j++) mids[j] = INFINITY;
    uint8_t *c8 = (uint8_t *)codes;
    int16_t *c16 = (int16_t *)codes;
    double obj0 = 0, obj1 = 0; /* two partial sums: fewer dependent additions in a row */
    int64_t code = 0;
#define CODE_AND_ERR(i, acc)                                                  \
    do {                                                                      \
        const int64_t j = ORDER(i);                                           \
        const double x = XV(j);                                               \
        while (mids[code] <= x) code++;                                       \
        if (k <= 256)                                                         \
            c8[j] = (uint8_t)code;                                            \
        else                                                                  \
            c16[j] = (int16_t)code;                                           \
        const double err = x - c[code];                                       \
        acc += uniform_w ? err * err : WV(j) * err * err;                     \
    } while (0)
    int64_t i = 0;
    for (; i + 1 < kept; i += 2) {
        CODE_AND_ERR(i, obj0);
        CODE_AND_ERR(i + 1, obj1);
    }
    if (i < kept) CODE_AND_ERR(i, obj0);
#undef CODE_AND_ERR
#undef ORDER
    if (masked)
        for (int64_t i = 0; i < n; i++) {
            if (WV(i) != 0) continue;
            const double x = XV(i);
            int64_t pos = 0;
            for (int64_t step = pk >> 1; step >= 1; step >>= 1)
                if (mids[pos + step - 1] <= x) pos += step;
            if (k <= 256)
                c8[i] = (uint8_t)pos;
            else
                c16[i] = (int16_t)pos;
        }
    *objective = obj0 + obj1;
    return 0;
#undef XV
#undef WV
}

/* ------------------------------------------------------------------------------------------------------
 * Rows in parallel */

typedef struct {
    params_t pr;
    const uint8_t *x, *w;
    float *cent;
    uint8_t *codes;
    double *obj;
    int64_t rows, x_stride, w_stride, code_stride; /* bytes per row */
    _Atomic int64_t next, done;
    _Atomic int err, refs;
} job_t;

static void *alloc_scratch(const params_t *pr, scratch_t *S) {
    const int64_t n = pr->n, k = pr->k, ns = pr->n_starts, R = 4 * k + 2;
    int64_t pk = 1;
    while (pk < k) pk <<= 1;
    /* the DP runs only when k·m·lg(m) <= exact_budget, so its table needs at most budget + k + n + 1 cells */
    int64_t cells = (k + 1) * (n + 1);
    if (pr->exact_budget < cells) cells = pr->exact_budget + k + n + 1;
    char *base = NULL;
    for (int pass = 0; pass < 2; pass++) { /* pass 0 sizes the block, pass 1 carves it */
        size_t off = 0;
#define TAKE(field, type, count) \
    (S->field = base ? (type *)(base + off) : NULL, off += ((size_t)(count) * sizeof(type) + 15) / 16 * 16)
        TAKE(items, item_t, n);
        TAKE(tmp, item_t, n);
        TAKE(xs, double, n + 1);
        TAKE(ws, double, n + 1);
        TAKE(P, pw_t, n + 1);
        TAKE(g, int64_t, ns * (k + 1));
        TAKE(gbest, int64_t, k + 1);
        TAKE(gtmp, int64_t, k + 1);
        TAKE(c, double, k);
        TAKE(prev, double, k);
        TAKE(q, double, k);
        TAKE(split, double, k);
        TAKE(merge, double, k);
        TAKE(mids, double, pk);
        TAKE(p, int64_t, k);
        TAKE(run_w, double, R);
        TAKE(run_x, double, R);
        TAKE(d2, double, R);
        TAKE(cum, double, R);
        TAKE(v, double, R);
        TAKE(width, double, R);
        TAKE(mass, double, R);
        TAKE(edges, int64_t, R);
        TAKE(starts, double, ns * k);
        TAKE(W, double, n + 1 + 2 * RQ_VW);
        TAKE(Sv, double, n + 1 + 2 * RQ_VW);
        TAKE(f0, double, n + 1 + 2 * RQ_VW);
        TAKE(f1, double, n + 1 + 2 * RQ_VW);
        TAKE(stack, dp_span_t, n + 1); /* breadth-first queue: one part per point */
        TAKE(pos, int32_t, n + 2);
        TAKE(opt, int32_t, cells);
#undef TAKE
        if (pass == 0 && !(base = malloc(off))) return NULL;
    }
    return base;
}

static void job_release(job_t *job) {
    if (atomic_fetch_sub(&job->refs, 1) == 1) free(job);
}

/* Claim and fit rows until none is left. */
static void job_work(job_t *job, scratch_t *S) {
    for (;;) {
        const int64_t r = atomic_fetch_add(&job->next, 1);
        if (r >= job->rows) return;
        const int e = fit_row(&job->pr, S, job->x + r * job->x_stride, job->w ? job->w + r * job->w_stride : NULL,
                              job->cent + r * job->pr.k, job->codes + r * job->code_stride, job->obj + r);
        if (e) atomic_fetch_or(&job->err, e);
        atomic_fetch_add_explicit(&job->done, 1, memory_order_release);
    }
}

static void *helper_main(void *arg) {
    job_t *job = arg;
    scratch_t S;
    void *mem = alloc_scratch(&job->pr, &S);
    if (mem) { /* without memory the helper claims nothing and the others do its share */
        job_work(job, &S);
        free(mem);
    }
    job_release(job);
    return NULL;
}

/* Fit every row of x (rows, n): float32 (x_f64 = 0) or float64, with weights w (rows, n) float32 (w_kind 1),
 * float64 (2) or none (0). Writes centroids (rows, k) float32 ascending, codes (rows, n) uint8 (k <= 256) or
 * int16, objective (rows) float64; centroids rounded as round_centroid(mode) before coding. A row whose DP cost k·m·lg(m) (m: its distinct weighted values) is at most
 * exact_budget is solved exactly (max_iter, n_init, seed and tol do not matter for it), any other row by the
 * heuristic. Returns 0, or a bit set: 1 = non-finite x, 2 = negative or non-finite weight, 4 = out of memory. */
int rq_kmeans1d(const void *x, int x_f64, const void *w, int w_kind, int64_t rows, int64_t n, int64_t k,
                int64_t max_iter, int n_init, uint64_t seed, double tol, int round_mode, int64_t exact_budget,
                float *centroids, void *codes, double *objective, int threads) {
    if (rows <= 0 || n <= 0) return 0;
    job_t *job = calloc(1, sizeof *job);
    if (!job) return 4;
    job->pr = (params_t){.n = n, .k = k, .n_starts = n_init, .max_iter = max_iter, .n_init = n_init,
                         .round_mode = round_mode, .x_f64 = x_f64, .w_kind = w_kind, .seed = seed, .tol = tol,
                         .exact_budget = exact_budget};
    job->x = x;
    job->w = w;
    job->cent = centroids;
    job->codes = codes;
    job->obj = objective;
    job->rows = rows;
    job->x_stride = n * (x_f64 ? 8 : 4);
    job->w_stride = n * (w_kind == 2 ? 8 : 4);
    job->code_stride = n * (k <= 256 ? 1 : 2);
    scratch_t S;
    void *mem = alloc_scratch(&job->pr, &S);
    if (!mem) {
        free(job);
        return 4;
    }
    /* about 20 µs per row of 576 at k = 8: helpers pay off from a few rows on */
    int helpers = threads - 1;
    if (helpers > RQ_MAX_THREADS - 1) helpers = RQ_MAX_THREADS - 1;
    if (helpers > rows / 4) helpers = (int)(rows / 4);
    if (rows * n < 8192) helpers = 0;
    atomic_store(&job->refs, 1);
    for (int t = 0; t < helpers; t++) {
        pthread_t th;
        atomic_fetch_add(&job->refs, 1);
        if (pthread_create(&th, NULL, helper_main, job) != 0) {
            atomic_fetch_sub(&job->refs, 1);
            break;
        }
        pthread_detach(th);
    }
    job_work(job, &S);
    free(mem);
    int spins = 0;
    while (atomic_load_explicit(&job->done, memory_order_acquire) < rows)
        if (++spins % 64 == 0) sched_yield();
    const int err = atomic_load(&job->err);
    job_release(job);
    return err;
}

/* For tests: the k-means++ key of one row (its weighted entries, as fit_row hashes them) and its uniforms. */
uint64_t rq_row_key(const double *x, const double *w, int64_t n, uint64_t seed) {
    uint64_t h = 0;
    for (int64_t i = 0; i < n; i++)
        if (w[i] != 0) h += mix64(dbits(x[i]) ^ dbits(w[i]) * RQ_GOLDEN);
    return mix64(h ^ mix64(seed + RQ_GOLDEN));
}

double rq_uniform(uint64_t key, uint64_t j) { return uniform(key, j); }
