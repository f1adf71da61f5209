/* gemm_avx2.c — batched products (gemm_panel.h) on AVX2: 8-row strips, one int32 lane per row of a ymm vector,
 * tiles of 4 activation rows (16 ymm registers). Without VNNI, four codes' products per lane take
 * vpmaddubsw (u8 x s8 -> pairs in int16) and vpmaddwd (pairs -> int32): exact for codes up to 63 (Q6_K's, at most
 * 2 * 63 * 127 per pair). Q8_0's codes use all 8 bits, so its tile multiplies |w| by sign(a, w) instead
 * (llama.cpp's AVX2 trick; at most 2 * 128 * 127, and exact since activations never hold -128). */
#include <immintrin.h>

#include "../common.h"

#define GT 4    /* activation rows per tile */
#define STRIP 8 /* weight rows per panel: one int32 lane of a ymm each */

/* codes: 8 rows x 32 bytes, row-major -> the block's 8 vectors, lane r of vector g = row r's bytes 4g..4g+3: an
 * 8 x 8 transpose of 32-bit words (interleave words, then pairs, then 128-bit lanes). */
static inline void panel_transpose(const uint8_t *codes, uint8_t *dst) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_load_si256((const __m256i *)(codes + 32 * i));
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);     /* words 0 | 4 of rows i..i+3 */
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]); /* 1 | 5 */
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]); /* 2 | 6 */
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]); /* 3 | 7 */
    }
    __m256i *out = (__m256i *)dst;
    for (int g = 0; g < 4; g++) {
        out[g] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x20);
        out[g + 4] = _mm256_permute2x128_si256(u[g], u[g + 4], 0x31);
    }
}

#include "gemm_panel.h"

static inline __attribute__((always_inline)) void tile(const qk_job *j, const panel *p, const act_prep *ap, int m0,
                                                       int n, int rows, const int T, const int sub, const int has_min,
                                                       const int q8) {
    const int nb = p->nb, M = j->M;
    const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
    const int8_t *a[GT];
    __m256 acc[GT];
    for (int t = 0; t < T; t++) {
        a[t] = j->qs + (size_t)(m0 + t) * j->K;
        acc[t] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const __m256i *q = (const __m256i *)(p->q + (size_t)b * 8 * 32);
        const float *da = ap->da + (size_t)b * M + m0;
        for (int s = 0; s < sub; s++) {
            const int32_t *corr = ap->corr + ((size_t)b * sub + s) * M + m0;
            __m256i is[GT];
            for (int t = 0; t < T; t++) is[t] = q8 ? _mm256_setzero_si256() : _mm256_set1_epi32(corr[t]);
            for (int g = s * (8 / sub); g < (s + 1) * (8 / sub); g++) {
                const __m256i w = _mm256_load_si256(q + g);
                const __m256i ws = _mm256_xor_si256(w, bias); /* q8: the signed code (the panel holds w ^ 0x80) */
                const __m256i aw = _mm256_abs_epi8(ws);
                for (int t = 0; t < T; t++) {
                    int32_t word;
                    memcpy(&word, a[t] + (size_t)b * QK8 + 4 * g, 4);
                    const __m256i av = _mm256_set1_epi32(word);
                    const __m256i p16 = q8 ? _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, ws)) : _mm256_maddubs_epi16(w, av);
                    is[t] = _mm256_add_epi32(is[t], _mm256_madd_epi16(p16, ones));
                }
            }
            const __m256 sc = _mm256_load_ps(p->scale + ((size_t)b * sub + s) * STRIP);
            for (int t = 0; t < T; t++)
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(sc, _mm256_set1_ps(da[t])), acc[t]);
        }
        if (has_min) {
            const __m256 mn = _mm256_load_ps(p->min + (size_t)b * STRIP);
            const float *dasa = ap->dasa + (size_t)b * M + m0;
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(dasa[t]), acc[t]);
        }
    }
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int t = 0; t < T; t++) _mm256_maskstore_ps(j->y + (size_t)(m0 + t) * j->N + n, keep, acc[t]);
}

/* tile() with its shape fixed at compile time: one function per (T, sub, min, q8) in use. */
#define TILE(T, SUB, MIN, Q8)                                                                                   \
    static void tile_##T##_##SUB##_##MIN##_##Q8(const qk_job *j, const panel *p, const act_prep *ap, int m0,    \
                                                int n, int rows) {                                              \
        tile(j, p, ap, m0, n, rows, T, SUB, MIN, Q8);                                                           \
    }
#define TILES(SUB, MIN, Q8)                                                                                     \
    TILE(1, SUB, MIN, Q8) TILE(2, SUB, MIN, Q8) TILE(3, SUB, MIN, Q8) TILE(4, SUB, MIN, Q8)                     \
    static const tile_fn tiles_##SUB##_##MIN##_##Q8[GT + 1] = {                                                 \
        NULL, tile_1_##SUB##_##MIN##_##Q8, tile_2_##SUB##_##MIN##_##Q8, tile_3_##SUB##_##MIN##_##Q8,            \
        tile_4_##SUB##_##MIN##_##Q8};
TILES(1, 0, 0)
TILES(1, 1, 0)
TILES(2, 0, 0)
TILES(1, 0, 1)

#define TILES_FOR(SUB, MIN, Q8) ((Q8) ? tiles_1_0_1 : (SUB) == 2 ? tiles_2_0_0 : (MIN) ? tiles_1_1_0 : tiles_1_0_0)
GEMM_PLAIN_ALL

void qk_fill_gemm_avx2(qk_kernels *k) {
    const qk_kernels mine = {{GEMM_PLAIN_TABLE}};
    qk_kernels_over(k, &mine);
}
