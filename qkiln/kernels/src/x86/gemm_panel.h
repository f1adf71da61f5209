/* gemm_panel.h — the batched products' ISA-independent half, included by gemm_avx512.c and gemm_avx2.c.
 *
 * The per-row kernels stream a weight row once per activation row; with a 128-token prompt each weight byte is
 * unpacked 128 times. Here the rows [n0, n1) of a product are cut into strips of STRIP rows (16 on AVX-512, 8 on
 * AVX2: one int32 lane per row); a strip is unpacked ONCE into a panel of unsigned 8-bit codes, and every activation
 * row then runs against the panel, GT rows per tile:
 *
 *   panel, per 32-element block b: 8 vectors, vector g holding the codes 4g..4g+3 of the strip's row r in int32
 *   lane r, so one multiply-add against the activation word 4g..4g+3 (broadcast from memory) adds one row's partial
 *   sum per lane; plus per row the block's fp32 scale(s) and min.
 *
 * Every weight type becomes the same panel — codes u in 0..255 with an offset o (w = scale*(u - o) + min, per
 * sub-block of 32 or Q6_K's 16): Q4_0 o=8, Q5_0 o=16, Q8_0 o=128 (the code ^ 0x80), Q4_1/Q5_1 o=0 with min m, Q4_K
 * o=0 with min -dmin*m and scale d*sc, Q6_K o=32 with scale d*sc per 16 elements. The integer part is exact, as in
 * the per-row kernels: the accumulator starts at -o * sum(a) (the activation sums per block, or per 16 for Q6_K)
 * and the tile adds sum(u * a), so each lane ends with the block's sum((u - o) * a) — the integer every path
 * computes. The fp32 combination da * (scale * isum + min * sum(a)) runs per block, within numpy_ref.TOLERANCE of
 * the per-row loops.
 *
 * The includer defines STRIP, GT, panel_transpose(codes, out) (STRIP rows x 32 bytes, row-major -> the block's 8
 * vectors) and its tiles; this file gives the unpack of each plain ggml block, the panel fill from plain rows, the
 * per-call activation preparation and the strip loop. */
#ifndef QKILN_GEMM_PANEL_H
#define QKILN_GEMM_PANEL_H

#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"

typedef struct {
    int nb;       /* 32-element blocks per row */
    int sub;      /* sub-blocks per block with their own scale: 1, or 2 (Q6_K) */
    int has_min;
    uint8_t *q;   /* (nb, 8, STRIP * 4) code vectors */
    float *scale; /* (nb, sub, STRIP) */
    float *min;   /* (nb, STRIP) */
} panel;

/* Per block b and activation row m, block-major (a tile reads GT consecutive entries):
 *   da[b*M + m]: the activation scale; corr[(b*sub + s)*M + m] = -o * sum(a) over sub-block s;
 *   dasa[b*M + m] = da * sum(a) (types with a min). */
typedef struct {
    float *da;
    int32_t *corr;
    float *dasa;
} act_prep;

typedef void (*tile_fn)(const qk_job *j, const panel *p, const act_prep *ap, int m0, int n, int rows);

/* 16 nibble bytes -> 32 codes in element order (low nibbles, then high). */
static inline __m256i nibbles32(const uint8_t *q) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

/* One row's block b: its 32 unsigned codes into `codes`, scale(s) and min into sc[0], sc[1], *mn. */
typedef void (*row_block_fn)(const uint8_t *row, int b, uint8_t *codes, float sc[2], float *mn);

static void rb_q8_0(const uint8_t *row, int b, uint8_t *codes, float sc[2], float *mn) {
    const uint8_t *w = row + (size_t)b * Q8_0_BYTES;
    _mm256_storeu_si256((__m256i *)codes, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 2)),
                                                            _mm256_set1_epi8((char)0x80)));
    sc[0] = qk_h2f_at(w);
}

/* Q4_0, Q5_0, Q4_1, Q5_1: fp16 d, [fp16 m], [u32 qh: bit 4 of element j at bit j], 16 nibble bytes. */
static inline __attribute__((always_inline)) void legacy_block(const uint8_t *row, int b, int bytes, int has_min,
                                                               int five, uint8_t *codes, float sc[2], float *mn) {
    const uint8_t *w = row + (size_t)b * bytes, *q = w + (has_min ? 4 : 2);
    __m256i c = nibbles32(five ? q + 4 : q);
    if (five) { /* byte j of qh's bytes broadcast, tested against bit j % 8: 16 where bit j of qh is set */
        const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
        const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qk_rd32(q)),
                                                   _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                     0x0101010101010101, 0));
        c = _mm256_add_epi8(c, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                                                _mm256_set1_epi8(16)));
    }
    _mm256_storeu_si256((__m256i *)codes, c);
    sc[0] = qk_h2f_at(w);
    if (has_min) *mn = qk_h2f_at(w + 2);
}

#define LEGACY(T, BYTES, MIN, FIVE)                                                                             \
    static void rb_##T(const uint8_t *row, int b, uint8_t *codes, float sc[2], float *mn) {                    \
        legacy_block(row, b, BYTES, MIN, FIVE, codes, sc, mn);                                                  \
    }
LEGACY(q4_0, Q4_0_BYTES, 0, 0)
LEGACY(q5_0, Q5_0_BYTES, 0, 1)
LEGACY(q4_1, Q4_1_BYTES, 1, 0)
LEGACY(q5_1, Q5_1_BYTES, 1, 1)

/* Q4_K sub-block j = b % 8 of super-block b / 8: codes (qs[(j/2)*32 + l] >> 4*(j&1)) & 15. */
static void rb_q4_k(const uint8_t *row, int b, uint8_t *codes, float sc[2], float *mn) {
    const uint8_t *w = row + (size_t)(b / 8) * Q4_K_BYTES;
    const int j = b % 8;
    int s, m;
    qk_q4k_scale_min(j, w + 4, &s, &m);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 16 + (j / 2) * 32));
    _mm256_storeu_si256((__m256i *)codes, _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (j & 1)), _mm256_set1_epi8(0x0f)));
    sc[0] = qk_h2f_at(w) * (float)s;
    *mn = -(qk_h2f_at(w + 2) * (float)m);
}

/* Q6_K 32-element chunk c = b % 8 of super-block b / 8: 4 low bits from ql, 2 high bits from qh, 0..63, scales
 * per 16 elements. */
static void rb_q6_k(const uint8_t *row, int b, uint8_t *codes, float sc[2], float *mn) {
    const uint8_t *w = row + (size_t)(b / 8) * Q6_K_BYTES;
    const int c = b % 8, h = c / 4, cc = c % 4;
    const __m256i l = _mm256_loadu_si256((const __m256i *)(w + h * 64 + (cc & 1) * 32));
    const __m256i hb = _mm256_loadu_si256((const __m256i *)(w + 128 + h * 32));
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(l, (cc >> 1) * 4), _mm256_set1_epi8(0x0f));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, cc * 2), _mm256_set1_epi8(3));
    _mm256_storeu_si256((__m256i *)codes, _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)));
    const int8_t *s8 = (const int8_t *)(w + 192);
    const float d = qk_h2f_at(w + 208);
    sc[0] = d * (float)s8[c * 2];
    sc[1] = d * (float)s8[c * 2 + 1];
}

/* Rows n .. n+rows-1 (rows <= STRIP) of a plain-block matrix whose rows are `stride` bytes (inlined per type, so
 * the unpack of each row's block is a direct call the compiler inlines: a prompt fills a strip per 16 rows). */
static inline __attribute__((always_inline)) void fill_rows(const qk_job *j, int n, int rows, size_t stride,
                                                            row_block_fn rb, panel *p) {
    _Alignas(64) uint8_t codes[STRIP * 32];
    float sc[2][STRIP], mn[STRIP];
    for (int b = 0; b < p->nb; b++) {
        memset(sc, 0, sizeof sc);
        memset(mn, 0, sizeof mn);
        for (int r = 0; r < rows; r++) {
            float s2[2] = {0.0f, 0.0f};
            rb(j->w + (size_t)(n + r) * stride, b, codes + 32 * r, s2, &mn[r]);
            sc[0][r] = s2[0];
            sc[1][r] = s2[1];
        }
        if (rows < STRIP) memset(codes + 32 * rows, 0, (size_t)32 * (STRIP - rows));
        panel_transpose(codes, p->q + (size_t)b * 8 * STRIP * 4);
        for (int s = 0; s < p->sub; s++) memcpy(p->scale + ((size_t)b * p->sub + s) * STRIP, sc[s], sizeof sc[s]);
        if (p->has_min) memcpy(p->min + (size_t)b * STRIP, mn, sizeof mn);
    }
}

/* A strip's panel (rows n .. n+rows-1): from plain rows `stride` bytes apart, or by the includer's own fill. */
typedef void (*fill_fn)(const qk_job *j, int n, int rows, size_t stride, panel *p);

/* Rows [n0, n1) for every activation row: strips of STRIP rows, each unpacked once and run against all M rows in
 * tiles of GT (`tiles[T]` runs T rows). */
static void gemm_strips(const qk_job *j, int n0, int n1, int sub, int offset, int has_min, const tile_fn *tiles,
                        fill_fn fill, size_t stride) {
    const int nb = j->K / QK8, M = j->M;
    panel p = {nb, sub, has_min, NULL, NULL, NULL};
    act_prep ap = {NULL, NULL, NULL};
    p.q = aligned_alloc(64, (size_t)nb * 8 * STRIP * 4);
    p.scale = aligned_alloc(64, ((size_t)nb * sub * STRIP * sizeof(float) + 63) / 64 * 64); /* C11: size % 64 == 0 */
    p.min = aligned_alloc(64, ((size_t)nb * STRIP * sizeof(float) + 63) / 64 * 64);
    ap.da = malloc((size_t)M * nb * sizeof(float));
    ap.corr = malloc((size_t)M * nb * sub * sizeof(int32_t));
    ap.dasa = malloc((size_t)M * nb * sizeof(float));
    if (p.q && p.scale && p.min && ap.da && ap.corr && ap.dasa) {
        for (int m = 0; m < M; m++)
            for (int b = 0; b < nb; b++) {
                const size_t mb = (size_t)m * nb + b, bm = (size_t)b * M + m;
                ap.da[bm] = j->d[mb];
                if (has_min) ap.dasa[bm] = j->d[mb] * (float)j->sums[mb];
                if (sub == 1) {
                    ap.corr[bm] = -offset * j->sums[mb];
                } else { /* sums of the two 16-element halves */
                    const int8_t *a = j->qs + (size_t)m * j->K + (size_t)b * QK8;
                    int s0 = 0;
                    for (int e = 0; e < 16; e++) s0 += a[e];
                    ap.corr[(size_t)2 * b * M + m] = -offset * s0;
                    ap.corr[(size_t)(2 * b + 1) * M + m] = -offset * (j->sums[mb] - s0);
                }
            }
        for (int n = n0; n < n1; n += STRIP) {
            const int rows = n1 - n < STRIP ? n1 - n : STRIP;
            fill(j, n, rows, stride, &p);
            int m = 0;
            for (; m + GT <= M; m += GT) tiles[GT](j, &p, &ap, m, n, rows);
            if (m < M) tiles[M - m](j, &p, &ap, m, n, rows);
        }
    }
    free(p.q);
    free(p.scale);
    free(p.min);
    free(ap.da);
    free(ap.corr);
    free(ap.dasa);
}

/* gemm_<type>, the row function of each plain layout, and GEMM_PLAIN_TABLE, their entries for the includer's
 * qk_fill_gemm_<isa>: GEMM_PLAIN_ALL expands them once the includer has its tiles (TILES_FOR(sub, has_min, q8)
 * names the tile table for a layout; q8: Q8_0's codes, which use all 8 bits). */
#define GEMM_PLAIN(T, BYTES, ELEMS, SUB, OFF, MIN)                                                             \
    static void fill_##T(const qk_job *j, int n, int rows, size_t stride, panel *p) {                         \
        fill_rows(j, n, rows, stride, rb_##T, p);                                                               \
    }                                                                                                           \
    static void gemm_##T(const qk_job *j, int n0, int n1) {                                                   \
        gemm_strips(j, n0, n1, SUB, OFF, MIN, TILES_FOR(SUB, MIN, (OFF) == 128), fill_##T,                    \
                    (size_t)(j->K / (ELEMS)) * (BYTES));                                                       \
    }
#define GEMM_PLAIN_ALL                                                                                          \
    GEMM_PLAIN(q4_0, Q4_0_BYTES, QK8, 1, 8, 0)                                                                  \
    GEMM_PLAIN(q8_0, Q8_0_BYTES, QK8, 1, 128, 0)                                                                \
    GEMM_PLAIN(q5_0, Q5_0_BYTES, QK8, 1, 16, 0)                                                                 \
    GEMM_PLAIN(q4_1, Q4_1_BYTES, QK8, 1, 0, 1)                                                                  \
    GEMM_PLAIN(q5_1, Q5_1_BYTES, QK8, 1, 0, 1)                                                                  \
    GEMM_PLAIN(q4_k, Q4_K_BYTES, QKK, 1, 0, 1)                                                                  \
    GEMM_PLAIN(q6_k, Q6_K_BYTES, QKK, 2, 32, 0)
#define GEMM_PLAIN_TABLE                                                                                        \
    [QK_L_Q4_0] = gemm_q4_0, [QK_L_Q8_0] = gemm_q8_0, [QK_L_Q5_0] = gemm_q5_0, [QK_L_Q4_1] = gemm_q4_1,          \
    [QK_L_Q5_1] = gemm_q5_1, [QK_L_Q4_K] = gemm_q4_k, [QK_L_Q6_K] = gemm_q6_k

#endif
