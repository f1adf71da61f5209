/* gemm_avx512.c — batched products (gemm_panel.h) on AVX-512 VNNI: 16-row strips, one int32 lane per row of a zmm
 * vector, tiles of 8 activation rows; each vpdpbusd takes its activation word broadcast from memory and adds four
 * codes' products per lane. Besides the plain ggml blocks, the X8 repacks the avx512 path keeps at load (Q4_0X8,
 * Q8_0X8, Q5_0X8) are panel sources: two 8-row groups become one strip after a 128-bit lane shuffle, and their blocks
 * combine in the per-row X8 kernels' order (the same bits). One thread, 3072 x 576 weights x 128 rows: about
 * 1.4 ms (160 G multiply-adds/s, near one vpdpbusd per cycle) for Q4_0X8, Q8_0X8 and Q5_0. */
#include <immintrin.h>

#include "../common.h"

#define GT 8     /* activation rows per tile */
#define STRIP 16 /* weight rows per panel: one int32 lane of a zmm each */

/* codes: 16 rows x 32 bytes, row-major -> the block's 8 vectors, lane r of vector g = row r's bytes 4g..4g+3. Rows
 * are loaded in pairs; quads of rows are gathered per word group (permutex2var), then the 128-bit lanes of four
 * quads transposed. */
static inline void panel_transpose(const uint8_t *codes, uint8_t *dst) {
    __m512i *out = (__m512i *)dst;
    __m512i A[4], B[4];
    const __m512i ia = _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
    const __m512i ib = _mm512_add_epi32(ia, _mm512_set1_epi32(4));
    for (int qd = 0; qd < 4; qd++) {
        const __m512i z0 = _mm512_load_si512((const void *)(codes + 128 * qd));
        const __m512i z1 = _mm512_load_si512((const void *)(codes + 128 * qd + 64));
        A[qd] = _mm512_permutex2var_epi32(z0, ia, z1); /* words 0-3 of rows 4qd..4qd+3, word-major */
        B[qd] = _mm512_permutex2var_epi32(z0, ib, z1); /* words 4-7 */
    }
    for (int half = 0; half < 2; half++) {
        const __m512i *X = half ? B : A;
        const __m512i t0 = _mm512_shuffle_i32x4(X[0], X[1], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i t1 = _mm512_shuffle_i32x4(X[2], X[3], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i t2 = _mm512_shuffle_i32x4(X[0], X[1], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i t3 = _mm512_shuffle_i32x4(X[2], X[3], _MM_SHUFFLE(3, 2, 3, 2));
        out[4 * half + 0] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
        out[4 * half + 1] = _mm512_shuffle_i32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1));
        out[4 * half + 2] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(2, 0, 2, 0));
        out[4 * half + 3] = _mm512_shuffle_i32x4(t2, t3, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

#include "gemm_panel.h"

/* ---- panel from the X8 repacks ---------------------------------------------------------------------------- */

/* [a's 256-bit half h, b's half h] */
static inline __m512i halves(__m512i a, __m512i b, int h) {
    return h ? _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 2, 3, 2)) : _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(1, 0, 1, 0));
}

/* 16 fp16 scales: 8 at a, 8 at b (NULL: zeros). */
static inline __m512 scales16(const uint8_t *a, const uint8_t *b) {
    const __m128i lo = _mm_loadu_si128((const __m128i *)a);
    const __m128i hi = b ? _mm_loadu_si128((const __m128i *)b) : _mm_setzero_si128();
    return _mm512_cvtph_ps(_mm256_set_m128i(hi, lo));
}

/* 16 added to the bytes of v whose bit is set in the u64 at `masks` (a Q5_0X8 block's bit-4 mask; NULL: none). */
static inline __m512i add_bit4(__m512i v, const uint8_t *masks) {
    if (!masks) return v;
    __mmask64 hi;
    memcpy(&hi, masks, 8);
    return _mm512_mask_add_epi8(v, hi, v, _mm512_set1_epi8(16));
}

/* Rows n .. n+15 (n a multiple of 8) of a Q4_0X8, Q8_0X8 or Q5_0X8 (`bb` bytes per group and block) matrix;
 * the second group may lie past the end. */
static inline __attribute__((always_inline)) void fill_x8(const qk_job *j, int n, size_t bb, panel *p) {
    const int nb = p->nb, ngroups = (j->N + 7) / 8, grp = n / 8, five = bb == Q5_0X8_BYTES;
    const uint8_t *A = j->w + (size_t)grp * nb * bb;
    const uint8_t *B = grp + 1 < ngroups ? A + (size_t)nb * bb : NULL;
    const __m512i m4 = _mm512_set1_epi8(0x0f), bias = _mm512_set1_epi8((char)0x80);
    for (int b = 0; b < nb; b++, A += bb, B = B ? B + bb : NULL) {
        __m512i *out = (__m512i *)(p->q + (size_t)b * 8 * 64);
        _mm512_store_ps(p->scale + (size_t)b * STRIP, scales16(A, B));
        if (bb == Q8_0X8_BYTES) {
            for (int c = 0; c < 4; c++) {
                const __m512i va = _mm512_xor_si512(_mm512_loadu_si512((const void *)(A + 16 + 64 * c)), bias);
                const __m512i vb = B ? _mm512_xor_si512(_mm512_loadu_si512((const void *)(B + 16 + 64 * c)), bias) : bias;
                out[2 * c] = halves(va, vb, 0);
                out[2 * c + 1] = halves(va, vb, 1);
            }
        } else {
            for (int c = 0; c < 2; c++) {
                const uint8_t *ma = five ? A + Q4_0X8_BYTES + 16 * c : NULL, *mb = five && B ? B + Q4_0X8_BYTES + 16 * c : NULL;
                const __m512i va = _mm512_loadu_si512((const void *)(A + 16 + 64 * c));
                const __m512i vb = B ? _mm512_loadu_si512((const void *)(B + 16 + 64 * c)) : _mm512_setzero_si512();
                const __m512i la = add_bit4(_mm512_and_si512(va, m4), ma), lb = add_bit4(_mm512_and_si512(vb, m4), mb);
                const __m512i ha = add_bit4(_mm512_and_si512(_mm512_srli_epi16(va, 4), m4), ma ? ma + 8 : NULL);
                const __m512i hb = add_bit4(_mm512_and_si512(_mm512_srli_epi16(vb, 4), m4), mb ? mb + 8 : NULL);
                out[2 * c] = halves(la, lb, 0);
                out[2 * c + 1] = halves(la, lb, 1);
                out[2 * c + 4] = halves(ha, hb, 0);
                out[2 * c + 5] = halves(ha, hb, 1);
            }
        }
    }
}

static void fill_q4_0x8(const qk_job *j, int n, int rows, size_t stride, panel *p) {
    fill_x8(j, n, Q4_0X8_BYTES, p);
}

static void fill_q8_0x8(const qk_job *j, int n, int rows, size_t stride, panel *p) {
    fill_x8(j, n, Q8_0X8_BYTES, p);
}

static void fill_q5_0x8(const qk_job *j, int n, int rows, size_t stride, panel *p) {
    fill_x8(j, n, Q5_0X8_BYTES, p);
}

/* ---- the tile: GT (or fewer) activation rows against one panel --------------------------------------------- */

static inline __attribute__((always_inline)) void tile(const qk_job *j, const panel *p, const act_prep *ap, int m0,
                                                       int n, int rows, const int T, const int sub, const int has_min) {
    const int nb = p->nb, M = j->M;
    const int8_t *a[GT];
    __m512 acc[GT];
    for (int t = 0; t < T; t++) {
        a[t] = j->qs + (size_t)(m0 + t) * j->K;
        acc[t] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const __m512i *q = (const __m512i *)(p->q + (size_t)b * 8 * 64);
        const float *da = ap->da + (size_t)b * M + m0;
        for (int s = 0; s < sub; s++) {
            const int32_t *corr = ap->corr + ((size_t)b * sub + s) * M + m0;
            __m512i is[GT];
            for (int t = 0; t < T; t++) is[t] = _mm512_set1_epi32(corr[t]);
            for (int g = s * (8 / sub); g < (s + 1) * (8 / sub); g++) {
                const __m512i w = _mm512_load_si512((const void *)(q + g));
                for (int t = 0; t < T; t++) {
                    int32_t word;
                    memcpy(&word, a[t] + (size_t)b * QK8 + 4 * g, 4);
                    is[t] = _mm512_dpbusd_epi32(is[t], w, _mm512_set1_epi32(word));
                }
            }
            const __m512 sc = _mm512_load_ps(p->scale + ((size_t)b * sub + s) * STRIP);
            for (int t = 0; t < T; t++)
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]), _mm512_mul_ps(sc, _mm512_set1_ps(da[t])), acc[t]);
        }
        if (has_min) {
            const __m512 mn = _mm512_load_ps(p->min + (size_t)b * STRIP);
            const float *dasa = ap->dasa + (size_t)b * M + m0;
            for (int t = 0; t < T; t++) acc[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(dasa[t]), acc[t]);
        }
    }
    const __mmask16 keep = (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(j->y + (size_t)(m0 + t) * j->N + n, keep, acc[t]);
}

/* tile() with its shape fixed at compile time, so the token and word loops unroll into registers: one function
 * per (T, sub, min) in use. */
#define TILE(T, SUB, MIN)                                                                                       \
    static void tile_##T##_##SUB##_##MIN(const qk_job *j, const panel *p, const act_prep *ap, int m0, int n,    \
                                         int rows) {                                                           \
        tile(j, p, ap, m0, n, rows, T, SUB, MIN);                                                               \
    }
#define TILES(SUB, MIN)                                                                                         \
    TILE(1, SUB, MIN) TILE(2, SUB, MIN) TILE(3, SUB, MIN) TILE(4, SUB, MIN) TILE(5, SUB, MIN) TILE(6, SUB, MIN) \
    TILE(7, SUB, MIN) TILE(8, SUB, MIN)                                                                         \
    static const tile_fn tiles_##SUB##_##MIN[GT + 1] = {NULL,                 tile_1_##SUB##_##MIN,             \
                                                         tile_2_##SUB##_##MIN, tile_3_##SUB##_##MIN,             \
                                                         tile_4_##SUB##_##MIN, tile_5_##SUB##_##MIN,             \
                                                         tile_6_##SUB##_##MIN, tile_7_##SUB##_##MIN,             \
                                                         tile_8_##SUB##_##MIN};
TILES(1, 0)
TILES(1, 1)
TILES(2, 0)

#define TILES_FOR(SUB, MIN, Q8) ((SUB) == 2 ? tiles_2_0 : (MIN) ? tiles_1_1 : tiles_1_0)
GEMM_PLAIN_ALL

static void gemm_q4_0x8(const qk_job *j, int n0, int n1) {
    gemm_strips(j, n0, n1, 1, 8, 0, tiles_1_0, fill_q4_0x8, 0);
}

static void gemm_q8_0x8(const qk_job *j, int n0, int n1) {
    gemm_strips(j, n0, n1, 1, 128, 0, tiles_1_0, fill_q8_0x8, 0);
}

static void gemm_q5_0x8(const qk_job *j, int n0, int n1) {
    gemm_strips(j, n0, n1, 1, 16, 0, tiles_1_0, fill_q5_0x8, 0);
}

void qk_fill_gemm_avx512(qk_kernels *k) {
    const qk_kernels mine = {{GEMM_PLAIN_TABLE, [QK_L_Q4_0X8] = gemm_q4_0x8, [QK_L_Q8_0X8] = gemm_q8_0x8,
                               [QK_L_Q5_0X8] = gemm_q5_0x8}};
    qk_kernels_over(k, &mine);
}
