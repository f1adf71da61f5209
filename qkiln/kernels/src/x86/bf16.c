/* bf16 matrix products for GPTQ calibration: a linear layer's forward y = bf16(x) · bf16(W)ᵀ and the Hessian
 * core bf16(x)ᵀ · bf16(x), both accumulated in float32, on Intel AMX (tdpbf16ps) or, where AMX is missing,
 * AVX512_BF16 (vdpbf16ps: AMD Zen 4/5, Intel Cooper Lake) — one code, two engines (see "engines" below).
 *
 * Why here: calibration runs ~20 TFLOP of such products; float32 BLAS reaches ~180 GFLOPS on this class of
 * machine while one AMX tile multiply does 16x16x32 bf16 products per instruction and vdpbf16ps twice a
 * float32 FMA's. The file takes its CPU check from cpu.c and its threads from the library's pool (threads.c).
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
 * The packed weight holds B tiles, tile (nb, kb) at ((nb / 2 * KB + kb) * 2 + nb % 2) * 1 KB (an output
 * pair's two tiles of a k step side by side), with the n-block count rounded up to an even number and k up
 * to a multiple of 32, zero padded.
 *
 * Speed: both products use the 2x2 tile kernel (4 accumulators, 2 A and 2 B tiles per step) and are blocked
 * for L2. On the machines this was tuned on (Sapphire Rapids guests: two vCPUs on two cores, each with its
 * own L2 and tile unit, shared with the host's other guests) memory beyond L2 streams at ~6-14 GB/s
 * per core, so the blocking minimizes what leaves L2; bench/bf16_bench.py --calib measures the calibration
 * scenario (two callers, one thread each). There the tile unit's rate seen by one thread moves up to 6x within
 * minutes (350-2,150 GFLOP/s for 2x2 steps on cache-resident tiles). Measured at one moment: the linear at
 * calibration's shapes runs at 85-90 % of its own loop on cache-resident operands, that loop at 63-85 % of
 * the bare tile rate (multiplies on tiles already loaded): its four tile loads per four multiplies do not
 * overlap with them, each costing ~0.6 of a multiply, from L2 as from L1 — and with 8 tile registers no
 * step needs fewer loads per multiply than the 2x2 one. Prefetching the next accumulator block or the next
 * block's x, splitting k so a weight chunk stays in L1, and adding linear_add's y at the store instead of
 * loading it into the tiles were all within the noise of paired runs. The AVX512_BF16 engine (AMD EPYC Zen 4,
 * 2 vCPUs): 212-216 GFLOP/s per thread for the linear at calibration's shapes (float32 BLAS 100-105); the Gram
 * 382-391 counted as a full product (BLAS syrk 180-234).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qkiln_kernels.h"
#include "cpu.h"
#include "elementwise/silu_avx512.h"
#include "threads.h"
#include "x86/amx_tiles.h"
#include "x86/transpose16.h"

#define TILE_BYTES 1024
#define MAX_THREADS QK_MAX_THREADS

/* ---------------------------------------------------------------------------------------------------- */
/* availability and threads                                                                               */

int qk_bf16_amx_available(void) { return qk_cpu_amx_permitted(); }

/* ---------------------------------------------------------------------------------------------------- */
/* engines                                                                                                 */
/*
 * The products run on one of two engines, over the same packed layouts, blocking and summation order:
 *   QK_BF16_AMX: the four accumulators of a 32 x 32 output block are tile registers 0-3; a reduction step is
 *     tile_step_2x2 (amx_tiles.h);
 *   QK_BF16_AVX512: CPUs with AVX512_BF16 but no AMX (AMD Zen 4 and 5, Intel Cooper Lake): the accumulators
 *     are a 4 KB image in memory (tile 2h + q, row r at floats (2h + q) * 256 + 16 r) and a run of steps is
 *     vdpbf16ps on 8 rows x 32 columns of accumulators held in registers: an accumulator row += A's pair kp of
 *     that row (broadcast) times B's row kp (16 columns' pairs), pair after pair; each run of up to
 *     QK_BF16_KCH steps is summed from zero and then added to the image.
 * Either way each output is summed over the reduced axis in an order fixed by the shapes (AMX: in one float32
 * accumulator; AVX512_BF16: runs of QK_BF16_KCH steps, added in order), so the bytes of an engine depend on
 * the inputs alone; the two engines differ in the last bits. Engine 0 asks for the best here.
 */
enum { QK_BF16_AMX = 1, QK_BF16_AVX512 = 2 };

int qk_bf16_engines(void) {
    return (qk_bf16_amx_available() ? QK_BF16_AMX : 0) |
           ((qk_cpu_features() & QK_CPU_AVX512_BF16) ? QK_BF16_AVX512 : 0);
}

/* The engine a request runs (0: the best available), or 0 when it cannot run here. */
static int engine_resolve(int engine) {
    const int have = qk_bf16_engines();
    if (engine == 0) return (have & QK_BF16_AMX) ? QK_BF16_AMX : (have & QK_BF16_AVX512) ? QK_BF16_AVX512 : 0;
    return (engine == QK_BF16_AMX || engine == QK_BF16_AVX512) && (have & engine) ? engine : 0;
}

/* AVX512_BF16 steps per pass: a pass's B tiles (16 KB) stay in L1 while the four row groups reuse them. */
#define QK_BF16_KCH 8

/* img (the 4 accumulator tiles) += the 2x2 product of A panel a and B panel b over nst steps (1024 bf16 each:
 * two A tiles, two B tiles), on AVX512_BF16. A run of up to QK_BF16_KCH steps sums 8 accumulator rows of both
 * column tiles from zero in 16 registers, then adds them to img: float32 chains of at most 256 products, so a
 * Gram over 4096 tokens lands within 4.9e-7 of the exact sum relative to Σ|x x| (one running sum per element
 * was 5.7e-6; the NumPy path's 1.0e-6). A's pair kp of row r is at r * RS + kp * PS within its tile: (32, 2)
 * for an A tile, (2, 32) for the Gram's rows read from their B tiles (the same values, transposed: a broadcast
 * reads any address, so the AVX512_BF16 Gram never transposes). */
static inline __attribute__((always_inline)) void steps(float *img, const uint16_t *a, const uint16_t *b, int64_t nst,
                                                        const int RS, const int PS) {
    for (int64_t t0 = 0; t0 < nst; t0 += QK_BF16_KCH) {
        const int64_t t1 = t0 + QK_BF16_KCH < nst ? t0 + QK_BF16_KCH : nst;
        for (int g = 0; g < 4; g++) { /* rows 8(g % 2).. of A tile g / 2: accumulator rows of tiles 2h, 2h + 1 */
            const int h = g >> 1, r0 = (g & 1) * 8;
            float *c0 = img + (2 * h) * 256 + r0 * 16, *c1 = c0 + 256;
            __m512 acc[16]; /* row r: acc[2r] of tile 2h, acc[2r + 1] of tile 2h + 1 */
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            dpbf16_rows(acc, 8, 2, a + t0 * 1024 + h * 512 + r0 * RS, RS, 1024, PS, b + t0 * 1024, 512, 1024, t1 - t0);
            for (int r = 0; r < 8; r++) {
                _mm512_store_ps(c0 + 16 * r, _mm512_add_ps(_mm512_load_ps(c0 + 16 * r), acc[2 * r]));
                _mm512_store_ps(c1 + 16 * r, _mm512_add_ps(_mm512_load_ps(c1 + 16 * r), acc[2 * r + 1]));
            }
        }
    }
}

static void avx512_steps(float *img, const uint16_t *a, const uint16_t *b, int64_t nst) { steps(img, a, b, nst, 32, 2); }
/* The Gram's: A's rows from B tiles. */
static void avx512_steps_bt(float *img, const uint16_t *a, const uint16_t *b, int64_t nst) {
    steps(img, a, b, nst, 2, 32);
}

/* 16 rows of 64 bytes between a tile image (row stride 64 bytes) and memory (row stride in bytes). */
static inline void image_rows(void *dst, int64_t dstride, const void *src, int64_t sstride) {
    for (int r = 0; r < 16; r++)
        _mm512_storeu_si512((char *)dst + r * dstride, _mm512_loadu_si512((const char *)src + r * sstride));
}

typedef struct {
    void *(*fn)(void *);
    char *args;
    size_t arg_size;
} per_job_t;

static void per_job_task(void *ctx, long i) {
    const per_job_t *p = ctx;
    p->fn(p->args + (size_t)i * p->arg_size);
}

/* fn(args_i) for each of n jobs on the pool, each job on one thread (a job claims its work units itself and
 * configures the tiles of the thread it runs on). */
static void run_threads(int n, void *(*fn)(void *), void *args, size_t arg_size) {
    per_job_t p = {fn, (char *)args, arg_size};
    qk_parallel(per_job_task, &p, n, n);
}

/* ---------------------------------------------------------------------------------------------------- */
/* conversion helpers                                                                                      */

/* Lanes 0..n-1 of a 32-lane vector of 16-bit elements (none for n <= 0, all for n >= 32). */
static inline __mmask32 mask32_upto(int64_t n) {
    return n >= 32 ? (__mmask32)0xffffffffu : n <= 0 ? (__mmask32)0 : (__mmask32)((1ull << n) - 1ull);
}

/* 32 floats (p[0..31], only the first `valid` read) -> 32 bf16 in order, as one 512-bit vector. */
static inline __m512i cvt32(const float *p, int64_t valid) {
    const __m512 lo = _mm512_maskz_loadu_ps(mask_upto(valid), p);
    const __m512 hi = _mm512_maskz_loadu_ps(mask_upto(valid - 16), p + 16);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* float32 -> bf16 by the rule above, n elements (exported so the tests pin the C rounding to NumPy's). */
void qk_bf16_round(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i < n; i += 32) {
        const __m512i v = cvt32(x + i, n - i);
        _mm512_mask_storeu_epi16(out + i, mask32_upto(n - i), v);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* weight packing                                                                                          */

static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t qk_bf16_packed_bytes(int64_t n, int64_t k) {
    if (n <= 0 || k <= 0) return 0;
    return (size_t)(cdiv(n, 32) * 2) * (size_t)cdiv(k, 32) * TILE_BYTES;
}

/* Tile (nb, kb) of W, nb = 2p + q, is stored at ((p * KB + kb) * 2 + q) KB: the two B tiles one k step of an
 * output pair needs are adjacent, and a pair's whole panel is one contiguous 2 * KB KB stream. */
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
            transpose16((__m512 *)r);
            uint16_t *tile = out + (((nb / 2) * KB + kb) * 2 + nb % 2) * (TILE_BYTES / 2);
            for (int q = 0; q < 16; q++) _mm512_storeu_si512(tile + q * 32, r[q]);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* scratch arenas                                                                                          */

/* Converted operands and the Gram's accumulators live in arenas kept between calls: calibration calls the
 * products per batch, with the same shapes, from two threads at once, and a fresh allocation of tens of MB
 * would be page-faulted (and zeroed by the kernel) on every call. A caller takes a free cached arena (the
 * smallest big enough, else the largest, grown) and gives it back; when all are busy, or the request is
 * larger than ARENA_CACHE_MAX, it gets a private allocation freed after the call. */
#define ARENA_SLOTS 2
#define ARENA_CACHE_MAX ((size_t)96 << 20)
typedef struct {
    char *p;
    size_t bytes;
    int busy;
} arena_slot_t;
static pthread_mutex_t g_arena_lock = PTHREAD_MUTEX_INITIALIZER;
static arena_slot_t g_arenas[ARENA_SLOTS];

static char *arena_get(size_t bytes, int *slot) {
    bytes = (bytes + 4095) / 4096 * 4096;
    *slot = -1;
    if (bytes <= ARENA_CACHE_MAX) {
        pthread_mutex_lock(&g_arena_lock);
        for (int i = 0; i < ARENA_SLOTS; i++) {
            if (g_arenas[i].busy) continue;
            if (*slot < 0) {
                *slot = i;
                continue;
            }
            const arena_slot_t *b = &g_arenas[*slot], *c = &g_arenas[i];
            const int bfit = b->bytes >= bytes, cfit = c->bytes >= bytes;
            if (cfit ? (!bfit || c->bytes < b->bytes) : (!bfit && c->bytes > b->bytes)) *slot = i;
        }
        if (*slot >= 0) g_arenas[*slot].busy = 1;
        pthread_mutex_unlock(&g_arena_lock);
    }
    if (*slot < 0) return aligned_alloc(4096, bytes);
    arena_slot_t *a = &g_arenas[*slot]; /* ours until arena_put: grown outside the lock */
    if (a->bytes < bytes) {
        free(a->p);
        a->p = aligned_alloc(4096, bytes);
        a->bytes = a->p ? bytes : 0;
    }
    if (!a->p) {
        pthread_mutex_lock(&g_arena_lock);
        a->busy = 0;
        pthread_mutex_unlock(&g_arena_lock);
        return NULL;
    }
    return a->p;
}

static void arena_put(char *p, int slot) {
    if (slot < 0) {
        free(p);
        return;
    }
    pthread_mutex_lock(&g_arena_lock);
    g_arenas[slot].busy = 0;
    pthread_mutex_unlock(&g_arena_lock);
}

/* ---------------------------------------------------------------------------------------------------- */
/* linear: y (m, n) = bf16(x) (m, k) · bf16(W)ᵀ                                                            */
/*
 * Blocking: a block of QK_LIN_MS strips (32 tokens each) is converted to A tiles once (QK_LIN_MS * 2 * KB KB,
 * L2-resident), then every output pair's weight panel (2 * KB KB, read once per block from L3) is applied
 * to all strips of the block while it sits in L1/L2. Each output's sum over k runs in one tile accumulator in
 * k order whatever the blocking or thread count, so y does not depend on either.
 */
#ifndef QK_LIN_MS
#define QK_LIN_MS 8
#endif

typedef struct {
    const void *x;          /* (m, k) float32, or bf16 bits when xbf16 */
    const uint16_t *w;
    float *y;
    int64_t m, k, n;
    int64_t blocks, nsplit; /* work unit u: strip block u / nsplit, n-pair range part u % nsplit */
    int stream;             /* y is large and 64-byte aligned rows: write it around the caches */
    int64_t *next_unit;     /* shared work counter: units are taken dynamically (results do not depend on it) */
    uint16_t *abuf;         /* QK_LIN_MS strips of A tiles, strip s k step kb half h at ((s*KB + kb)*2 + h) KB */
    int add;                /* y += x Wᵀ: the accumulators start from y instead of zero */
    int glu;                /* y (m, n/2) = silu(gate)·up: output pair p is gate and up columns 16p.. */
    int xbf16, ybf16;       /* x holds bf16 bits (already rounded: copied as they are); glu's y is bf16 */
    int amx;                /* the engine: AMX tiles, else AVX512_BF16 on the image `img` */
} linear_job_t;

/* tokens [t0, t0 + 32 ns) (zeros past m) -> A tiles: row r of half h of strip s is token t0 + 32s + 16h + r */
static void linear_convert(const linear_job_t *j, int64_t t0, int64_t ns, uint16_t *abuf) {
    const int64_t KB = cdiv(j->k, 32);
    for (int64_t s = 0; s < ns; s++) {
        for (int r = 0; r < 32; r++) {
            const int64_t t = t0 + 32 * s + r;
            uint16_t *dst = abuf + ((s * KB * 2 + r / 16) * 16 + r % 16) * 32;
            if (t < j->m && j->xbf16) {
                const uint16_t *src = (const uint16_t *)j->x + t * j->k;
                for (int64_t kb = 0; kb < KB; kb++)
                    _mm512_store_si512(dst + kb * 1024, _mm512_maskz_loadu_epi16(mask32_upto(j->k - kb * 32), src + kb * 32));
            } else if (t < j->m) {
                const float *src = (const float *)j->x + t * j->k;
                for (int64_t kb = 0; kb < KB; kb++)
                    _mm512_store_si512(dst + kb * 1024, cvt32(src + kb * 32, j->k - kb * 32));
            } else {
                for (int64_t kb = 0; kb < KB; kb++) _mm512_store_si512(dst + kb * 1024, _mm512_setzero_si512());
            }
        }
    }
}

/* The part of the 16 x 16 accumulator tile at token tr, output nc that lies inside y (m, n), copied between
 * a tile image and y (row strides in floats): partial tiles at y's edges. */
static inline void edge_copy(const linear_job_t *j, int64_t tr, int64_t nc, float *dst, int64_t ds, const float *src,
                             int64_t ss) {
    if (tr >= j->m || nc >= j->n) return;
    const int64_t nr = j->m - tr < 16 ? j->m - tr : 16, ncol = j->n - nc < 16 ? j->n - nc : 16;
    for (int64_t rr = 0; rr < nr; rr++) memcpy(dst + rr * ds, src + rr * ss, (size_t)ncol * 4);
}

/* Accumulator tile TILE (0..3) of the block <-> memory (row stride in bytes), on the worker's engine: a tile
 * register (amx) or its part of the image `img`. */
#define ACC_LOAD(TILE, SRC, STRIDE)                                                                \
    do {                                                                                           \
        if (amx) _tile_loadd(TILE, SRC, STRIDE);                                                   \
        else image_rows(img + (TILE) * 256, 64, SRC, STRIDE);                                      \
    } while (0)
#define ACC_STORE(TILE, DST, STRIDE)                                                               \
    do {                                                                                           \
        if (amx) _tile_stored(TILE, DST, STRIDE);                                                  \
        else image_rows(DST, STRIDE, img + (TILE) * 256, 64);                                      \
    } while (0)

static void *linear_worker(void *arg) {
    linear_job_t *j = (linear_job_t *)arg;
    const int64_t KB = cdiv(j->k, 32), NP = cdiv(j->n, 32), strips = cdiv(j->m, 32);
    const int64_t units = j->blocks * j->nsplit;
    float ctmp[16 * 16] __attribute__((aligned(64))), utmp[16 * 16] __attribute__((aligned(64)));
    float img[4 * 256] __attribute__((aligned(64))); /* the AVX512_BF16 engine's accumulators */
    const int amx = j->amx;
    int configured = 0;
    for (;;) {
        const int64_t u = __atomic_fetch_add(j->next_unit, 1, __ATOMIC_RELAXED);
        if (u >= units) break;
        const int64_t blk = u / j->nsplit, part = u % j->nsplit;
        const int64_t p0 = NP * part / j->nsplit, p1 = NP * (part + 1) / j->nsplit;
        if (p0 >= p1) continue;
        if (!configured) {
            if (amx) tile_config();
            configured = 1;
        }
        const int64_t s0 = blk * QK_LIN_MS, ns = strips - s0 < QK_LIN_MS ? strips - s0 : QK_LIN_MS;
        linear_convert(j, s0 * 32, ns, j->abuf);
        float *y = j->y;
        const int64_t ys = j->n * 4;
        for (int64_t p = p0; p < p1; p++) {
            const uint16_t *b = j->w + p * KB * 1024;
            const int64_t n0 = 32 * p;
            const int full_c0 = n0 + 16 <= j->n, full_c1 = n0 + 32 <= j->n;
            for (int64_t s = 0; s < ns; s++) {
                const uint16_t *a = j->abuf + s * KB * 1024;
                const int64_t t0 = (s0 + s) * 32;
                const int full_rows0 = t0 + 16 <= j->m, full_rows1 = t0 + 32 <= j->m;
/* OP(tile, h, q, whole tile inside y) for the block's four accumulators: tile 2h + q holds tokens t0 + 16h..
 * and outputs n0 + 16q.. */
#define EACH_C_TILE(OP)                         \
    do {                                        \
        OP(0, 0, 0, full_rows0 && full_c0);     \
        OP(1, 0, 1, full_rows0 && full_c1);     \
        OP(2, 1, 0, full_rows1 && full_c0);     \
        OP(3, 1, 1, full_rows1 && full_c1);     \
    } while (0)
                if (j->add) {
#define LOAD_C(TILE, H, Q, FULL)                                                                   \
    do {                                                                                           \
        const int64_t tr = t0 + 16 * (H), nc = n0 + 16 * (Q);                                     \
        if (FULL) {                                                                                \
            ACC_LOAD(TILE, y + tr * j->n + nc, ys);                                                \
        } else {                                                                                   \
            memset(ctmp, 0, sizeof ctmp);                                                          \
            edge_copy(j, tr, nc, ctmp, 16, y + tr * j->n + nc, j->n);                              \
            ACC_LOAD(TILE, ctmp, 64);                                                              \
        }                                                                                          \
    } while (0)
                    EACH_C_TILE(LOAD_C);
#undef LOAD_C
                } else if (amx) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                } else {
                    memset(img, 0, sizeof img);
                }
                if (amx)
                    for (int64_t kb = 0; kb < KB; kb++) tile_step_2x2(a + kb * 1024, b + kb * 1024);
                else
                    avx512_steps(img, a, b, KB);
                if (j->glu) { /* C tiles 2h (gate) and 2h + 1 (up): tokens t0 + 16h.., columns 16p.. of y */
                    const int64_t yn = j->n / 2;
                    for (int h = 0; h < 2 && t0 + 16 * h < j->m; h++) {
                        const int64_t tr = t0 + 16 * h, nr = j->m - tr < 16 ? j->m - tr : 16;
                        if (h == 0) {
                            ACC_STORE(0, ctmp, 64);
                            ACC_STORE(1, utmp, 64);
                        } else {
                            ACC_STORE(2, ctmp, 64);
                            ACC_STORE(3, utmp, 64);
                        }
                        float *dst = y + tr * yn + 16 * p;
                        uint16_t *dst16 = (uint16_t *)y + tr * yn + 16 * p;
                        for (int64_t rr = 0; rr < nr; rr++) {
                            const __m512 v = silu_mul512(_mm512_load_ps(ctmp + rr * 16), _mm512_load_ps(utmp + rr * 16));
                            if (j->ybf16) { /* rounded as every later product would round it */
                                _mm256_storeu_si256((__m256i *)(dst16 + rr * yn), (__m256i)_mm512_cvtneps_pbh(v));
                            } else if (j->stream) {
                                _mm512_stream_ps(dst + rr * yn, v);
                            } else {
                                _mm512_storeu_ps(dst + rr * yn, v);
                            }
                        }
                    }
                    continue;
                }
#define STORE_C(TILE, H, Q, FULL)                                                                  \
    do {                                                                                           \
        const int64_t tr = t0 + 16 * (H), nc = n0 + 16 * (Q);                                     \
        if ((FULL) && j->stream) {                                                                 \
            ACC_STORE(TILE, ctmp, 64);                                                             \
            for (int rr = 0; rr < 16; rr++)                                                        \
                _mm512_stream_ps(y + (tr + rr) * j->n + nc, _mm512_load_ps(ctmp + rr * 16));      \
        } else if (FULL) {                                                                         \
            ACC_STORE(TILE, y + tr * j->n + nc, ys);                                               \
        } else if (tr < j->m && nc < j->n) {                                                       \
            ACC_STORE(TILE, ctmp, 64);                                                             \
            edge_copy(j, tr, nc, y + tr * j->n + nc, j->n, ctmp, 16);                              \
        }                                                                                          \
    } while (0)
                EACH_C_TILE(STORE_C);
#undef STORE_C
#undef EACH_C_TILE
            }
        }
    }
    if (configured) {
        _mm_sfence(); /* streaming stores visible before the caller reads y */
        if (amx) _tile_release();
    }
    return NULL;
}
#undef ACC_LOAD
#undef ACC_STORE

static int linear_run(const void *x, int xbf16, int64_t m, int64_t k, const uint16_t *wpacked, int64_t n,
                      void *y, int ybf16, int nthreads, int add, int glu, int engine) {
    if (m <= 0 || n <= 0) return 0;
    const int64_t yn = glu ? n / 2 : n; /* y's columns */
    if (k <= 0) {
        if (!add) memset(y, 0, (size_t)(m * yn) * (ybf16 ? 2 : 4)); /* silu(0) * 0 = 0 */
        return 0;
    }
    if (!(engine = engine_resolve(engine))) return -1;
    const int nt = qk_threads_resolve(nthreads);
    const int64_t KB = cdiv(k, 32), strips = cdiv(m, 32), NP = cdiv(n, 32);
    const int64_t blocks = cdiv(strips, QK_LIN_MS);
    /* few blocks: split the output columns too so every thread has work */
    int64_t nsplit = blocks >= nt ? 1 : (nt + blocks - 1) / blocks;
    if (nsplit > NP) nsplit = NP;
    const int use = (int)(blocks * nsplit < nt ? blocks * nsplit : nt);
    /* Streaming (non-temporal) stores keep a large y from evicting the operands from L2 and skip the
     * read-for-ownership of every output line; they need 64-byte aligned output rows. */
    /* (Not for bf16 y: a tile's 16 bf16 columns are half a cache line, and streaming half lines is slow.) */
    const int stream = !ybf16 && (uintptr_t)y % 64 == 0 && yn % 16 == 0 && (size_t)(m * yn) * 4 >= ((size_t)8 << 20);
    const int64_t ms = strips < QK_LIN_MS ? strips : QK_LIN_MS;
    const size_t abytes = (size_t)(ms * 2 * KB) * TILE_BYTES;
    int slot;
    char *arena = arena_get((size_t)use * abytes, &slot);
    if (!arena) return -2;
    int64_t next_unit = 0;
    linear_job_t jobs[MAX_THREADS];
    for (int i = 0; i < use; i++)
        jobs[i] = (linear_job_t){x, wpacked, y, m, k, n, blocks, nsplit, stream, &next_unit,
                                 (uint16_t *)(arena + (size_t)i * abytes), add, glu, xbf16, ybf16,
                                 engine == QK_BF16_AMX};
    run_threads(use, linear_worker, jobs, sizeof jobs[0]);
    arena_put(arena, slot);
    return 0;
}

int qk_bf16_linear(const float *x, int64_t m, int64_t k, const uint16_t *wpacked, int64_t n, float *y,
                   int nthreads) {
    return linear_run(x, 0, m, k, wpacked, n, y, 0, nthreads, 0, 0, 0);
}

/* The linear's variants, x (m, k) float32 or bf16 bits (xbf16):
 *   mode 0: y (m, n) float32 = bf16(x) · bf16(W)ᵀ;
 *   mode 1: y (m, n) float32 += bf16(x) · bf16(W)ᵀ — each output's float32 accumulator starts from y (a
 *           residual connection's add without a separate pass over a product written out);
 *   mode 2: y (m, n/2) = silu(g)·u with g, u the gate and up columns of bf16(x) · bf16(W)ᵀ, W packed with the
 *           gate's and up's rows interleaved 16 by 16 (rows 32p.. are gate rows 16p.., rows 32p + 16.. up rows
 *           16p..): each output pair's two accumulator tiles are the gate and up of the same 16 columns, and
 *           the MLP's activation is formed from the tiles (silu_avx512.h, the element-wise kernel's
 *           arithmetic) without the (m, n) product being written; n a multiple of 32; y float32, or bf16 bits
 *           (ybf16: rounded as the next product would round it).
 * engine: QK_BF16_AMX, QK_BF16_AVX512 or 0 (the best here). Returns -1 when the engine cannot run here, -3 for
 * a bad mode or n. */
int qk_bf16_linear_ex(const void *x, int xbf16, int64_t m, int64_t k, const uint16_t *wpacked, int64_t n, void *y,
                      int mode, int ybf16, int nthreads, int engine) {
    if (mode < 0 || mode > 2 || (mode == 2 && n % 32) || (ybf16 && mode != 2)) return -3;
    return linear_run(x, xbf16, m, k, wpacked, n, y, ybf16, nthreads, mode == 1, mode == 2, engine);
}

/* ---------------------------------------------------------------------------------------------------- */
/* gram: out (k, k) = bf16(x)ᵀ · bf16(x), upper block triangle computed, mirrored                           */
/*
 * Summation order (fixed by m alone): the tokens are cut into groups of QK_GRAM_GROUP tokens; each group is
 * summed in its own float32 accumulator, one tdpbf16ps per 32 tokens in token order, and the groups' sums
 * are added in group order (((g0 + g1) + g2) + ...). Calibration's 4096-token calls are one group. Threads
 * split the output, never the tokens, so the bytes do not depend on the thread count or the blocking.
 *
 * Blocking. What leaves L2 decides the speed (on the shared machines this runs on, L3/DRAM streams at
 * ~6-14 GB/s per core, a few percent of what the tiles consume), so the accumulators never leave L2 during
 * the token reduction: the upper triangle of 32x32-feature super-blocks (pairs (I, J), I <= J) is cut into
 * macro-blocks of at most QK_GRAM_ACC_PAIRS pairs (4 KB of float32 tiles each): bands of super-blocks give
 * diagonal triangles (band x itself) and off-diagonal rectangles (band x later band); up to 704 features
 * the whole triangle is one block. A thread takes a block, and for each chunk of QK_GRAM_KC token tiles
 * converts the block's features of those tokens from x straight into A tiles (xᵀ, rows' band) and B tiles
 * (token pairs, columns' band), as one contiguous panel of KC steps per super-block; each column's B panel
 * then stays in L1 while the rows' A panels stream from L2, and a pair's four accumulator tiles take 4 * KC
 * tdpbf16ps between a load and a store. The finished block is mirrored into out. x is read once per block
 * a band belongs to: once in all up to 704 features, about three times at 1536.
 *
 * Threads take whole blocks; with several threads and several token groups they take (block, group) units
 * instead (each group's sums in their own accumulators, added in group order at the end), so a small
 * Gram need not be cut into more blocks, each reading x again, to give every thread work.
 */
#ifndef QK_GRAM_KC
#define QK_GRAM_KC 8
#endif
#ifndef QK_GRAM_ACC_PAIRS
#define QK_GRAM_ACC_PAIRS 256 /* 1 MB of accumulators per macro-block */
#endif
#define QK_GRAM_GROUP 8192 /* tokens per summation group (a multiple of 32 * QK_GRAM_KC) */
#define QK_GRAM_SPLIT_BYTES ((size_t)48 << 20)

typedef struct {
    int64_t i0, i1, j0, j1; /* super-row and super-column ranges (pairs I <= J of them) */
    int64_t pairs, off;     /* its pairs, and the pairs of the blocks before it */
} gram_block_t;

typedef struct {
    const float *x;
    float *out;
    int64_t m, k;
    int xbf16;           /* x holds bf16 bits (running-sum mode) */
    const gram_block_t *blocks;
    int64_t nblocks;
    int64_t *next_block; /* shared work counter */
    int stream;          /* out is large with 64-byte aligned rows: write it around the caches */
    uint16_t *abuf, *bbuf; /* this thread's chunk panels: super-block s of a band at s * 2 * KC KB */
    float *acc, *tot;      /* this thread's block accumulators (pair after pair, J-major); tot: groups' sum */
    float *gaccs;          /* split mode: one accumulator per (group, block), group g of block b at
                            * (g * total_pairs + b.off) * 4 KB; NULL otherwise */
    int64_t total_pairs;
    float *run;            /* running-sum mode: the accumulators of every block, kept between calls */
    int first;             /* running-sum mode: start the sums from zero */
    int amx;               /* the engine: AMX tiles, else AVX512_BF16 on the accumulators in memory */
} gram_job_t;

/* 32 tokens from t0 (zeros past m) x 16 features from f0 (zeros past k) -> their B tile (token pairs) */
static inline void gram_load(const gram_job_t *j, int64_t t0, int64_t f0, __m512i r[16]) {
    const __m512i perm = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                          23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __mmask16 fm = mask_upto(j->k - f0);
    const int64_t esize = j->xbf16 ? 2 : 4;
    if (f0 < j->k) /* the next token tile's line of each row: 32 row streams are more than the hardware
                    * prefetchers follow */
        for (int q = 0; q < 32 && t0 + 32 + q < j->m; q++)
            _mm_prefetch((const char *)j->x + ((t0 + 32 + q) * j->k + f0) * esize, _MM_HINT_T0);
    if (j->xbf16) {
        const uint16_t *x16 = (const uint16_t *)j->x;
        for (int q = 0; q < 16; q++) {
            const int64_t ta = t0 + 2 * q, tn = ta + 1;
            const __m256i lo = ta < j->m ? _mm256_maskz_loadu_epi16(fm, x16 + ta * j->k + f0) : _mm256_setzero_si256();
            const __m256i hi = tn < j->m ? _mm256_maskz_loadu_epi16(fm, x16 + tn * j->k + f0) : _mm256_setzero_si256();
            r[q] = _mm512_permutexvar_epi16(perm, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        }
        return;
    }
    for (int q = 0; q < 16; q++) {
        const int64_t ta = t0 + 2 * q, tn = ta + 1;
        const __m512 lo = ta < j->m ? _mm512_maskz_loadu_ps(fm, j->x + ta * j->k + f0) : _mm512_setzero_ps();
        const __m512 hi = tn < j->m ? _mm512_maskz_loadu_ps(fm, j->x + tn * j->k + f0) : _mm512_setzero_ps();
        /* words 0..15 token ta, 16..31 token ta+1 -> interleave to pairs per feature */
        r[q] = _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* Tokens [c0, c0 + 32 nst) -> the block's panels. AMX: A tiles of the rows' band (and their B tiles when the
 * block is diagonal, the columns being the same features), B tiles of the columns' band otherwise.
 * AVX512_BF16 reads A's pairs from B tiles (avx512_steps_bt): the rows' band as B tiles into abuf, the
 * columns' band into bbuf, and a diagonal block's one band into bbuf only. */
static void gram_convert(const gram_job_t *j, const gram_block_t *b, int64_t c0, int64_t nst) {
    const int diag = b->i0 == b->j0;
    __m512i r[16];
    for (int64_t t = 0; t < nst; t++) {
        const int64_t t0 = c0 + 32 * t;
        for (int64_t fb = 2 * b->i0; fb < 2 * b->i1; fb++) {
            const int64_t off = ((fb / 2 - b->i0) * QK_GRAM_KC + t) * 1024 + (fb % 2) * 512;
            gram_load(j, t0, fb * 16, r);
            if (!j->amx) {
                uint16_t *dst = (diag ? j->bbuf : j->abuf) + off;
                for (int q = 0; q < 16; q++) _mm512_store_si512(dst + q * 32, r[q]);
                continue;
            }
            if (diag)
                for (int q = 0; q < 16; q++) _mm512_store_si512(j->bbuf + off + q * 32, r[q]);
            transpose16((__m512 *)r);
            for (int q = 0; q < 16; q++) _mm512_store_si512(j->abuf + off + q * 32, r[q]);
        }
        if (diag) continue;
        for (int64_t fb = 2 * b->j0; fb < 2 * b->j1; fb++) {
            const int64_t off = ((fb / 2 - b->j0) * QK_GRAM_KC + t) * 1024 + (fb % 2) * 512;
            gram_load(j, t0, fb * 16, r);
            for (int q = 0; q < 16; q++) _mm512_store_si512(j->bbuf + off + q * 32, r[q]);
        }
    }
}

/* acc (4 tiles: c00 c01 c10 c11) += A panel · B panel over nst tile steps (from zero if `zero`). */
static inline void gram_pair(float *acc, const uint16_t *a, const uint16_t *b, int64_t nst, int zero, int amx) {
    if (!amx) {
        if (zero) memset(acc, 0, 4 * TILE_BYTES);
        avx512_steps_bt(acc, a, b, nst);
        return;
    }
    if (zero) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        _tile_loadd(0, acc, 64);
        _tile_loadd(1, acc + 256, 64);
        _tile_loadd(2, acc + 512, 64);
        _tile_loadd(3, acc + 768, 64);
    }
    for (int64_t t = 0; t < nst; t++) tile_step_2x2(a + t * 1024, b + t * 1024);
    _tile_stored(0, acc, 64);
    _tile_stored(1, acc + 256, 64);
    _tile_stored(2, acc + 512, 64);
    _tile_stored(3, acc + 768, 64);
}

/* One chunk of the block: every pair, column by column (the column's B panel stays in L1). */
static void gram_chunk(const gram_job_t *j, const gram_block_t *b, float *acc, int64_t nst, int zero) {
    const uint16_t *apan = !j->amx && b->i0 == b->j0 ? j->bbuf : j->abuf; /* gram_convert: where A's pairs are */
    for (int64_t J = b->j0; J < b->j1; J++) {
        const uint16_t *bp = j->bbuf + (J - b->j0) * QK_GRAM_KC * 1024;
        const int64_t iend = J + 1 < b->i1 ? J + 1 : b->i1;
        for (int64_t I = b->i0; I < iend; I++, acc += 1024)
            gram_pair(acc, apan + (I - b->i0) * QK_GRAM_KC * 1024, bp, nst, zero, j->amx);
    }
}

/* The block's sums over tokens [t0, t1) added into acc, chunk by chunk (from zero if `zero`). */
static void gram_tokens(const gram_job_t *j, const gram_block_t *b, float *acc, int64_t t0, int64_t t1, int zero) {
    for (int64_t c0 = t0; c0 < t1; c0 += 32 * QK_GRAM_KC) {
        const int64_t nst = cdiv(t1 - c0, 32) < QK_GRAM_KC ? cdiv(t1 - c0, 32) : QK_GRAM_KC;
        gram_convert(j, b, c0, nst);
        gram_chunk(j, b, acc, nst, zero && c0 == t0);
    }
}

static inline void gram_store_row(const gram_job_t *j, float *dst, __mmask16 mask, __m512i v) {
    if (j->stream && mask == 0xffff) _mm512_stream_si512((__m512i *)dst, v);
    else _mm512_mask_storeu_epi32(dst, mask, v);
}

/* The block's sums -> out: the element-wise upper triangle (i <= j) and its mirror, so out is exactly
 * symmetric. */
static void gram_write(const gram_job_t *j, const gram_block_t *b, const float *acc) {
    const int64_t k = j->k;
    for (int64_t J = b->j0; J < b->j1; J++) {
        const int64_t iend = J + 1 < b->i1 ? J + 1 : b->i1;
        for (int64_t I = b->i0; I < iend; I++, acc += 1024) {
            for (int h = 0; h < 4; h++) {
                const int64_t ti = 2 * I + h / 2, tj = 2 * J + h % 2, i0 = ti * 16, j0 = tj * 16;
                if (ti > tj || i0 >= k || j0 >= k) continue;
                const int64_t nr = k - i0 < 16 ? k - i0 : 16, nc = k - j0 < 16 ? k - j0 : 16;
                const __mmask16 mr = mask_upto(nr), mc = mask_upto(nc);
                __m512i r[16], t[16];
                for (int q = 0; q < 16; q++) r[q] = t[q] = _mm512_load_si512(acc + h * 256 + q * 16);
                transpose16((__m512 *)t); /* t[q][c] = tile (c, q) */
                if (ti < tj) {
                    for (int q = 0; q < nr; q++) gram_store_row(j, j->out + (i0 + q) * k + j0, mc, r[q]);
                    for (int q = 0; q < nc; q++) gram_store_row(j, j->out + (j0 + q) * k + i0, mr, t[q]);
                } else { /* diagonal tile: row q keeps its columns >= q and mirrors the rest */
                    for (int q = 0; q < nr; q++) {
                        const __m512i v = _mm512_mask_blend_epi32((__mmask16)(0xffffu << q), t[q], r[q]);
                        gram_store_row(j, j->out + (i0 + q) * k + i0, mc, v);
                    }
                }
            }
        }
    }
}

/* Work units are blocks, or in split mode (block, group) pairs whose sums the caller adds in group order. */
static void *gram_worker(void *arg) {
    const gram_job_t *j = (const gram_job_t *)arg;
    const int64_t G = cdiv(j->m, QK_GRAM_GROUP);
    const int64_t units = j->gaccs ? j->nblocks * G : j->nblocks;
    int configured = 0;
    for (;;) {
        const int64_t u = __atomic_fetch_add(j->next_block, 1, __ATOMIC_RELAXED);
        if (u >= units) break;
        if (!configured) {
            if (j->amx) tile_config();
            configured = 1;
        }
        if (j->gaccs) {
            const gram_block_t *b = &j->blocks[u / G];
            const int64_t g = u % G, g0 = g * QK_GRAM_GROUP, g1 = g0 + QK_GRAM_GROUP < j->m ? g0 + QK_GRAM_GROUP : j->m;
            gram_tokens(j, b, j->gaccs + (g * j->total_pairs + b->off) * 1024, g0, g1, 1);
            continue;
        }
        const gram_block_t *b = &j->blocks[u];
        float *acc = j->acc, *tot = j->tot;
        for (int64_t g = 0; g < G; g++) {
            const int64_t g0 = g * QK_GRAM_GROUP, g1 = g0 + QK_GRAM_GROUP < j->m ? g0 + QK_GRAM_GROUP : j->m;
            gram_tokens(j, b, acc, g0, g1, 1);
            if (G > 1 && g == 0) { /* the first group's sums are the running total */
                float *s = tot;
                tot = acc;
                acc = s;
            } else if (G > 1) {
                for (int64_t e = 0; e < b->pairs * 1024; e += 16)
                    _mm512_store_ps(tot + e, _mm512_add_ps(_mm512_load_ps(tot + e), _mm512_load_ps(acc + e)));
            }
        }
        gram_write(j, b, G > 1 ? tot : acc);
    }
    if (configured) {
        if (j->stream) _mm_sfence();
        if (j->amx) _tile_release();
    }
    return NULL;
}

/* The macro-blocks of SB super-blocks, the off-diagonal rectangles (the larger) first so that dynamic
 * scheduling ends with the small diagonal triangles; returns
 * their number, writing them to `blocks` when not NULL. */
static int64_t gram_blocks(int64_t SB, int nt, gram_block_t *blocks) {
    int64_t tri = 1, side = 1;
    while ((tri + 1) * (tri + 2) / 2 <= QK_GRAM_ACC_PAIRS) tri++;
    while ((side + 1) * (side + 1) <= QK_GRAM_ACC_PAIRS) side++;
    int64_t nb = SB <= tri ? 1 : cdiv(SB, side);
    if (nt > 1 && nb < 2 && SB >= 2) nb = 2; /* something for a second thread */
    int64_t n = 0;
    for (int diag = 0; diag < 2; diag++) {
        for (int64_t bj = 0; bj < nb; bj++) {
            for (int64_t bi = 0; bi <= bj; bi++) {
                if ((bi == bj) != diag) continue;
                const int64_t i0 = SB * bi / nb, i1 = SB * (bi + 1) / nb, j0 = SB * bj / nb, j1 = SB * (bj + 1) / nb;
                if (blocks)
                    blocks[n] = (gram_block_t){i0, i1, j0, j1,
                                               diag ? (i1 - i0) * (i1 - i0 + 1) / 2 : (i1 - i0) * (j1 - j0),
                                               n ? blocks[n - 1].off + blocks[n - 1].pairs : 0};
                n++;
            }
        }
    }
    return n;
}

int qk_bf16_gram(const float *x, int64_t m, int64_t k, float *out, int nthreads, int engine) {
    if (k <= 0) return 0;
    if (m <= 0) {
        memset(out, 0, (size_t)(k * k) * sizeof(float));
        return 0;
    }
    if (!(engine = engine_resolve(engine))) return -1;
    const int64_t SB = cdiv(k, 32), G = cdiv(m, QK_GRAM_GROUP);
    int nt = qk_threads_resolve(nthreads);
    /* Split mode (several threads, several groups): threads take (block, group) units, each group summed in
     * its own accumulator, so the blocks need not be cut finer for the threads (which would read x more
     * often); the caller adds the groups in order. Only while all those accumulators fit QK_GRAM_SPLIT_BYTES. */
    const size_t tri_bytes = (size_t)(SB * (SB + 1) / 2) * 4 * TILE_BYTES;
    const int split = nt > 1 && G > 1 && (size_t)G * tri_bytes <= QK_GRAM_SPLIT_BYTES;
    const int64_t nblocks = gram_blocks(SB, split ? 1 : nt, NULL);
    gram_block_t *blocks = malloc((size_t)nblocks * sizeof *blocks);
    if (!blocks) return -2;
    gram_blocks(SB, split ? 1 : nt, blocks);
    if (nt > (split ? nblocks * G : nblocks)) nt = (int)(split ? nblocks * G : nblocks);
    int64_t pairs = 0, band = 0;
    for (int64_t i = 0; i < nblocks; i++) {
        if (blocks[i].pairs > pairs) pairs = blocks[i].pairs;
        if (blocks[i].i1 - blocks[i].i0 > band) band = blocks[i].i1 - blocks[i].i0;
        if (blocks[i].j1 - blocks[i].j0 > band) band = blocks[i].j1 - blocks[i].j0;
    }
    const size_t panel_bytes = (size_t)(band * 2 * QK_GRAM_KC) * TILE_BYTES;
    const size_t acc_bytes = (size_t)pairs * 4 * TILE_BYTES;
    const int groups = m > QK_GRAM_GROUP;
    const size_t per_thread = 2 * panel_bytes + (split ? 0 : (groups ? 2 : 1) * acc_bytes);
    const size_t gacc_bytes = split ? (size_t)G * tri_bytes : 0;
    int slot;
    char *arena = arena_get((size_t)nt * per_thread + gacc_bytes, &slot);
    if (!arena) {
        free(blocks);
        return -2;
    }
    /* Streaming stores keep a large out from evicting the accumulators and operands from L2 and skip the
     * read-for-ownership of every line; they need 64-byte aligned rows. */
    const int stream = (uintptr_t)out % 64 == 0 && k % 16 == 0 && (size_t)(k * k) * 4 >= ((size_t)4 << 20);
    int64_t next_block = 0;
    gram_job_t jobs[MAX_THREADS];
    for (int i = 0; i < nt; i++) {
        char *p = arena + (size_t)i * per_thread;
        jobs[i] = (gram_job_t){x, out, m, k, 0, blocks, nblocks, &next_block, stream,
                               (uint16_t *)p, (uint16_t *)(p + panel_bytes),
                               split ? NULL : (float *)(p + 2 * panel_bytes),
                               split || !groups ? NULL : (float *)(p + 2 * panel_bytes + acc_bytes),
                               split ? (float *)(arena + (size_t)nt * per_thread) : NULL,
                               (int64_t)(tri_bytes / (4 * TILE_BYTES)), NULL, 0, engine == QK_BF16_AMX};
    }
    run_threads(nt, gram_worker, jobs, sizeof jobs[0]);
    if (split) { /* the groups' sums of each block added in group order, then mirrored into out */
        const int64_t tp = jobs[0].total_pairs;
        for (int64_t bi = 0; bi < nblocks; bi++) {
            float *tot = jobs[0].gaccs + blocks[bi].off * 1024;
            for (int64_t g = 1; g < G; g++) {
                const float *acc = jobs[0].gaccs + (g * tp + blocks[bi].off) * 1024;
                for (int64_t e = 0; e < blocks[bi].pairs * 1024; e += 16)
                    _mm512_store_ps(tot + e, _mm512_add_ps(_mm512_load_ps(tot + e), _mm512_load_ps(acc + e)));
            }
            gram_write(&jobs[0], &blocks[bi], tot);
        }
        if (stream) _mm_sfence();
    }
    arena_put(arena, slot);
    free(blocks);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* running gram: acc += bf16(x)ᵀ · bf16(x) over many calls, then out = acc once                             */
/*
 * Calibration sums a Gram over 16 batches per input group; one (k, k) result per batch, mirrored, streamed
 * out and re-added by the caller costs about as much memory traffic as the products' operands. Here the
 * float32 tile accumulators of every macro-block stay in `acc` (qk_bf16_gram_acc_floats(k) floats, the
 * caller's) between calls: a call loads a block's accumulators, adds its tokens, stores them back, and
 * qk_bf16_gram_acc_write mirrors the final sums into out once. Summation order: every token in call order,
 * 32 at a time, into one float32 accumulator per element; the block layout is that of one thread
 * (gram_blocks(SB, 1)), so the bytes do not depend on nthreads.
 */
static void *gram_run_worker(void *arg) {
    const gram_job_t *j = (const gram_job_t *)arg;
    int configured = 0;
    for (;;) {
        const int64_t u = __atomic_fetch_add(j->next_block, 1, __ATOMIC_RELAXED);
        if (u >= j->nblocks) break;
        if (!configured) {
            if (j->amx) tile_config();
            configured = 1;
        }
        gram_tokens(j, &j->blocks[u], j->run + j->blocks[u].off * 1024, 0, j->m, j->first);
    }
    if (configured && j->amx) _tile_release();
    return NULL;
}

static gram_block_t *gram_run_blocks(int64_t k, int64_t *nblocks) {
    const int64_t SB = cdiv(k, 32);
    *nblocks = gram_blocks(SB, 1, NULL);
    gram_block_t *blocks = malloc((size_t)*nblocks * sizeof *blocks);
    if (blocks) gram_blocks(SB, 1, blocks);
    return blocks;
}

size_t qk_bf16_gram_acc_floats(int64_t k) {
    const int64_t SB = cdiv(k, 32);
    return k <= 0 ? 0 : (size_t)(SB * (SB + 1) / 2) * 1024;
}

int qk_bf16_gram_acc(const void *x, int xbf16, int64_t m, int64_t k, float *acc, int first, int nthreads, int engine) {
    if (k <= 0) return 0;
    if (m <= 0) {
        if (first) memset(acc, 0, qk_bf16_gram_acc_floats(k) * sizeof(float));
        return 0;
    }
    if (!(engine = engine_resolve(engine))) return -1;
    int64_t nblocks;
    gram_block_t *blocks = gram_run_blocks(k, &nblocks);
    if (!blocks) return -2;
    int nt = qk_threads_resolve(nthreads);
    if (nt > nblocks) nt = (int)nblocks;
    int64_t band = 0;
    for (int64_t i = 0; i < nblocks; i++) {
        if (blocks[i].i1 - blocks[i].i0 > band) band = blocks[i].i1 - blocks[i].i0;
        if (blocks[i].j1 - blocks[i].j0 > band) band = blocks[i].j1 - blocks[i].j0;
    }
    const size_t panel_bytes = (size_t)(band * 2 * QK_GRAM_KC) * TILE_BYTES;
    int slot;
    char *arena = arena_get((size_t)nt * 2 * panel_bytes, &slot);
    if (!arena) {
        free(blocks);
        return -2;
    }
    int64_t next_block = 0;
    gram_job_t jobs[MAX_THREADS];
    for (int i = 0; i < nt; i++) {
        char *p = arena + (size_t)i * 2 * panel_bytes;
        jobs[i] = (gram_job_t){.x = x, .m = m, .k = k, .xbf16 = xbf16, .blocks = blocks, .nblocks = nblocks,
                               .next_block = &next_block, .abuf = (uint16_t *)p,
                               .bbuf = (uint16_t *)(p + panel_bytes), .run = acc, .first = first,
                               .amx = engine == QK_BF16_AMX};
    }
    run_threads(nt, gram_run_worker, jobs, sizeof jobs[0]);
    arena_put(arena, slot);
    free(blocks);
    return 0;
}

int qk_bf16_gram_acc_write(const float *acc, int64_t k, float *out) {
    if (k <= 0) return 0;
    int64_t nblocks;
    gram_block_t *blocks = gram_run_blocks(k, &nblocks);
    if (!blocks) return -2;
    const gram_job_t j = {.out = out, .k = k,
                          .stream = (uintptr_t)out % 64 == 0 && k % 16 == 0 && (size_t)(k * k) * 4 >= ((size_t)4 << 20)};
    for (int64_t i = 0; i < nblocks; i++) gram_write(&j, &blocks[i], acc + blocks[i].off * 1024);
    if (j.stream) _mm_sfence();
    free(blocks);
    return 0;
}
