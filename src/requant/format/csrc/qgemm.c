/* CPU kernels for requant's packed Dense-and-Sparse layers (format v1), called through ctypes.
 *
 * Packed codes: each output row is a little-endian bit stream, code i at bits [i*b, i*b + b), padded to a
 * multiple of 8 codes, so every group of 8 codes fills exactly b bytes (3-bit: 8 codes in 3 bytes).
 * Dense decode: LUT mode  w = lut[r][code];  affine mode  w = ((float)code - zero) * scale  per group.
 * Plain dense rows (an output projection served as stored): mode 2 fp16, mode 3 bf16 (exact widening to fp32),
 * mode 4 int8 with one fp32 scale per row (w = q * scale[r]), mode 5 fp32; `q` then points at the (out, in) matrix.
 * Sparse residual: CSR (row pointers, column indices, fp32 values), added to the row.
 *
 * rq_dequantize writes the fp32 weight with exactly the operations of the PyTorch reference (bit-exact).
 * rq_gemm computes y = x W^T (+ bias) for up to RQ_MAX_M rows of x without materialising W: each row of
 * W is decoded in registers (AVX-512 VBMI, one input row) or block by block into an L1 buffer, so the
 * weight is read once per call at b bits per entry. Its sums are reassociated (vector lanes, several
 * accumulators), hence equal to the reference within fp32 rounding, not bit for bit.
 *
 * Threads: a small pool of helpers that claim chunks of rows from an atomic counter. The caller works on
 * chunks too and waits only for chunks already claimed, never for a helper to wake up, so a helper that
 * is descheduled on a busy machine costs nothing (an OpenMP barrier would stall the whole call).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define RQ_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define RQ_AVX2 1
#endif

#define RQ_BLOCK 1024 /* columns decoded at a time: 4 KiB of fp32, stays in L1; a multiple of 64 */
#define RQ_MAX_M 64   /* input rows per rq_gemm call */
#define RQ_MAX_THREADS 64

typedef struct {
    const uint8_t *q; /* (out, row_bytes) packed codes */
    int64_t out, in, row_bytes;
    int32_t bits, mode; /* mode 0: LUT, 1: affine, 2: fp16, 3: bf16, 4: int8 x row scale, 5: fp32 */
    const float *lut;   /* (out, 2^bits) */
    const float *scale; /* (out, ngroups) */
    const float *zero;  /* (out, ngroups) or NULL: zero_const */
    float zero_const;
    int64_t group, ngroups;
    const int32_t *rowptr, *col; /* CSR, rowptr NULL when there are no sparse entries */
    const float *val;
    const int32_t *row; /* row of each sparse entry (expanded from rowptr; branch-free single-row SpMV) */
    const float *bias; /* (out) or NULL */
    const uint8_t *qi; /* NULL, or the first nblk blocks of 256 codes of every row in lane order (rq_interleave) */
    int64_t nblk;
    const float *in_div; /* NULL, or (in): the fused step feeds x / in_div (AWQ's per-input scale), see linear1 */
} rq_layer;

int rq_abi_version(void) { return 5; }

const char *rq_isa(void) {
#if defined(RQ_AVX512)
    return "avx512-vbmi";
#elif defined(RQ_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
}

/* ------------------------------------------------------------------------------------------------------
 * Thread pool */

typedef void (*rq_task)(const void *ctx, int64_t chunk);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;              /* helpers created */
    _Atomic int active;       /* threads that take part in a job, caller included */
    _Atomic int sleepers;
    _Atomic uint32_t gen;     /* generation of the latest job; helpers wake on a change */
    _Atomic uint64_t ticket;  /* (generation << 32) | next unclaimed chunk */
    _Atomic int64_t done;     /* chunks finished in the current job */
    _Atomic(rq_task) fn;
    _Atomic(const void *) ctx;
    _Atomic int64_t nchunks;
    _Atomic int busy;         /* a job is running: a concurrent caller runs its job alone */
    int64_t spin_ns;
    _Atomic int64_t chunks[2]; /* chunks run by the caller [0] and by helpers [1], for diagnostics */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 1, 0, 0, 0, 0, NULL, NULL, 0, 0, 50000, {0, 0}};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of job `g` until none is left (or a newer job replaced it). */
static void work_on(uint32_t g, int helper) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        if ((uint32_t)(t >> 32) != g) return;
        int64_t i = (int64_t)(t & 0xffffffffu);
        if (i >= atomic_load_explicit(&pool.nchunks, memory_order_relaxed)) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        /* The claim succeeded for job g, so the caller cannot start another job before this chunk is done:
         * fn and ctx are job g's. */
        rq_task fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
        const void *ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
        fn(ctx, i);
        atomic_fetch_add_explicit(&pool.chunks[helper], 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *helper_main(void *arg) {
    const int id = (int)(intptr_t)arg; /* helpers are 1..started */
    uint32_t seen = atomic_load(&pool.gen);
    for (;;) {
        uint32_t g;
        int64_t t0 = now_ns();
        int spins = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 64 == 0 && now_ns() - t0 > pool.spin_ns) {
                pthread_mutex_lock(&pool.mu);
                atomic_fetch_add(&pool.sleepers, 1);
                while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.mu);
                t0 = now_ns();
            }
        }
        seen = g;
        if (id < atomic_load(&pool.active)) work_on(g, 1);
    }
    return NULL;
}

static void pool_after_fork(void) {
    /* helpers do not survive fork: the child starts with none */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.busy, 0);
}

/* Threads used by the kernels, caller included (torch.get_num_threads() is passed in). */
int rq_set_threads(int n) {
    static int atfork = 0;
    if (n < 1) n = 1;
    if (n > RQ_MAX_THREADS) n = RQ_MAX_THREADS;
    pthread_mutex_lock(&pool.mu);
    if (!atfork) {
        pthread_atfork(NULL, NULL, pool_after_fork);
        atfork = 1;
    }
    while (pool.started < n - 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, helper_main, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pthread_detach(th);
        pool.started++;
    }
    atomic_store(&pool.active, pool.started + 1 < n ? pool.started + 1 : n);
    pthread_mutex_unlock(&pool.mu);
    return atomic_load(&pool.active);
}

void rq_set_spin_us(int us) { pool.spin_ns = (int64_t)us * 1000; }

/* Chunks run in parallel jobs so far by the calling thread (who = 0) or by helpers (who = 1). */
int64_t rq_pool_chunks(int who) { return atomic_load(&pool.chunks[who ? 1 : 0]); }

static void run_chunks(rq_task fn, const void *ctx, int64_t nchunks) {
    if (nchunks <= 1 || atomic_load(&pool.active) <= 1 || atomic_exchange(&pool.busy, 1)) {
        for (int64_t i = 0; i < nchunks; i++) fn(ctx, i);
        return;
    }
    const uint32_t g = atomic_load(&pool.gen) + 1;
    /* Close the ticket first (new generation, no chunk left): a late helper of the previous job can then
     * neither claim a chunk nor act on the fields written next. */
    atomic_store(&pool.ticket, (uint64_t)g << 32 | 0xffffffffu);
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.ticket, (uint64_t)g << 32, memory_order_release);
    atomic_store(&pool.gen, g); /* seq_cst, paired with the helpers' sleepers++ then gen check */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    work_on(g, 0);
    int spins = 0;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks)
        if (++spins % 256 == 0) sched_yield(); else cpu_relax();
    atomic_store(&pool.busy, 0);
}

/* ------------------------------------------------------------------------------------------------------
 * Decoding packed codes */

static inline uint32_t load_chunk(const uint8_t *p, int bits) {
    /* the 8 codes of one chunk as an integer (bits <= 4: at most 32 bits) */
    switch (bits) {
    case 2: return (uint32_t)p[0] | (uint32_t)p[1] << 8;
    case 3: return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    default: return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    }
}

#ifdef RQ_AVX512
/* 16 codes starting at p, one per dword lane (low `bits` bits; higher bits are garbage), for bits 2..4
 * (16 codes = 2*bits <= 8 bytes). The 8 bytes at p are broadcast to every qword lane and one multishift
 * picks each lane's two codes: 2 shuffles per 16 weights with the LUT permute. `avail` = bytes readable. */
static inline __m512i codes16(const uint8_t *p, int bits, int64_t avail) {
#define Q(j, b) 2 * b * j, 2 * b * j, 2 * b * j, 2 * b * j, 2 * b * j + b, 2 * b * j + b, 2 * b * j + b, 2 * b * j + b
#define ROW(b) Q(0, b), Q(1, b), Q(2, b), Q(3, b), Q(4, b), Q(5, b), Q(6, b), Q(7, b)
    static const int8_t ctrl[3][64] __attribute__((aligned(64))) = {{ROW(2)}, {ROW(3)}, {ROW(4)}};
#undef ROW
#undef Q
    __m512i v;
    if (__builtin_expect(avail >= 8, 1)) {
        v = _mm512_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p)); /* one load+broadcast */
    } else {
        uint64_t u = 0;
        memcpy(&u, p, (size_t)avail);
        v = _mm512_set1_epi64((long long)u);
    }
    return _mm512_multishift_epi64_epi8(_mm512_load_si512(ctrl[bits - 2]), v);
}

/* The row's LUT in a register, replicated to 16 entries (vpermps reads the low 4 bits of an index). */
static inline __m512 lut16(const float *lut, int bits) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 raw = _mm512_maskz_loadu_ps((__mmask16)((1u << (1 << bits)) - 1u), lut);
    return _mm512_permutexvar_ps(_mm512_and_si512(iota, _mm512_set1_epi32((1 << bits) - 1)), raw);
}

static inline int fast512(const rq_layer *d) {
    return d->mode <= 1 && d->bits <= 4 && (d->mode == 0 || d->ngroups == 1 || d->group % 16 == 0);
}

/* Values of 16 weights (columns c .. c+15 of row r) from their codes (dword lanes). */
static inline __m512 values16(const rq_layer *d, int64_t r, int64_t c, __m512i idx, __m512 L) {
    if (d->mode == 0) return _mm512_permutexvar_ps(idx, L);
    int64_t g = d->ngroups == 1 ? 0 : c / d->group;
    if (g >= d->ngroups) g = d->ngroups - 1;
    const float *sc = d->scale + r * d->ngroups, *ze = d->zero ? d->zero + r * d->ngroups : NULL;
    const __m512 z = _mm512_set1_ps(ze ? ze[g] : d->zero_const);
    idx = _mm512_and_si512(idx, _mm512_set1_epi32((1 << d->bits) - 1));
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(idx), z), _mm512_set1_ps(sc[g]));
}
#endif

#ifdef RQ_AVX2
static inline __m256i codes8_avx2(const uint8_t *p, int bits) {
    const __m256i shifts = bits == 2   ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                           : bits == 3 ? _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)
                                       : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i vmask = _mm256_set1_epi32((1 << bits) - 1);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)load_chunk(p, bits)), shifts), vmask);
}
#endif


/* ------------------------------------------------------------------------------------------------------
 * Plain dense rows (modes 2-4) */

static inline float half_to_float(uint16_t h) {
    /* IEEE binary16 -> binary32, exact (subnormals, inf and NaN included) */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        if (m == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int k = 0;
            uint32_t mm = m;
            while (!(mm & 0x400u)) { mm <<= 1; k++; }
            bits = sign | (uint32_t)(113 - k) << 23 | (mm & 0x3ffu) << 13;
        }
    } else if (e == 31) {
        bits = sign | 0x7f800000u | m << 13;
    } else {
        bits = sign | (e + 112) << 23 | m << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int is_dense_mode(const rq_layer *d) { return d->mode >= 2; }

/* Columns [c0, c0 + n) of a plain dense row as fp32 (exactly the stored values; int8: q * scale[r]); columns
 * at or past `in` are written as 0. */
static void decode_dense(const rq_layer *d, int64_t r, int64_t c0, int64_t n, float *buf) {
    const int64_t in = d->in;
    int64_t valid = in - c0 < n ? in - c0 : n;
    if (valid < 0) valid = 0;
    int64_t j = 0;
    if (d->mode == 5) {
        memcpy(buf, (const float *)(d->q + r * d->row_bytes) + c0, (size_t)valid * sizeof(float));
        j = valid;
    } else if (d->mode == 4) {
        const int8_t *row = (const int8_t *)(d->q + r * d->row_bytes) + c0;
        const float s = d->scale[r];
        for (; j < valid; j++) buf[j] = (float)row[j] * s;
    } else {
        const uint16_t *row = (const uint16_t *)(d->q + r * d->row_bytes) + c0;
#if defined(RQ_AVX2) && defined(__F16C__)
        if (d->mode == 2)
            for (; j + 8 <= valid; j += 8) _mm256_storeu_ps(buf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + j))));
#endif
        if (d->mode == 2)
            for (; j < valid; j++) buf[j] = half_to_float(row[j]);
        else
            for (; j < valid; j++) buf[j] = bf16_to_float(row[j]);
    }
    for (; j < n; j++) buf[j] = 0.0f;
}

#if defined(RQ_AVX2) && !defined(RQ_AVX512)
static void decode_qi(const rq_layer *d, int64_t r, int64_t j0, int64_t j1, float *out);
#endif

/* Decode columns [c0, c0 + n) of row r into buf; n a multiple of 64 (ISA paths may write up to there),
 * columns past `in` hold arbitrary finite values. */
static void decode_block(const rq_layer *d, int64_t r, int64_t c0, int64_t n, float *buf) {
    if (is_dense_mode(d)) {
        decode_dense(d, r, c0, n, buf);
        return;
    }
#if defined(RQ_AVX2) && !defined(RQ_AVX512)
    if (d->qi) { /* whole chunks from the interleaved copy (the packed rows are then never read again) */
        const int64_t full = d->in / 8, j0 = c0 / 8;
        int64_t j1 = (c0 + n) / 8;
        if (j1 > full) j1 = full;
        if (j1 > j0) decode_qi(d, r, j0, j1, buf);
        if (j1 * 8 >= c0 + n || j1 < j0) return;
        buf += j1 * 8 - c0; /* a final partial chunk (in % 8 columns) from the packed row, below */
        n = c0 + n - j1 * 8;
        c0 = j1 * 8;
    }
#endif
    const uint8_t *row = d->q + r * d->row_bytes;
    const int bits = d->bits;
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t padded = (d->in + 7) / 8 * 8;
    if (c0 + n > padded) n = padded - c0;
#ifdef RQ_AVX512
    if (fast512(d)) {
        const __m512 L = d->mode == 0 ? lut16(d->lut + (r << bits), bits) : _mm512_setzero_ps();
        const int64_t avail = (d->out - r) * d->row_bytes;
        for (int64_t j = 0; j < n; j += 16) {
            const int64_t off = (c0 + j) / 8 * bits;
            _mm512_storeu_ps(buf + j, values16(d, r, c0 + j, codes16(row + off, bits, avail - off), L));
        }
        return;
    }
#endif
    if (d->mode == 0) {
        const float *lut = d->lut + (r << bits);
#ifdef RQ_AVX2
        if (bits <= 4) {
            float lo8[8], hi8[8];
            for (int k = 0; k < 8; k++) {
                lo8[k] = lut[k & (int)mask & 7];
                hi8[k] = bits == 4 ? lut[8 + k] : 0.0f;
            }
            const __m256 lo = _mm256_loadu_ps(lo8), hi = _mm256_loadu_ps(hi8);
            for (int64_t j = 0; j < n; j += 8) {
                const __m256i idx = codes8_avx2(row + (c0 + j) / 8 * bits, bits);
                __m256 w = _mm256_permutevar8x32_ps(lo, idx);
                if (bits == 4) {
                    const __m256 wh = _mm256_permutevar8x32_ps(hi, idx);
                    w = _mm256_blendv_ps(w, wh, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                }
                _mm256_storeu_ps(buf + j, w);
            }
            return;
        }
#endif
        for (int64_t j = 0; j < n; j += 8) {
            const uint8_t *p = row + (c0 + j) / 8 * bits;
            if (bits == 8) {
                for (int k = 0; k < 8; k++) buf[j + k] = lut[p[k]];
            } else {
                const uint32_t u = load_chunk(p, bits);
                for (int k = 0; k < 8; k++) buf[j + k] = lut[(u >> (k * bits)) & mask];
            }
        }
        return;
    }
    /* affine: (code - zero) * scale, the reference's two fp32 operations in the same order */
    const float *sc = d->scale + r * d->ngroups;
    const float *ze = d->zero ? d->zero + r * d->ngroups : NULL;
#ifdef RQ_AVX2
    if (bits <= 4 && (d->group % 8 == 0 || d->ngroups == 1)) {
        for (int64_t j = 0; j < n; j += 8) {
            const int64_t c = c0 + j;
            int64_t g = d->ngroups == 1 ? 0 : c / d->group;
            if (g >= d->ngroups) g = d->ngroups - 1;
            const __m256i idx = codes8_avx2(row + c / 8 * bits, bits);
            const __m256 z = _mm256_set1_ps(ze ? ze[g] : d->zero_const);
            _mm256_storeu_ps(buf + j, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(idx), z), _mm256_set1_ps(sc[g])));
        }
        return;
    }
#endif
    for (int64_t j = 0; j < n; j += 8) {
        const int64_t c = c0 + j;
        const uint8_t *p = row + c / 8 * bits;
        uint32_t codes[8];
        if (bits == 8) {
            for (int k = 0; k < 8; k++) codes[k] = p[k];
        } else {
            const uint32_t u = load_chunk(p, bits);
            for (int k = 0; k < 8; k++) codes[k] = (u >> (k * bits)) & mask;
        }
        for (int k = 0; k < 8; k++) {
            int64_t g = (c + k) / d->group;
            if (g >= d->ngroups) g = d->ngroups - 1; /* padding columns past `in` */
            const float z = ze ? ze[g] : d->zero_const;
            buf[j + k] = ((float)codes[k] - z) * sc[g];
        }
    }
}

/* ------------------------------------------------------------------------------------------------------
 * Dot products */

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(RQ_AVX512)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
           s3 = _mm512_setzero_ps();
    for (; i + 64 <= n; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
        i = n;
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(RQ_AVX2)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(),
           s3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m256 t = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    s = _mm_cvtss_f32(h);
#else
    float acc[8] = {0};
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[i + k] * b[i + k];
    for (int k = 0; k < 8; k++) s += acc[k];
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#ifdef RQ_AVX512
/* bits and mode are compile-time constants at every call site below (specialised copies). */
static inline __attribute__((always_inline)) float row_dot1_impl(const rq_layer *d, int64_t r, const float *x,
                                                                 const int bits, const int mode) {
    const uint8_t *row = d->q + r * d->row_bytes;
    const int64_t in = d->in;
    const int64_t avail = (d->out - r) * d->row_bytes; /* readable bytes from the row start */
    const __m512 L = mode == 0 ? lut16(d->lut + (r << bits), bits) : _mm512_setzero_ps();
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t c = 0;
    for (; c + 64 <= in; c += 64) {
        for (int t = 0; t < 4; t++) {
            const int64_t off = (c + 16 * t) / 8 * bits;
            const __m512i idx = codes16(row + off, bits, avail - off);
            const __m512 w = mode == 0 ? _mm512_permutexvar_ps(idx, L) : values16(d, r, c + 16 * t, idx, L);
            acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + c + 16 * t), acc[t]);
        }
    }
    for (int t = 0; c < in; c += 16, t++) {
        const int64_t off = c / 8 * bits;
        const int64_t left = in - c;
        const __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1u);
        const __m512 w = _mm512_maskz_mov_ps(m, values16(d, r, c, codes16(row + off, bits, avail - off), L));
        acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + c), acc[t]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* Dense part of row r dotted with one input row, decoding in registers (no buffer). */
static float row_dot1(const rq_layer *d, int64_t r, const float *x) {
    if (d->mode == 0) {
        switch (d->bits) {
        case 2: return row_dot1_impl(d, r, x, 2, 0);
        case 3: return row_dot1_impl(d, r, x, 3, 0);
        default: return row_dot1_impl(d, r, x, 4, 0);
        }
    }
    switch (d->bits) {
    case 2: return row_dot1_impl(d, r, x, 2, 1);
    case 3: return row_dot1_impl(d, r, x, 3, 1);
    default: return row_dot1_impl(d, r, x, 4, 1);
    }
}
#endif


#ifdef RQ_AVX2
/* AVX2, one input row: each chunk of 8 codes is decoded in registers (one 4-byte load, a variable shift, and
 * for LUT rows one vpermps: the permute reads only the low 3 bits of each lane, so 2- and 3-bit codes need no
 * mask) and multiplied into one of 4 accumulators; no decode buffer. The 4-byte load reads up to 2 bytes past
 * the chunk: inside the matrix for every row but the last, whose final chunk is loaded bytewise.
 * bits and mode are compile-time constants at every call site (specialised copies). */
/* Row r's table in the two registers values8_idx permutes from: entries 0-7 in lo (2-bit: entries 0-3 twice), 8-15
 * in hi for 4 bits; zeros for a uniform grid (mode != 0). */
static inline __attribute__((always_inline)) void lut_regs(const rq_layer *d, int64_t r, const int bits,
                                                           const int mode, __m256 *lo, __m256 *hi) {
    *lo = _mm256_setzero_ps(), *hi = _mm256_setzero_ps();
    if (mode != 0) return;
    const float *lut = d->lut + (r << bits);
    if (bits == 2) *lo = _mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut)));
    else *lo = _mm256_loadu_ps(lut);
    if (bits == 4) *hi = _mm256_loadu_ps(lut + 8);
}

static inline __attribute__((always_inline)) __m256 values8_idx(const rq_layer *d, int64_t r, int64_t c, __m256i idx,
                                                                __m256 lo, __m256 hi, const int bits, const int mode) {
    /* idx: each lane's code in its low `bits` bits, anything above */
    if (mode == 0) {
        /* 2-bit: the 4-entry LUT sits in both 128-bit lanes and the in-lane vpermilps reads exactly 2 index bits */
        if (bits == 2) return _mm256_permutevar_ps(lo, idx);
        __m256 w = _mm256_permutevar8x32_ps(lo, idx);
        if (bits == 4)
            w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        return w;
    }
    int64_t g = d->ngroups == 1 ? 0 : c / d->group;
    if (g >= d->ngroups) g = d->ngroups - 1;
    const float z = d->zero ? d->zero[r * d->ngroups + g] : d->zero_const;
    const __m256 codes = _mm256_cvtepi32_ps(_mm256_and_si256(idx, _mm256_set1_epi32((1 << bits) - 1)));
    /* (code - zero) * scale: the reference's two roundings, so each weight equals the reference's */
    return _mm256_mul_ps(_mm256_sub_ps(codes, _mm256_set1_ps(z)), _mm256_set1_ps(d->scale[r * d->ngroups + g]));
}

#ifndef RQ_AVX512
/* Chunks [j0, j1) of row r from the interleaved copy, as fp32 into out (8 per chunk): the same table lookups or
 * (code - zero) * scale as every other path, so bit-exact with the reference decode. */
static void decode_qi(const rq_layer *d, int64_t r, int64_t j0, int64_t j1, float *out) {
    const int bits = d->bits, mode = d->mode;
    const int64_t tail = d->in / 8 - 32 * d->nblk, tail_dw = (tail * bits + 31) / 32;
    const uint8_t *rowp = d->qi + r * (d->nblk * 32 * bits + tail_dw * 32);
    __m256 lo, hi;
    lut_regs(d, r, bits, mode, &lo, &hi);
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *bp = rowp + (j / 32) * 32 * bits;
        const int o = bits * (int)(j % 32), dw = o >> 5, sh = o & 31;
        __m256i idx = _mm256_srl_epi32(_mm256_loadu_si256((const __m256i *)(bp + 32 * dw)), _mm_cvtsi32_si128(sh));
        if (sh + bits > 32)
            idx = _mm256_or_si256(idx, _mm256_sll_epi32(_mm256_loadu_si256((const __m256i *)(bp + 32 * (dw + 1))),
                                                        _mm_cvtsi32_si128(32 - sh)));
        _mm256_storeu_ps(out + 8 * (j - j0), values8_idx(d, r, 8 * j, idx, lo, hi, bits, mode));
    }
}
#endif

static inline __attribute__((always_inline)) __m256 values8_avx2(const rq_layer *d, int64_t r, int64_t c, uint32_t u,
                                                                 __m256 lo, __m256 hi, const int bits,
                                                                 const int mode) {
    const __m256i shifts = bits == 2   ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                           : bits == 3 ? _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)
                                       : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return values8_idx(d, r, c, _mm256_srlv_epi32(_mm256_set1_epi32((int)u), shifts), lo, hi, bits, mode);
}

static inline __attribute__((always_inline)) float row_dot1_avx2_impl(const rq_layer *d, int64_t r, const float *x,
                                                                       const int bits, const int mode) {
    const uint8_t *row = d->q + r * d->row_bytes;
    const int64_t in = d->in, nchunks = (in + 7) / 8, full = in / 8;
    /* chunks whose 4-byte load stays inside the matrix */
    const int64_t safe = r + 1 < d->out ? nchunks : d->row_bytes >= 4 ? (d->row_bytes - 4) / bits + 1 : 0;
    __m256 lo, hi;
    lut_regs(d, r, bits, mode, &lo, &hi);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    const int64_t main_end = (full < safe ? full : safe) / 4 * 4;
    int64_t j = 0;
    if (d->qi) {
        /* Interleaved blocks: dword t of lane i holds bits [32t, 32t + 32) of the lane's codes (code k = weight
         * 8k + i of the block), so chunk k is one immediate shift of a loaded register (two and an or where a
         * code straddles dwords), with no per-chunk broadcast and variable shift: about 1.7x the chunk rate. */
        const int64_t tail = d->in / 8 - 32 * d->nblk, tail_dw = (tail * bits + 31) / 32;
        const uint8_t *bp = d->qi + r * (d->nblk * 32 * bits + tail_dw * 32);
#define RQ_CHUNK(k)                                                                                            \
    {                                                                                                          \
        const int o = bits * (k), dw = o >> 5, sh = o & 31;                                                    \
        __m256i idx = sh ? _mm256_srli_epi32(v[dw], sh) : v[dw];                                               \
        if (sh + bits > 32) idx = _mm256_or_si256(idx, _mm256_slli_epi32(v[dw + 1], 32 - sh));                 \
        const __m256 w = values8_idx(d, r, 256 * b + 8 * (k), idx, lo, hi, bits, mode);                        \
        const __m256 xv = _mm256_loadu_ps(xb + 8 * (k));                                                       \
        switch ((k) & 3) {                                                                                     \
        case 0: acc0 = _mm256_fmadd_ps(w, xv, acc0); break;                                                    \
        case 1: acc1 = _mm256_fmadd_ps(w, xv, acc1); break;                                                    \
        case 2: acc2 = _mm256_fmadd_ps(w, xv, acc2); break;                                                    \
        default: acc3 = _mm256_fmadd_ps(w, xv, acc3);                                                          \
        }                                                                                                      \
    }
        int64_t b = 0;
        for (; b < d->nblk; b++, bp += 32 * bits) {
            __m256i v[4];
            for (int t = 0; t < bits; t++) v[t] = _mm256_loadu_si256((const __m256i *)(bp + 32 * t));
            const float *xb = x + 256 * b;
#pragma GCC unroll 32
            for (int k = 0; k < 32; k++) RQ_CHUNK(k)
        }
        if (tail) { /* the partial block: tail_dw dwords per lane */
            __m256i v[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                            _mm256_setzero_si256()};
            for (int t = 0; t < tail_dw; t++) v[t] = _mm256_loadu_si256((const __m256i *)(bp + 32 * t));
            const float *xb = x + 256 * b;
#pragma GCC unroll 32
            for (int k = 0; k < 32; k++) {
                if (k >= tail) break;
                RQ_CHUNK(k)
            }
        }
#undef RQ_CHUNK
        j = d->in / 8;
    }
    for (; j < main_end; j += 4) {
        uint32_t u0, u1, u2, u3;
        memcpy(&u0, row + (j + 0) * bits, 4);
        memcpy(&u1, row + (j + 1) * bits, 4);
        memcpy(&u2, row + (j + 2) * bits, 4);
        memcpy(&u3, row + (j + 3) * bits, 4);
        acc0 = _mm256_fmadd_ps(values8_avx2(d, r, 8 * j, u0, lo, hi, bits, mode), _mm256_loadu_ps(x + 8 * j), acc0);
        acc1 = _mm256_fmadd_ps(values8_avx2(d, r, 8 * j + 8, u1, lo, hi, bits, mode), _mm256_loadu_ps(x + 8 * j + 8), acc1);
        acc2 = _mm256_fmadd_ps(values8_avx2(d, r, 8 * j + 16, u2, lo, hi, bits, mode), _mm256_loadu_ps(x + 8 * j + 16), acc2);
        acc3 = _mm256_fmadd_ps(values8_avx2(d, r, 8 * j + 24, u3, lo, hi, bits, mode), _mm256_loadu_ps(x + 8 * j + 24), acc3);
    }
    for (; j < nchunks; j++) {
        uint32_t u;
        if (j < safe) memcpy(&u, row + j * bits, 4);
        else u = load_chunk(row + j * bits, bits);
        const __m256 w = values8_avx2(d, r, 8 * j, u, lo, hi, bits, mode);
        if (j < full) {
            acc0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * j), acc0);
        } else { /* the last, partial chunk: inputs past `in` are neither read nor counted */
            const int left = (int)(in - 8 * j);
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            acc1 = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + 8 * j, m), acc1);
        }
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

static inline int fast256(const rq_layer *d) {
    return d->mode <= 1 && d->bits >= 2 && d->bits <= 4 && (d->mode == 0 || d->ngroups == 1 || d->group % 8 == 0);
}

static float row_dot1_avx2(const rq_layer *d, int64_t r, const float *x) {
    if (d->mode == 0) {
        switch (d->bits) {
        case 2: return row_dot1_avx2_impl(d, r, x, 2, 0);
        case 3: return row_dot1_avx2_impl(d, r, x, 3, 0);
        default: return row_dot1_avx2_impl(d, r, x, 4, 0);
        }
    }
    switch (d->bits) {
    case 2: return row_dot1_avx2_impl(d, r, x, 2, 1);
    case 3: return row_dot1_avx2_impl(d, r, x, 3, 1);
    default: return row_dot1_avx2_impl(d, r, x, 4, 1);
    }
}
#endif

/* A plain dense row (modes 2-4) dotted with one input row, widening in registers. */
static float row_dot_dense(const rq_layer *d, int64_t r, const float *x) {
    const int64_t in = d->in;
    int64_t c = 0;
    float s = 0.0f;
    if (d->mode == 5) return dot((const float *)(d->q + r * d->row_bytes), x, in);
#if defined(RQ_AVX2) && defined(__F16C__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    if (d->mode == 4) {
        const int8_t *row = (const int8_t *)(d->q + r * d->row_bytes);
#define I8(o) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + c + (o)))))
        for (; c + 32 <= in; c += 32) {
            a0 = _mm256_fmadd_ps(I8(0), _mm256_loadu_ps(x + c), a0);
            a1 = _mm256_fmadd_ps(I8(8), _mm256_loadu_ps(x + c + 8), a1);
            a2 = _mm256_fmadd_ps(I8(16), _mm256_loadu_ps(x + c + 16), a2);
            a3 = _mm256_fmadd_ps(I8(24), _mm256_loadu_ps(x + c + 24), a3);
        }
        for (; c + 8 <= in; c += 8) a0 = _mm256_fmadd_ps(I8(0), _mm256_loadu_ps(x + c), a0);
#undef I8
    } else {
        const uint16_t *row = (const uint16_t *)(d->q + r * d->row_bytes);
#define W16(o)                                                                                                 \
    (d->mode == 2 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + c + (o))))                         \
                  : _mm256_castsi256_ps(_mm256_slli_epi32(                                                      \
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + c + (o)))), 16)))
        for (; c + 32 <= in; c += 32) {
            a0 = _mm256_fmadd_ps(W16(0), _mm256_loadu_ps(x + c), a0);
            a1 = _mm256_fmadd_ps(W16(8), _mm256_loadu_ps(x + c + 8), a1);
            a2 = _mm256_fmadd_ps(W16(16), _mm256_loadu_ps(x + c + 16), a2);
            a3 = _mm256_fmadd_ps(W16(24), _mm256_loadu_ps(x + c + 24), a3);
        }
        for (; c + 8 <= in; c += 8) a0 = _mm256_fmadd_ps(W16(0), _mm256_loadu_ps(x + c), a0);
#undef W16
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    s = _mm_cvtss_f32(h);
#endif
    if (d->mode == 4) {
        const int8_t *row = (const int8_t *)(d->q + r * d->row_bytes);
        for (; c < in; c++) s += (float)row[c] * x[c];
        return s * d->scale[r];
    }
    const uint16_t *row = (const uint16_t *)(d->q + r * d->row_bytes);
    for (; c < in; c++) s += (d->mode == 2 ? half_to_float(row[c]) : bf16_to_float(row[c])) * x[c];
    return s;
}

/* ------------------------------------------------------------------------------------------------------
 * Tasks and entry points */

/* Batch-1 decode streams each layer once from DRAM in short runs (a few hundred bytes per row): hardware
 * prefetchers ramp up too slowly for that, so the rows a few steps ahead are requested explicitly. */
#define RQ_PREFETCH_ROWS 6
static inline void prefetch_row(const rq_layer *d, int64_t r) {
    if (r >= d->out) return;
    const char *p = (const char *)(d->q + r * d->row_bytes);
    int64_t from = 0;
    if (d->qi) { /* the interleaved blocks, then the rest of the packed row */
        const int64_t n = d->nblk * 32 * d->bits + (((d->in / 8 - 32 * d->nblk) * d->bits + 31) / 32) * 32;
        const char *pi = (const char *)(d->qi + r * n);
        for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(pi + off, 0, 0);
        from = d->in / 8 * d->bits;
    }
    for (int64_t off = from; off < d->row_bytes; off += 64) __builtin_prefetch(p + off, 0, 0);
    if (d->mode == 0) __builtin_prefetch(d->lut + (r << d->bits), 0, 0);
    if (d->rowptr) {
        __builtin_prefetch(d->rowptr + r, 0, 0);
        __builtin_prefetch(d->col + d->rowptr[r], 0, 0);
        __builtin_prefetch(d->val + d->rowptr[r], 0, 0);
    }
}

/* Dense part of row r dotted with one input row through the decode buffer (non-AVX-512 paths). */
static float dot_row(const rq_layer *d, int64_t r, const float *x, float *buf) {
    const int64_t in = d->in, padded = (in + 7) / 8 * 8;
    float s = 0.0f;
    for (int64_t c0 = 0; c0 < padded; c0 += RQ_BLOCK) {
        const int64_t n = padded - c0 < RQ_BLOCK ? padded - c0 : RQ_BLOCK;
        const int64_t valid = in - c0 < n ? in - c0 : n;
        decode_block(d, r, c0, (n + 63) / 64 * 64, buf);
        s += dot(buf, x + c0, valid);
    }
    return s;
}

typedef struct {
    const rq_layer *d;
    const float *x;
    int64_t m, ldx, rows_per_chunk;
    float *y;
} gemm_ctx;

static void gemm_task(const void *arg, int64_t chunk) {
    const gemm_ctx *g = (const gemm_ctx *)arg;
    const rq_layer *d = g->d;
    const int64_t in = d->in, padded = (in + 7) / 8 * 8, m = g->m;
    const int64_t r0 = chunk * g->rows_per_chunk;
    const int64_t r1 = r0 + g->rows_per_chunk < d->out ? r0 + g->rows_per_chunk : d->out;
    float buf[RQ_BLOCK] __attribute__((aligned(64)));
    float acc[RQ_MAX_M];
    for (int64_t r = r0; r < r1; r++) {
        prefetch_row(d, r + RQ_PREFETCH_ROWS);
        if (m == 1) {
            float v;
            if (is_dense_mode(d))
                v = row_dot_dense(d, r, g->x);
            else
#ifdef RQ_AVX512
            if (fast512(d))
                v = row_dot1(d, r, g->x);
            else
#endif
#ifdef RQ_AVX2
            if (fast256(d))
                v = row_dot1_avx2(d, r, g->x);
            else
#endif
                v = dot_row(d, r, g->x, buf);
            if (d->rowptr && !d->row)
                for (int32_t k = d->rowptr[r]; k < d->rowptr[r + 1]; k++) v += d->val[k] * g->x[d->col[k]];
            g->y[r] = v + (d->bias ? d->bias[r] : 0.0f); /* with d->row, the sparse part follows below */
            continue;
        }
        {
            for (int64_t t = 0; t < m; t++) acc[t] = 0.0f;
            for (int64_t c0 = 0; c0 < padded; c0 += RQ_BLOCK) {
                const int64_t n = padded - c0 < RQ_BLOCK ? padded - c0 : RQ_BLOCK;
                const int64_t valid = in - c0 < n ? in - c0 : n;
                decode_block(d, r, c0, (n + 63) / 64 * 64, buf);
                for (int64_t t = 0; t < m; t++) acc[t] += dot(buf, g->x + t * g->ldx + c0, valid);
            }
        }
        if (d->rowptr) {
            for (int32_t k = d->rowptr[r]; k < d->rowptr[r + 1]; k++) {
                const float v = d->val[k];
                const int32_t c = d->col[k];
                for (int64_t t = 0; t < m; t++) acc[t] += v * g->x[t * g->ldx + c];
            }
        }
        const float b = d->bias ? d->bias[r] : 0.0f;
        for (int64_t t = 0; t < m; t++) g->y[t * d->out + r] = acc[t] + b;
    }
    if (m == 1 && d->row && d->rowptr) {
        /* Sparse residual of rows r0..r1 as one flat loop over their entries: a per-row loop of a few
         * entries each costs a branch misprediction per row. */
        const float *x = g->x;
        float *y = g->y;
        const int32_t k1 = d->rowptr[r1];
        for (int32_t k = d->rowptr[r0]; k < k1; k++) y[d->row[k]] += d->val[k] * x[d->col[k]];
    }
}

/* Calls with less work than this run on the calling thread alone: below it a helper's wake-up (and, on a busy
 * machine, a helper preempted in the middle of its chunk) costs more than it saves. Multi-row calls keep the
 * old threshold (about 1 ms of work). A batch-1 decode call reads its whole layer once per token: from about
 * 256K weights (R's 576 x 576 layers and up: 40-150 us each at one thread) splitting pays, and since the caller
 * claims chunks too and never waits for a helper that has not started, a late helper costs nothing. */
#define RQ_PARALLEL_MIN_WORK (1 << 22)
#define RQ_PARALLEL_MIN_WORK_DECODE (1 << 18)

static int64_t rows_per_chunk(const rq_layer *d, int64_t m) {
    const int64_t work = d->in * (m < 4 ? m : 4);
    if (work * d->out < (m == 1 ? RQ_PARALLEL_MIN_WORK_DECODE : RQ_PARALLEL_MIN_WORK)) return d->out; /* serial */
    /* about 64K multiply-adds per chunk: small enough to balance, large enough to amortise a claim */
    const int64_t rows = (65536 + work - 1) / work;
    return rows < 1 ? 1 : rows;
}

/* y (m, out) = x (m, in; row stride ldx) W^T + bias, for 1 <= m <= RQ_MAX_M. Returns 0, or -1 on bad m. */
int rq_gemm(const rq_layer *d, const float *x, int64_t m, int64_t ldx, float *y) {
    if (m < 1 || m > RQ_MAX_M) return -1;
    gemm_ctx g = {d, x, m, ldx, rows_per_chunk(d, m), y};
    run_chunks(gemm_task, &g, (d->out + g.rows_per_chunk - 1) / g.rows_per_chunk);
    return 0;
}

typedef struct {
    const rq_layer *d;
    float *w;
    int64_t rows_per_chunk;
} deq_ctx;

static void dequant_task(const void *arg, int64_t chunk) {
    const deq_ctx *q = (const deq_ctx *)arg;
    const rq_layer *d = q->d;
    const int64_t in = d->in, padded = (in + 7) / 8 * 8;
    const int64_t r0 = chunk * q->rows_per_chunk;
    const int64_t r1 = r0 + q->rows_per_chunk < d->out ? r0 + q->rows_per_chunk : d->out;
    float buf[RQ_BLOCK] __attribute__((aligned(64)));
    for (int64_t r = r0; r < r1; r++) {
        float *wr = q->w + r * in;
        for (int64_t c0 = 0; c0 < padded; c0 += RQ_BLOCK) {
            const int64_t n = padded - c0 < RQ_BLOCK ? padded - c0 : RQ_BLOCK;
            const int64_t valid = in - c0 < n ? in - c0 : n;
            if (valid == n && n % 64 == 0) {
                decode_block(d, r, c0, n, wr + c0);
            } else {
                decode_block(d, r, c0, (n + 63) / 64 * 64, buf);
                memcpy(wr + c0, buf, (size_t)valid * sizeof(float));
            }
        }
        if (d->rowptr)
            for (int32_t k = d->rowptr[r]; k < d->rowptr[r + 1]; k++) wr[d->col[k]] += d->val[k];
    }
}

/* w (out, in) = dense decode + sparse residual, bit-exact with the PyTorch reference. Split like a decode call
 * (from 256K weights, ~64K per chunk): decoding is a few cycles per weight, so even R's smallest layers pay for a
 * second thread, and prefill at 2 threads would otherwise wait on a serial decode before every BLAS call. */
void rq_dequantize(const rq_layer *d, float *w) {
    deq_ctx q = {d, w, rows_per_chunk(d, 1)};
    run_chunks(dequant_task, &q, (d->out + q.rows_per_chunk - 1) / q.rows_per_chunk);
}

/* The single-row AVX2 kernel's copy of a packed layer (LUT or affine, 2-4 bits): each row's full chunks of 8 codes
 * (in / 8) rearranged in blocks of up to 32 chunks, lane i of dword t of a block holding bits [32t, 32t + 32) of
 * the bitstream of the block's codes i, 8 + i, 16 + i, ...: a full block takes 32 * bits bytes (as packed), the
 * last, partial one ceil(chunks * bits / 32) dwords per lane. A final partial chunk (in % 8 codes) is read from
 * the packed row. With dst NULL: the bytes needed, 0 when no kernel of this build would read the copy.
 * Otherwise fills dst, points d->qi at it and sets d->nblk (full blocks per row). */
int64_t rq_interleave(rq_layer *d, uint8_t *dst) {
#if defined(RQ_AVX2) && !defined(RQ_AVX512) /* the AVX-512 kernel decodes 16 codes per shuffle from the packed form */
    if (!fast256(d) || d->in < 64) return 0;
    const int64_t bits = d->bits, chunks = d->in / 8, nblk = chunks / 32, tail = chunks - 32 * nblk;
    const int64_t per_row = nblk * 32 * bits + (tail * bits + 31) / 32 * 32;
    if (!dst) return d->out * per_row;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t r = 0; r < d->out; r++) {
        const uint8_t *row = d->q + r * d->row_bytes;
        uint8_t *out = dst + r * per_row;
        for (int64_t b = 0; b <= nblk; b++) {
            const int64_t nk = b < nblk ? 32 : tail, ndw = (nk * bits + 31) / 32;
            if (nk == 0) break;
            uint32_t lanes[8][4] = {{0}};
            for (int64_t k = 0; k < nk; k++) {
                const uint32_t u = load_chunk(row + (32 * b + k) * bits, (int)bits);
                for (int i = 0; i < 8; i++) {
                    const uint64_t code = (u >> (i * bits)) & mask, o = (uint64_t)(bits * k);
                    lanes[i][o >> 5] |= (uint32_t)(code << (o & 31));
                    if ((o & 31) + bits > 32) lanes[i][(o >> 5) + 1] |= (uint32_t)(code >> (32 - (o & 31)));
                }
            }
            for (int t = 0; t < ndw; t++)
                for (int i = 0; i < 8; i++) memcpy(out + 32 * t + 4 * i, &lanes[i][t], 4);
            out += 32 * ndw;
        }
    }
    d->qi = dst;
    d->nblk = nblk;
    return d->out * per_row;
#else
    (void)d;
    (void)dst;
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------------------
 * A whole batch-1 decode step of a Llama-family decoder (RMSNorm, rotary attention with grouped KV heads over a
 * static cache, gated SiLU MLP, final norm, output projection, argmax) in one call, so that a token costs one
 * Python call instead of a few hundred framework calls per block. The linear layers are rq_layer descriptors
 * (packed or plain dense), run by rq_gemm's tasks on the pool; everything in between is a few vector loops.
 * The caller (requant.fused) checks the model's structure and builds the tables; nothing here allocates. */

typedef struct {
    const rq_layer *q, *k, *v, *o, *gate, *up, *down;
    const float *norm1, *norm2; /* RMSNorm weights (hidden) */
    float *kc, *vc;             /* this block's cache, (n_kv, max_len, head_dim) each, keys after rotation */
} rq_block;

typedef struct {
    int64_t n_blocks, hidden, n_heads, n_kv, head_dim, inter, max_len, vocab;
    float eps, scaling; /* RMSNorm epsilon; attention score scale */
    const rq_block *blocks;
    const float *final_norm;
    const void *embed; /* (vocab_in, hidden) */
    int32_t embed_mode; /* 2 fp16, 3 bf16, 5 fp32 (as rq_layer modes) */
    int32_t pad_;
    const rq_layer *head;
    const rq_layer *screen; /* NULL, or the head as int8 with per-row scales: see rq_llama_step */
    const float *cos, *sin; /* (max_len, head_dim): the model's own rotary tables */
    float *scratch;         /* rq_llama_scratch() floats */
    float *logits;          /* (vocab) */
} rq_llama;

int64_t rq_llama_scratch(const rq_llama *m) {
    return 2 * m->hidden + (m->n_heads + 2 * m->n_kv) * m->head_dim + m->n_heads * m->head_dim + 2 * m->inter +
           m->n_heads * m->max_len;
}

static void linear1(const rq_layer *d, const float *x, float *y) {
    float *xs = NULL;
    if (d->in_div) { /* x / s as the module computes it in fp32 (IEEE division: the same values) */
        xs = (float *)__builtin_alloca((size_t)d->in * sizeof(float));
        for (int64_t i = 0; i < d->in; i++) xs[i] = x[i] / d->in_div[i];
        x = xs;
    }
    rq_gemm(d, x, 1, d->in, y);
}

/* y = x / sqrt(mean(x^2) + eps) * w, as transformers' RMSNorm (fp32 throughout). */
static void rmsnorm(const float *x, const float *w, float eps, int64_t n, float *y) {
    const float ss = dot(x, x, n);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* Rotary embedding of one head in place: v*cos + rotate_half(v)*sin, rotate_half(v) = (-v[d/2:], v[:d/2]). */
static void rope(float *v, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

typedef struct {
    const rq_llama *m;
    const rq_block *b;
    const float *q;
    float *out;
    int64_t pos;
} attn_ctx;

/* One query head over cache positions 0..pos: softmax(q K^T * scaling) V. */
static void attn_task(const void *arg, int64_t h) {
    const attn_ctx *a = (const attn_ctx *)arg;
    const rq_llama *m = a->m;
    const int64_t d = m->head_dim, L = m->max_len, n = a->pos + 1;
    const int64_t kvh = h / (m->n_heads / m->n_kv);
    const float *q = a->q + h * d, *K = a->b->kc + kvh * L * d, *V = a->b->vc + kvh * L * d;
    float *s = m->scratch + rq_llama_scratch(m) - m->n_heads * L + h * L;
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        s[t] = dot(q, K + t * d, d) * m->scaling;
        if (s[t] > mx) mx = s[t];
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < n; t++) sum += (s[t] = expf(s[t] - mx));
    const float inv = 1.0f / sum;
    float *o = a->out + h * d;
    for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const float p = s[t] * inv;
        const float *vt = V + t * d;
        for (int64_t i = 0; i < d; i++) o[i] += p * vt[i];
    }
}

/* Bound on |screen logit - head logit| per row, in units of scale[r] * ||x||_1: int8 rounding (q = round(w / s),
 * |w - q s| <= s / 2) plus fp32 rounding of both sums (|w| <= 127.5 s, relative error well under 1e-5). */
#define RQ_SCREEN_SLACK 0.51f

/* Argmax of the head's logits for hidden state h (see rq_llama_step for `exact` and the screen). */
static int64_t head_argmax(const rq_llama *m, const float *h, int exact) {
    const int64_t H = m->hidden;
    if (exact || !m->screen) {
        linear1(m->head, h, m->logits);
        int64_t best = 0;
        for (int64_t i = 1; i < m->vocab; i++)
            if (m->logits[i] > m->logits[best]) best = i;
        return best;
    }
    const rq_layer *sc = m->screen;
    linear1(sc, h, m->logits);
    float l1 = 0.0f;
    for (int64_t i = 0; i < H; i++) l1 += fabsf(h[i]);
    const float c = RQ_SCREEN_SLACK * l1 * 1.0001f; /* the 1.0001: rounding of l1 itself */
    float lower = -INFINITY;
    for (int64_t r = 0; r < m->vocab; r++) {
        const float lo = m->logits[r] - c * sc->scale[r];
        if (lo > lower) lower = lo;
    }
    int64_t best = -1;
    float bestv = 0.0f;
    for (int64_t r = 0; r < m->vocab; r++) {
        if (m->logits[r] + c * sc->scale[r] < lower) continue;
        /* exactly what linear1(m->head) computes for row r */
        const float v = row_dot_dense(m->head, r, h) + (m->head->bias ? m->head->bias[r] : 0.0f);
        if (best < 0 || v > bestv) best = r, bestv = v;
    }
    return best;
}

/* Feed `token` at position `pos` (0 <= pos < max_len; the cache holds positions < pos); returns the argmax (first
 * maximum) of the next token's logits, -1 for an argument out of range. With `exact` or no screen, m->logits holds
 * the head's logits. Otherwise the int8 screen reads a quarter of a 16-bit head's bytes (half of 32-bit): every
 * row whose screened logit plus its error bound reaches the best lower bound is recomputed by the head itself, so
 * the returned argmax is the head's own, to the bit; m->logits then holds the screen's logits. */
int64_t rq_llama_step(const rq_llama *m, int64_t token, int64_t pos, int exact) {
    if (pos < 0 || pos >= m->max_len || token < 0 || token >= m->vocab) return -1;
    const int64_t H = m->hidden, d = m->head_dim, I = m->inter;
    float *x = m->scratch, *h = x + H, *q = h + H, *k = q + m->n_heads * d, *v = k + m->n_kv * d;
    float *att = v + m->n_kv * d, *g = att + m->n_heads * d, *u = g + I;
    if (m->embed_mode == 5) {
        memcpy(x, (const float *)m->embed + token * H, (size_t)H * sizeof(float));
    } else {
        const uint16_t *e = (const uint16_t *)m->embed + token * H;
        for (int64_t i = 0; i < H; i++) x[i] = m->embed_mode == 2 ? half_to_float(e[i]) : bf16_to_float(e[i]);
    }
    const float *cs = m->cos + pos * d, *sn = m->sin + pos * d;
    for (int64_t l = 0; l < m->n_blocks; l++) {
        const rq_block *b = m->blocks + l;
        rmsnorm(x, b->norm1, m->eps, H, h);
        linear1(b->q, h, q);
        linear1(b->k, h, k);
        linear1(b->v, h, v);
        for (int64_t j = 0; j < m->n_heads; j++) rope(q + j * d, cs, sn, d);
        for (int64_t j = 0; j < m->n_kv; j++) {
            rope(k + j * d, cs, sn, d);
            memcpy(b->kc + (j * m->max_len + pos) * d, k + j * d, (size_t)d * sizeof(float));
            memcpy(b->vc + (j * m->max_len + pos) * d, v + j * d, (size_t)d * sizeof(float));
        }
        attn_ctx a = {m, b, q, att, pos};
        /* heads in parallel once the keys are many enough to outweigh waking the pool */
        if ((pos + 1) * d * m->n_heads >= (1 << 16)) run_chunks(attn_task, &a, m->n_heads);
        else for (int64_t j = 0; j < m->n_heads; j++) attn_task(&a, j);
        linear1(b->o, att, h);
        for (int64_t i = 0; i < H; i++) x[i] += h[i];
        rmsnorm(x, b->norm2, m->eps, H, h);
        linear1(b->gate, h, g);
        linear1(b->up, h, u);
        for (int64_t i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        linear1(b->down, g, h);
        for (int64_t i = 0; i < H; i++) x[i] += h[i];
    }
    rmsnorm(x, m->final_norm, m->eps, H, h);
    return head_argmax(m, h, exact);
}

/* The head's argmax for a final hidden state h (after the final norm), as rq_llama_step ends: a prefill that ran
 * the blocks elsewhere picks its first token here, through the same screen. */
int64_t rq_llama_head(const rq_llama *m, const float *h, int exact) { return head_argmax(m, h, exact); }
