/* gemm_avx512.c — batched products for prompts and evaluation (many activation rows at once) on AVX-512 VNNI.
 *
 * The per-row kernels (avx512.c) stream a weight row once per activation row; with a 128-token prompt each weight
 * byte is unpacked 128 times. Here the rows [n0, n1) of a product are cut into strips of 16 rows; a strip is
 * unpacked ONCE into a panel of unsigned 8-bit codes, and every activation row then runs against the panel:
 *
 *   panel, per 32-element block b: 8 vectors, vector g holding the codes 4g..4g+3 of the strip's row r in int32
 *   lane r, so `vpdpbusd` against the activation word 4g..4g+3 (broadcast straight from memory) adds one row's
 *   partial sum per lane; plus per row the block's fp32 scale(s) and min.
 *
 * A tile of GT activation rows reuses each panel vector GT times from a register. Every weight type becomes the same
 * panel — codes u in 0..255 with a per-block offset o (w = scale*(u - o) + min, per sub-block of 32 or Q6_K's 16):
 *   Q4_0 o=8, Q5_0 o=16, Q8_0 o=128 (the code ^ 0x80), Q4_1/Q5_1 o=0 with min m, Q4_K o=0 with min -dmin*m and
 *   scale d*sc, Q6_K o=32 with scale d*sc per 16 elements.
 * The integer part is exact, as in the per-row kernels: the accumulator starts at -o * sum(a) (the activation
 * sums per block, or per 16 for Q6_K) and vpdpbusd adds sum(u * a), so each lane ends with the block's
 * sum((u - o) * a) — the same integer every path computes. The fp32 combination da * (scale * isum + min * sum(a))
 * runs per block in another order than the per-row loops, within numpy_ref.TOLERANCE of them.
 *
 * Sources: the X8 repacks the avx512 path keeps at load (Q4_0X8, Q8_0X8: two 8-row groups are one strip after a
 * 128-bit lane shuffle) and the plain ggml blocks (Q4_0, Q8_0, Q5_0, Q4_1, Q5_1, Q4_K, Q6_K: each row's 32 codes
 * unpacked, then a 16 x 8 transpose of 32-bit words). */
#include <immintrin.h>
#include <stdlib.h>

#include "../common.h"

#define GT 8        /* activation rows per tile */
#define STRIP 16    /* weight rows per panel: one int32 lane each */

typedef struct {
    int nb;       /* 32-element blocks per row */
    int sub;      /* sub-blocks per block with their own scale: 1, or 2 (Q6_K) */
    int offset;   /* o */
    int has_min;
    __m512i *q;   /* (nb, 8) code vectors */
    float *scale; /* (nb, sub, 16) */
    float *min;   /* (nb, 16) */
} panel;

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

/* Rows 8*grp .. 8*grp+15 of a Q4_0X8 (q8 = 0) or Q8_0X8 (q8 = 1) matrix; the second group may lie past the end. */
static void fill_x8(const qk_job *j, int grp, int q8, panel *p) {
    const int nb = p->nb, ngroups = (j->N + 7) / 8;
    const size_t bb = q8 ? Q8_0X8_BYTES : Q4_0X8_BYTES;
    const uint8_t *A = j->w + (size_t)grp * nb * bb;
    const uint8_t *B = grp + 1 < ngroups ? A + (size_t)nb * bb : NULL;
    const __m512i m4 = _mm512_set1_epi8(0x0f), bias = _mm512_set1_epi8((char)0x80);
    for (int b = 0; b < nb; b++, A += bb, B = B ? B + bb : NULL) {
        __m512i *out = p->q + (size_t)b * 8;
        _mm512_store_ps(p->scale + (size_t)b * STRIP, scales16(A, B));
        if (q8) {
            for (int c = 0; c < 4; c++) {
                const __m512i va = _mm512_xor_si512(_mm512_loadu_si512((const void *)(A + 16 + 64 * c)), bias);
                const __m512i vb = B ? _mm512_xor_si512(_mm512_loadu_si512((const void *)(B + 16 + 64 * c)), bias) : bias;
                out[2 * c] = halves(va, vb, 0);
                out[2 * c + 1] = halves(va, vb, 1);
            }
        } else {
            for (int c = 0; c < 2; c++) {
                const __m512i va = _mm512_loadu_si512((const void *)(A + 16 + 64 * c));
                const __m512i vb = B ? _mm512_loadu_si512((const void *)(B + 16 + 64 * c)) : _mm512_setzero_si512();
                const __m512i la = _mm512_and_si512(va, m4), lb = _mm512_and_si512(vb, m4);
                const __m512i ha = _mm512_and_si512(_mm512_srli_epi16(va, 4), m4);
                const __m512i hb = _mm512_and_si512(_mm512_srli_epi16(vb, 4), m4);
                out[2 * c] = halves(la, lb, 0);
                out[2 * c + 1] = halves(la, lb, 1);
                out[2 * c + 4] = halves(ha, hb, 0);
                out[2 * c + 5] = halves(ha, hb, 1);
            }
        }
    }
}

/* ---- panel from plain blocks: each row's codes of a block, then a transpose ------------------------------- */

/* codes: 16 rows x 32 bytes, row-major -> out[g] lane r = row r's bytes 4g..4g+3. Rows are loaded in pairs;
 * quads of rows are gathered per word group (permutex2var), then the 128-bit lanes of four quads transposed. */
static inline void transpose16x8(const uint8_t *codes, __m512i out[8]) {
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
    if (five) c = _mm256_mask_add_epi8(c, (__mmask32)qk_rd32(q), c, _mm256_set1_epi8(16));
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

/* Rows n .. n+rows-1 (rows <= 16) of a plain-block matrix whose rows are `stride` bytes. */
static void fill_rows(const qk_job *j, int n, int rows, size_t stride, row_block_fn rb, panel *p) {
    _Alignas(64) uint8_t codes[STRIP * 32];
    _Alignas(64) float sc[2][STRIP], mn[STRIP];
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
        transpose16x8(codes, p->q + (size_t)b * 8);
        for (int s = 0; s < p->sub; s++)
            _mm512_store_ps(p->scale + ((size_t)b * p->sub + s) * STRIP, _mm512_load_ps(sc[s]));
        if (p->has_min) _mm512_store_ps(p->min + (size_t)b * STRIP, _mm512_load_ps(mn));
    }
}

/* ---- the tile: GT (or fewer) activation rows against one panel --------------------------------------------- */

/* Per block b and activation row m, block-major (a tile reads GT consecutive entries):
 *   da[b*M + m]: the activation scale; corr[(b*sub + s)*M + m] = -o * sum(a) over sub-block s;
 *   dasa[b*M + m] = da * sum(a) (types with a min). */
typedef struct {
    float *da;
    int32_t *corr;
    float *dasa;
} act_prep;

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
        const __m512i *q = p->q + (size_t)b * 8;
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
typedef void (*tile_fn)(const qk_job *, const panel *, const act_prep *, int, int, int);
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

/* ---- the row functions ------------------------------------------------------------------------------------ */

enum src { SRC_X8_Q4, SRC_X8_Q8, SRC_ROWS };

/* Rows [n0, n1) for every activation row: strips of 16 rows, each unpacked once and run against all M rows. */
static inline __attribute__((always_inline)) void gemm_rows(const qk_job *j, int n0, int n1, enum src src, int sub,
                                                            int offset, int has_min, size_t stride, row_block_fn rb) {
    const int nb = j->K / QK8, M = j->M;
    panel p = {nb, sub, offset, has_min, NULL, NULL, NULL};
    act_prep ap = {NULL, NULL, NULL};
    const tile_fn *tiles = sub == 2 ? tiles_2_0 : has_min ? tiles_1_1 : tiles_1_0;
    p.q = aligned_alloc(64, (size_t)nb * 8 * sizeof(__m512i));
    p.scale = aligned_alloc(64, (size_t)nb * sub * STRIP * sizeof(float));
    p.min = aligned_alloc(64, (size_t)nb * STRIP * sizeof(float));
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
            if (src == SRC_ROWS)
                fill_rows(j, n, rows, stride, rb, &p);
            else
                fill_x8(j, n / 8, src == SRC_X8_Q8, &p);
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

static void gemm_q4_0x8(const qk_job *j, int n0, int n1) { gemm_rows(j, n0, n1, SRC_X8_Q4, 1, 8, 0, 0, NULL); }
static void gemm_q8_0x8(const qk_job *j, int n0, int n1) { gemm_rows(j, n0, n1, SRC_X8_Q8, 1, 128, 0, 0, NULL); }

#define GEMM_PLAIN(T, BYTES, ELEMS, SUB, OFF, MIN)                                                             \
    static void gemm_##T(const qk_job *j, int n0, int n1) {                                                   \
        gemm_rows(j, n0, n1, SRC_ROWS, SUB, OFF, MIN, (size_t)(j->K / (ELEMS)) * (BYTES), rb_##T);            \
    }
GEMM_PLAIN(q4_0, Q4_0_BYTES, QK8, 1, 8, 0)
GEMM_PLAIN(q8_0, Q8_0_BYTES, QK8, 1, 128, 0)
GEMM_PLAIN(q5_0, Q5_0_BYTES, QK8, 1, 16, 0)
GEMM_PLAIN(q4_1, Q4_1_BYTES, QK8, 1, 0, 1)
GEMM_PLAIN(q5_1, Q5_1_BYTES, QK8, 1, 0, 1)
GEMM_PLAIN(q4_k, Q4_K_BYTES, QKK, 1, 0, 1)
GEMM_PLAIN(q6_k, Q6_K_BYTES, QKK, 2, 32, 0)

void qk_fill_gemm_avx512(qk_kernels *k) {
    const qk_kernels mine = {{[QK_L_Q4_0] = gemm_q4_0, [QK_L_Q8_0] = gemm_q8_0, [QK_L_Q5_0] = gemm_q5_0,
                              [QK_L_Q4_1] = gemm_q4_1, [QK_L_Q5_1] = gemm_q5_1, [QK_L_Q4_K] = gemm_q4_k,
                              [QK_L_Q6_K] = gemm_q6_k, [QK_L_Q4_0X8] = gemm_q4_0x8, [QK_L_Q8_0X8] = gemm_q8_0x8}};
    qk_kernels_over(k, &mine);
}
