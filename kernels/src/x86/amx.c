/* bf16 matrix products on Intel AMX (tdpbf16ps) for GPTQ calibration: a linear layer's forward
 * y = bf16(x) · bf16(W)ᵀ and the Hessian core bf16(x)ᵀ · bf16(x), both accumulated in float32.
 *
 * Why AMX and why here: calibration runs ~20 TFLOP of such products; float32 BLAS reaches ~180 GFLOPS on
 * this class of machine while one AMX tile multiply does 16x16x32 bf16 products per instruction. The file
 * is self-contained (own cpuid check, own threads) so the rest of the library is unaffected by it.
 *
 * Rounding rule (reproduced exactly by qkiln.kernels.bf16.round_bf16): float32 -> bf16 flushes float32
 * denormals (exponent field 0) to a zero of the same sign, then rounds to nearest, ties to even; values
 * that round past the largest bf16 become inf; NaN stays NaN (quiet bit set, payload truncated). That is
 * what vcvtne2ps2bf16 does; tdpbf16ps then multiplies bf16 pairs exactly and adds in float32 with
 * round-to-nearest-even, flushing denormal results to zero.
 *
 * Layouts (all tiles 16 rows x 64 bytes, stored as contiguous 1 KB blocks):
 *   A tile  : 16 rows (tokens for the linear, features for the gram) x 32 bf16 along the reduced axis;
 *   B tile  : 16 rows of 16 bf16 pairs, B[r][2c+j] = M[2r+j][c] (the "VNNI" pairing of the reduced axis).
 * The packed weight holds B tiles, tile (nb, kb) at ((nb * KB) + kb) * 1 KB, with the n-block count rounded
 * up to an even number and k up to a multiple of 32, zero padded.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_BYTES 1024
#define MAX_THREADS 64

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tilecfg_t;

/* ---------------------------------------------------------------------------------------------------- */
/* availability                                                                                           */

static uint64_t amx_xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static int g_amx_ok = 0;
static pthread_once_t g_amx_once = PTHREAD_ONCE_INIT;

static void amx_detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    if (!((c >> 27) & 1)) return; /* OSXSAVE: xgetbv usable */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    const int avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    const int amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    if (!(avx512f && avx512bw && avx512vl && amx_bf16 && amx_tile)) return;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return;
    if (!((a >> 5) & 1)) return; /* AVX512_BF16 (vcvtne2ps2bf16) */
    const uint64_t xcr0 = amx_xgetbv0();
    if ((xcr0 & 0xe6) != 0xe6) return;                  /* SSE/AVX/AVX-512 state */
    if ((xcr0 & (3ull << 17)) != (3ull << 17)) return;  /* XTILECFG + XTILEDATA */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return; /* Linux >= 5.16 */
    g_amx_ok = 1;
}

int qk_bf16_amx_available(void) {
    pthread_once(&g_amx_once, amx_detect);
    return g_amx_ok;
}

static void tile_config(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

static int resolve_threads(int nthreads) {
    if (nthreads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nthreads = n > 0 ? (int)n : 1;
    }
    return nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
}

/* Run fn(arg_i) for i in [0, n) on n threads, the caller being thread 0. Threads are created per call:
 * a call here is milliseconds to seconds of work, so ~50 us of creation does not matter. */
static void run_threads(int n, void *(*fn)(void *), void *args, size_t arg_size) {
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 1; i < n; i++)
        started[i] = pthread_create(&th[i], NULL, fn, (char *)args + (size_t)i * arg_size) == 0;
    fn(args);
    for (int i = 1; i < n; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        else fn((char *)args + (size_t)i * arg_size); /* could not start a thread: do its share here */
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* conversion helpers                                                                                      */

static inline __mmask16 mask_upto(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* 32 floats (p[0..31], only the first `valid` read) -> 32 bf16 in order, as one 512-bit vector. */
static inline __m512i cvt32(const float *p, int64_t valid) {
    const __m512 lo = _mm512_maskz_loadu_ps(mask_upto(valid), p);
    const __m512 hi = _mm512_maskz_loadu_ps(mask_upto(valid - 16), p + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Transpose a 16x16 matrix of 32-bit elements held in 16 registers. */
static inline void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* now r[4q + s] holds, per 128-bit lane L, row (4L + ?) ... finish with two lane shuffles */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);       /* lanes 0,2 of a ; 0,2 of b */
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);   /* lanes 1,3 */
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* float32 -> bf16 by the rule above, n elements (exported so the tests pin the C rounding to NumPy's). */
void qk_bf16_round(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i < n; i += 32) {
        const __m512i v = cvt32(x + i, n - i);
        const int64_t left = n - i;
        const __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << left) - 1ull);
        _mm512_mask_storeu_epi16(out + i, m, v);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* weight packing                                                                                          */

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t qk_bf16_packed_bytes(int64_t n, int64_t k) {
    if (n <= 0 || k <= 0) return 0;
    return (size_t)(cdiv(n, 32) * 2) * (size_t)cdiv(k, 32) * TILE_BYTES;
}

void qk_bf16_pack_weight(const float *w, int64_t n, int64_t k, uint16_t *out) {
    const int64_t NB = cdiv(n, 32) * 2, KB = cdiv(k, 32);
    for (int64_t nb = 0; nb < NB; nb++) {
        for (int64_t kb = 0; kb < KB; kb++) {
            __m512i r[16];
            for (int c = 0; c < 16; c++) {
                const int64_t row = nb * 16 + c;
                r[c] = row < n ? cvt32(w + row * k + kb * 32, k - kb * 32) : _mm512_setzero_si512();
            }
            /* r[c] dword q = pair (W[row c][2q], W[row c][2q+1]); B dword [q][c] is that pair. */
            transpose16_epi32(r);
            uint16_t *tile = out + (nb * KB + kb) * (TILE_BYTES / 2);
            for (int q = 0; q < 16; q++) _mm512_storeu_si512(tile + q * 32, r[q]);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* linear: y (m, n) = bf16(x) (m, k) · bf16(W)ᵀ                                                            */

typedef struct {
    const float *x;
    const uint16_t *w;
    float *y;
    int64_t m, k, n;
    int64_t strips, nsplit; /* work unit u: strip u / nsplit, n-pair range part u % nsplit */
    int stream;             /* y is large and 64-byte aligned rows: write it around the caches */
    int64_t *next_unit;     /* shared work counter: units are taken dynamically (results do not depend on it) */
    uint16_t *abuf; /* 2 * KB tiles: the strip's 32 rows as A tiles, [half][kb] */
} linear_job_t;

static void *linear_worker(void *arg) {
    linear_job_t *j = (linear_job_t *)arg;
    const int64_t KB = cdiv(j->k, 32), NP = cdiv(j->n, 32);
    const int64_t units = j->strips * j->nsplit;
    float ctmp[16 * 16] __attribute__((aligned(64)));
    int configured = 0;
    for (;;) {
        const int64_t u = __atomic_fetch_add(j->next_unit, 1, __ATOMIC_RELAXED);
        if (u >= units) break;
        const int64_t s = u / j->nsplit, part = u % j->nsplit;
        const int64_t p0 = NP * part / j->nsplit, p1 = NP * (part + 1) / j->nsplit;
        if (p0 >= p1) continue;
        if (!configured) {
            tile_config();
            configured = 1;
        }
        const int64_t t0 = s * 32;
        /* strip -> A tiles: row r of half h is token t0 + 16h + r */
        for (int h = 0; h < 2; h++) {
            for (int r = 0; r < 16; r++) {
                const int64_t t = t0 + 16 * h + r;
                for (int64_t kb = 0; kb < KB; kb++) {
                    const __m512i v = t < j->m ? cvt32(j->x + t * j->k + kb * 32, j->k - kb * 32)
                                               : _mm512_setzero_si512();
                    _mm512_store_si512(j->abuf + ((h * KB + kb) * 16 + r) * 32, v);
                }
            }
        }
        const uint16_t *a0 = j->abuf, *a1 = j->abuf + KB * 512;
        for (int64_t p = p0; p < p1; p++) {
            const uint16_t *b0 = j->w + (2 * p) * KB * 512, *b1 = j->w + (2 * p + 1) * KB * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kb = 0; kb < KB; kb++) {
                _tile_loadd(4, a0 + kb * 512, 64);
                _tile_loadd(5, a1 + kb * 512, 64);
                _tile_loadd(6, b0 + kb * 512, 64);
                _tile_loadd(7, b1 + kb * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            /* C tile (h, q): tokens t0 + 16h.., outputs 32p + 16q.. */
            const int64_t n0 = 32 * p;
            const int full_rows0 = t0 + 16 <= j->m, full_rows1 = t0 + 32 <= j->m;
            const int full_c0 = n0 + 16 <= j->n, full_c1 = n0 + 32 <= j->n;
            float *y = j->y;
            const int64_t ys = j->n * 4;
#define STORE_C(TILE, H, Q, FULL)                                                                  \
    do {                                                                                           \
        const int64_t tr = t0 + 16 * (H), nc = n0 + 16 * (Q);                                     \
        if ((FULL) && j->stream) {                                                                 \
            _tile_stored(TILE, ctmp, 64);                                                          \
            for (int rr = 0; rr < 16; rr++)                                                        \
                _mm512_stream_ps(y + (tr + rr) * j->n + nc, _mm512_load_ps(ctmp + rr * 16));      \
        } else if (FULL) {                                                                         \
            _tile_stored(TILE, y + tr * j->n + nc, ys);                                            \
        } else if (tr < j->m && nc < j->n) {                                                       \
            _tile_stored(TILE, ctmp, 64);                                                          \
            const int64_t nr = j->m - tr < 16 ? j->m - tr : 16, ncol = j->n - nc < 16 ? j->n - nc : 16; \
            for (int64_t rr = 0; rr < nr; rr++)                                                    \
                memcpy(y + (tr + rr) * j->n + nc, ctmp + rr * 16, (size_t)ncol * 4);               \
        }                                                                                          \
    } while (0)
            STORE_C(0, 0, 0, full_rows0 && full_c0);
            STORE_C(1, 0, 1, full_rows0 && full_c1);
            STORE_C(2, 1, 0, full_rows1 && full_c0);
            STORE_C(3, 1, 1, full_rows1 && full_c1);
#undef STORE_C
        }
    }
    if (configured) {
        _mm_sfence(); /* streaming stores visible before the caller reads y */
        _tile_release();
    }
    return NULL;
}

int qk_bf16_linear(const float *x, int64_t m, int64_t k, const uint16_t *wpacked, int64_t n, float *y,
                   int nthreads) {
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0) {
        memset(y, 0, (size_t)(m * n) * sizeof(float));
        return 0;
    }
    if (!qk_bf16_amx_available()) return -1;
    const int nt = resolve_threads(nthreads);
    const int64_t KB = cdiv(k, 32), strips = cdiv(m, 32), NP = cdiv(n, 32);
    /* few strips: split the output columns too so every thread has work */
    int64_t nsplit = strips >= nt ? 1 : (nt + strips - 1) / strips;
    if (nsplit > NP) nsplit = NP;
    const int use = (int)(strips * nsplit < nt ? strips * nsplit : nt);
    /* Streaming (non-temporal) stores keep a large y from evicting the packed weight from L2 and skip the
     * read-for-ownership of every output line; they need 64-byte aligned output rows. */
    const int stream = (uintptr_t)y % 64 == 0 && n % 16 == 0 && (size_t)(m * n) * 4 >= ((size_t)8 << 20);
    int64_t next_unit = 0;
    linear_job_t jobs[MAX_THREADS];
    uint16_t *bufs = aligned_alloc(64, (size_t)use * (size_t)(2 * KB) * TILE_BYTES);
    if (!bufs) return -2;
    for (int i = 0; i < use; i++) {
        jobs[i] = (linear_job_t){x, wpacked, y, m, k, n, strips, nsplit, stream, &next_unit,
                                 bufs + (size_t)i * (size_t)(2 * KB) * 512};
    }
    run_threads(use, linear_worker, jobs, sizeof jobs[0]);
    free(bufs);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* gram: out (k, k) = bf16(x)ᵀ · bf16(x), upper block triangle computed, mirrored                           */
/*
 * The tokens are cut into G groups of whole chunks; a group is summed in its own float32 accumulator, the
 * chunks of a group in token order, and the accumulators are then added in group order. G and the chunk
 * size depend only on (m, k), so the result is the same bytes for any thread count or scheduling, while
 * threads take groups dynamically (a thread slowed by another process does not hold the other back).
 */

typedef struct {
    const float *x;
    int64_t m, k, kp, T;     /* kp: k rounded up to 32; T: tokens per chunk (multiple of 32) */
    int64_t G, group_chunks; /* groups and chunks per group */
    float *accs;             /* G accumulators of kp x kp; only upper super-blocks are written */
    int64_t *next_group;     /* shared work counter */
    uint16_t *abuf, *bbuf;   /* this thread's chunk: tiles [fb][tb], fb < kp/16, tb < T/32 */
} gram_job_t;

/* Convert tokens [c0, c0+T) (zeros past m) to B tiles (token pairs) and A tiles (xᵀ) of every feature. */
static void gram_convert(const gram_job_t *j, int64_t c0, uint16_t *abuf, uint16_t *bbuf) {
    const int64_t TB = j->T / 32, FB = j->kp / 16;
    const __m512i perm = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                          23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t tb = 0; tb < TB; tb++) {
        const int64_t t0 = c0 + tb * 32;
        for (int64_t fb = 0; fb < FB; fb++) {
            const int64_t f0 = fb * 16;
            const __mmask16 fm = mask_upto(j->k - f0);
            __m512i r[16];
            for (int q = 0; q < 16; q++) {
                const int64_t ta = t0 + 2 * q, tn = ta + 1;
                const __m512 lo = ta < j->m ? _mm512_maskz_loadu_ps(fm, j->x + ta * j->k + f0) : _mm512_setzero_ps();
                const __m512 hi = tn < j->m ? _mm512_maskz_loadu_ps(fm, j->x + tn * j->k + f0) : _mm512_setzero_ps();
                /* words 0..15 token ta, 16..31 token ta+1 -> interleave to pairs per feature */
                r[q] = _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
            uint16_t *bt = bbuf + (fb * TB + tb) * 512;
            for (int q = 0; q < 16; q++) _mm512_store_si512(bt + q * 32, r[q]);
            transpose16_epi32(r);
            uint16_t *at = abuf + (fb * TB + tb) * 512;
            for (int q = 0; q < 16; q++) _mm512_store_si512(at + q * 32, r[q]);
        }
    }
}

/* Accumulate super-block (I, J) (features 32I.., 32J..) of one chunk into acc (zero it first if `first`).
 * The accumulator is tiled: the 16x16 tile of feature blocks (fi, fj) is 1 KB contiguous at (fi * FB + fj),
 * so a pair's four tiles are read as whole contiguous kilobytes the prefetchers follow. */
static inline void gram_pair(const gram_job_t *j, float *acc, int64_t I, int64_t J, int first) {
    const int64_t TB = j->T / 32, FB = j->kp / 16;
    float *c00 = acc + ((2 * I) * FB + 2 * J) * 256, *c01 = c00 + 256;
    float *c10 = c00 + FB * 256, *c11 = c10 + 256;
    if (first) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        _tile_loadd(0, c00, 64);
        _tile_loadd(1, c01, 64);
        _tile_loadd(2, c10, 64);
        _tile_loadd(3, c11, 64);
    }
    const uint16_t *a0 = j->abuf + (2 * I) * TB * 512, *a1 = a0 + TB * 512;
    const uint16_t *b0 = j->bbuf + (2 * J) * TB * 512, *b1 = b0 + TB * 512;
    for (int64_t tb = 0; tb < TB; tb++) {
        _tile_loadd(4, a0 + tb * 512, 64);
        _tile_loadd(5, a1 + tb * 512, 64);
        _tile_loadd(6, b0 + tb * 512, 64);
        _tile_loadd(7, b1 + tb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c00, 64);
    _tile_stored(1, c01, 64);
    _tile_stored(2, c10, 64);
    _tile_stored(3, c11, 64);
}

static void *gram_worker(void *arg) {
    gram_job_t *j = (gram_job_t *)arg;
    const int64_t SB = j->kp / 32;
    int configured = 0;
    for (;;) {
        const int64_t g = __atomic_fetch_add(j->next_group, 1, __ATOMIC_RELAXED);
        if (g >= j->G) break;
        if (!configured) {
            tile_config();
            configured = 1;
        }
        float *acc = j->accs + (size_t)g * (size_t)(j->kp * j->kp);
        for (int64_t c = 0; c < j->group_chunks; c++) {
            const int64_t c0 = (g * j->group_chunks + c) * j->T;
            if (c0 >= j->m) break;
            gram_convert(j, c0, j->abuf, j->bbuf);
            /* two super-rows at a time: each B panel is used by both while it is in L1 */
            for (int64_t I0 = 0; I0 < SB; I0 += 2) {
                for (int64_t J = I0; J < SB; J++) {
                    for (int64_t I = I0; I < I0 + 2 && I <= J; I++)
                        gram_pair(j, acc, I, J, c == 0);
                }
            }
        }
    }
    if (configured) _tile_release();
    return NULL;
}

/* A scratch arena kept between Gram calls: calibration calls it per layer with the same shapes, and a fresh
 * allocation of tens of MB would be page-faulted (and zeroed by the kernel) on every call. One caller at a
 * time uses it; a concurrent caller gets a private allocation. */
static pthread_mutex_t g_arena_lock = PTHREAD_MUTEX_INITIALIZER;
static char *g_arena = NULL;
static size_t g_arena_bytes = 0;

static char *arena_get(size_t bytes, int *cached) {
    bytes = (bytes + 63) / 64 * 64;
    if (pthread_mutex_trylock(&g_arena_lock) == 0) {
        if (g_arena_bytes < bytes) {
            free(g_arena);
            g_arena = aligned_alloc(64, bytes);
            g_arena_bytes = g_arena ? bytes : 0;
        }
        if (g_arena) {
            *cached = 1;
            return g_arena;
        }
        pthread_mutex_unlock(&g_arena_lock);
    }
    *cached = 0;
    return aligned_alloc(64, bytes);
}

static void arena_put(char *p, int cached) {
    if (cached) pthread_mutex_unlock(&g_arena_lock);
    else free(p);
}

#ifndef QK_GRAM_CHUNK_BYTES
#define QK_GRAM_CHUNK_BYTES (1 << 20)
#endif
#ifndef QK_GRAM_MAX_GROUPS
#define QK_GRAM_MAX_GROUPS 8
#endif
#define QK_GRAM_ACC_BYTES ((size_t)64 << 20)

int qk_bf16_gram(const float *x, int64_t m, int64_t k, float *out, int nthreads) {
    if (k <= 0) return 0;
    if (m <= 0) {
        memset(out, 0, (size_t)(k * k) * sizeof(float));
        return 0;
    }
    if (!qk_bf16_amx_available()) return -1;
    const int64_t kp = cdiv(k, 32) * 32;
    /* tokens per chunk: both bf16 layouts of a chunk in about QK_GRAM_CHUNK_BYTES */
    int64_t T = (int64_t)QK_GRAM_CHUNK_BYTES / (kp * 4) / 32 * 32;
    if (T < 64) T = 64;
    if (T > 2048) T = 2048;
    if (T > cdiv(m, 32) * 32) T = cdiv(m, 32) * 32;
    const int64_t nchunks = cdiv(m, T);
    const size_t acc_elems = (size_t)(kp * kp);
    int64_t gmax = (int64_t)(QK_GRAM_ACC_BYTES / (acc_elems * sizeof(float)));
    if (gmax > QK_GRAM_MAX_GROUPS) gmax = QK_GRAM_MAX_GROUPS;
    if (gmax < 1) gmax = 1;
    const int64_t group_chunks = cdiv(nchunks, gmax < nchunks ? gmax : nchunks);
    const int64_t G = cdiv(nchunks, group_chunks);
    int nt = resolve_threads(nthreads);
    if (nt > G) nt = (int)G;
    const size_t chunk_elems = (size_t)(kp * T); /* bf16 elements of one layout of one chunk */
    const size_t buf_bytes = (size_t)nt * 2 * chunk_elems * sizeof(uint16_t);
    const size_t acc_bytes = (size_t)G * acc_elems * sizeof(float);
    int cached = 0;
    char *arena = arena_get(buf_bytes + acc_bytes, &cached);
    if (!arena) return -2;
    uint16_t *bufs = (uint16_t *)arena;
    float *accs = (float *)(arena + buf_bytes);
    int64_t next_group = 0;
    gram_job_t jobs[MAX_THREADS];
    for (int i = 0; i < nt; i++) {
        uint16_t *mine = bufs + (size_t)i * 2 * chunk_elems;
        jobs[i] = (gram_job_t){x, m, k, kp, T, G, group_chunks, accs, &next_group, mine, mine + chunk_elems};
    }
    run_threads(nt, gram_worker, jobs, sizeof jobs[0]);
    /* add the groups in order into the first, and mirror the element-wise upper triangle (i <= j):
     * the result is exactly symmetric */
    const int64_t FB = kp / 16;
    for (int64_t ti = 0; ti * 16 < k; ti++) {
        for (int64_t tj = ti; tj * 16 < k; tj++) {
            float *tile = accs + (ti * FB + tj) * 256;
            for (int64_t g = 1; g < G; g++) {
                const float *other = accs + (size_t)g * acc_elems + (ti * FB + tj) * 256;
                for (int e = 0; e < 256; e++) tile[e] += other[e];
            }
            for (int r = 0; r < 16; r++) {
                const int64_t i = ti * 16 + r;
                if (i >= k) break;
                for (int c = 0; c < 16; c++) {
                    const int64_t jj = tj * 16 + c;
                    if (jj >= k) break;
                    if (jj < i) continue;
                    out[i * k + jj] = tile[r * 16 + c];
                    out[jj * k + i] = tile[r * 16 + c];
                }
            }
        }
    }
    arena_put(arena, cached);
    return 0;
}
