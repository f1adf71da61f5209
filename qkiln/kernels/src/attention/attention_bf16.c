/* attention_bf16.c — the bfloat16 units of the fused causal attention (layout and unit split: attention.h):
 * variant 3 "amx_bf16" on AMX tiles, variant 4 "avx512_bf16" on AVX512_BF16 (vdpbf16ps; AMD Zen 4/5, Intel Cooper
 * Lake). Calibration asks for them (precision "bfloat16"): the float32 AVX-512 unit is FMA-bound, while one
 * tdpbf16ps does 16 x 16 x 32 products and one vdpbf16ps twice a float32 FMA's.
 *
 * Per group of 16 query rows (one A tile's rows) and block of 64 keys:
 *   S = bf16(q · log2e / sqrt(d)) · bf16(K)ᵀ   4 C tiles (16 keys each), A = queries (32 elements of d per
 *                                              tile), B = keys in VNNI pairs along d
 *   online softmax on S in AVX-512 float32      as the AVX-512 unit: keys after a row's position get the
 *                                              finite MASKED score, running sum, base-2 exp (its Taylor
 *                                              polynomial cut to degree 4: 4e-5 relative, far below bf16's
 *                                              2^-9); the running max is lazy: a row's reference max moves
 *                                              only when a block exceeds it by more than 2^SLACK, so the
 *                                              rescale factor alpha is exactly 1 for most blocks
 *   O = alpha · O + bf16(P) · bf16(V)           P (16 x 64) as 2 A tiles, V in VNNI pairs of keys; rows
 *                                              with alpha != 1 are rescaled (AVX-512), then O is loaded as
 *                                              C tiles, accumulated into and stored back; this runs one
 *                                              block behind the scores (software pipeline, see the loop)
 * The two variants share everything but the two products: on AVX512_BF16 a tile product is its definition
 * done with vectors — an accumulator row += A's pair p of that row (broadcast) times B's row p (16 columns'
 * pairs), p = 0..15 in order — over the same packed tiles, in the same order.
 * Speed (calibration's batch, one thread, bench/attention_bench.py): amx_bf16 ~2.1-2.6x the float32 AVX-512 unit
 * on a Sapphire Rapids guest, 5x at t = 2048, d = 128; avx512_bf16 1.7x on a Zen 4 guest (1.85x at t = 2048).
 * Numerics: inputs rounded to bf16 (nearest even), products exact, sums in float32, so the result is within
 * about 4e-3 · max|v| of the float32 variants (qkiln/kernels/attention.py states the measured tolerance); the
 * two bf16 variants differ in the last bits (how each instruction rounds its pair's sum). A row's arithmetic
 * does not depend on which rows share its tile or on the thread count: tile rows are independent, key blocks
 * start at multiples of 64, and blocks past a row's position give p = 0 and alpha = 1 exactly. d is padded
 * with zeros to a multiple of 32 (keys/queries) and 16 (values).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention/attention.h"
#include "attention/attention_avx512.h"
#include "x86/amx_tiles.h"

#define AR 16 /* query rows per row group: one A tile */
#define NB QK_ATTN_NB
#if NB != 64
#error "the unit computes 64-key blocks as 4 score tiles and 2 probability tiles"
#endif
#define TILE 512 /* bf16 elements per 1 KB tile */
#define SLACK 8.0f /* base-2 score units a block max may exceed a row's reference max before it moves */

/* 32 floats p[0 .. valid) (zeros after) times `scale`, as 32 bf16 in order. */
static inline __m512i bf16x32(const float *p, int valid, __m512 scale) {
    const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask_upto(valid), p), scale);
    const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask_upto(valid - 16), p + 16), scale);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Keys [0, npad) as B tiles, tile (key block of 16 kb, element chunk of 32 dc) at (kb * DC + dc) * TILE:
 * row r holds pairs (k[key c][32 dc + 2r], k[key c][32 dc + 2r + 1]) for c = 0..15 — convert 16 keys' 32
 * elements (16 pairs each) and transpose the 16 x 16 pairs. Keys past nkeys are zero. */
static void pack_k(const qk_attn_args *a, int bi, int g, int nkeys, int npad, uint16_t *kt) {
    const float *k = a->k + (long)bi * a->ks_b + (long)g * a->ks_h;
    const int d = a->d, DC = (d + 31) / 32;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int j0 = 0; j0 < npad; j0 += 16)
        for (int dc = 0; dc < DC; dc++) {
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = j0 + i < nkeys ? (__m512)bf16x32(k + (long)(j0 + i) * a->ks_t + 32 * dc, d - 32 * dc, one)
                                      : _mm512_setzero_ps();
            transpose16(r);
            uint16_t *tile = kt + ((long)(j0 / 16) * DC + dc) * TILE;
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(tile + 32 * i, r[i]);
        }
}

/* Values [0, npad) as B tiles, tile (key block of 32 kp, column chunk of 16 cc) at (kp * CC + cc) * TILE:
 * row r holds pairs (v[32 kp + 2r][16 cc + c], v[32 kp + 2r + 1][16 cc + c]) for c = 0..15. Keys past
 * nkeys and columns past d are zero (a zero probability times garbage could be NaN). */
static void pack_v(const qk_attn_args *a, int bi, int g, int nkeys, int npad, uint16_t *vt) {
    const float *v = a->v + (long)bi * a->vs_b + (long)g * a->vs_h;
    const int d = a->d, CC = a->dp / 16;
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                           22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int j = 0; j < npad; j += 2) {
        const float *v0 = v + (long)j * a->vs_t, *v1 = v0 + a->vs_t;
        uint16_t *row = vt + (long)(j / 32) * CC * TILE + (j % 32) / 2 * 32;
        for (int cc = 0; cc < CC; cc++) {
            const __mmask16 m = mask_upto(d - 16 * cc);
            const __m512 x0 = j < nkeys ? _mm512_maskz_loadu_ps(m, v0 + 16 * cc) : _mm512_setzero_ps();
            const __m512 x1 = j + 1 < nkeys ? _mm512_maskz_loadu_ps(m, v1 + 16 * cc) : _mm512_setzero_ps();
            const __m512i pr = _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
            _mm512_storeu_si512(row + (long)cc * TILE, pr);
        }
    }
}

/* The unit's queries times log2(e)/sqrt(d), rows (qrows rounded up to 16, d rounded up to 32) bf16, row =
 * (i - q0) * n_rep + r as in attention.h; rows past the block zero. Rows 16 ahead are prefetched (positions
 * are a page or so apart, where the hardware prefetcher stops). */
static void pack_q(const qk_attn_args *a, int bi, int g, int q0, int q1, uint16_t *qt) {
    const int d = a->d, d32 = (d + 31) / 32 * 32, n_rep = a->n_heads / a->kv_heads, nrows = (q1 - q0) * n_rep;
    const int r16 = (a->qrows + 15) / 16 * 16;
    const __m512 scale = _mm512_set1_ps((float)(QK_LOG2E / sqrt((double)d)));
    const float *base = a->q + (long)bi * a->qs_b + (long)q0 * a->qs_s + (long)g * n_rep * a->qs_h;
    for (int row = 0; row < r16; row++) {
        const float *src = base + (long)(row / n_rep) * a->qs_s + (long)(row % n_rep) * a->qs_h;
        if (row + 16 < nrows) {
            const char *ahead = (const char *)(base + (long)((row + 16) / n_rep) * a->qs_s +
                                               (long)((row + 16) % n_rep) * a->qs_h);
            for (int c = 0; c < d * 4; c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
        }
        for (int c = 0; c < d32; c += 32)
            _mm512_storeu_si512(qt + (long)row * d32 + c,
                                row < nrows ? bf16x32(src + c, d - c, scale) : _mm512_setzero_si512());
    }
}

/* Scores of the row group: sc (16, NB) columns [0, 16 nt) = A (16, d32) · keys [j0, j0 + 16 nt). */
static inline void scores(const uint16_t *qa, int d32, const uint16_t *kb, int DC, int nt, float *sc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const long kstep = (long)DC * TILE; /* next 16 keys, same element chunk */
    for (int dc = 0; dc < DC; dc++) {
        const uint16_t *k = kb + (long)dc * TILE;
        _tile_loadd(4, qa + 32 * dc, 2 * d32);
        _tile_loadd(5, k, 64);
        if (nt > 1) _tile_loadd(6, k + kstep, 64);
        if (nt > 2) _tile_loadd(7, k + 2 * kstep, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (nt > 1) _tile_dpbf16ps(1, 4, 6);
        if (nt > 2) _tile_dpbf16ps(2, 4, 7);
        if (nt > 3) {
            _tile_loadd(5, k + 3 * kstep, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, sc, 4 * NB);
    if (nt > 1) _tile_stored(1, sc + 16, 4 * NB);
    if (nt > 2) _tile_stored(2, sc + 32, 4 * NB);
    if (nt > 3) _tile_stored(3, sc + 48, 4 * NB);
}

/* o's rows whose max moved (alpha != 1) times alpha (for the others alpha is 1: multiplying would change nothing). */
static inline void rescale_moved(float *o, int dp, const float *alpha) {
    const __mmask16 moved = _mm512_cmp_ps_mask(_mm512_load_ps(alpha), _mm512_set1_ps(1.0f), _CMP_NEQ_UQ);
    if (moved)
        for (int rr = 0; rr < AR; rr++)
            if (moved >> rr & 1) {
                const __m512 al = _mm512_set1_ps(alpha[rr]);
                for (int c = 0; c < dp; c += 16)
                    _mm512_storeu_ps(o + (long)rr * dp + c, _mm512_mul_ps(al, _mm512_loadu_ps(o + (long)rr * dp + c)));
            }
}

/* o (16, dp) = alpha · o + P · V for this key block: P (16, 64) bf16 in pb (keys 32.. only when np > 1),
 * vb the block's first value tile. The rows whose max moved are rescaled in place (alpha is 1 for the
 * others, and multiplying by 1 changes nothing), then o itself is the accumulator: 64 output columns
 * (4 C tiles) loaded, P · V added, stored back. */
static inline void pv(const uint16_t *pb, int np, const uint16_t *vb, int CC, float *o, int dp, const float *alpha) {
    rescale_moved(o, dp, alpha);
    _tile_loadd(4, pb, 2 * NB);
    if (np > 1) _tile_loadd(5, pb + 32, 2 * NB);
    const long kstep = (long)CC * TILE; /* next 32 keys, same column chunk */
    for (int c0 = 0; c0 < CC; c0 += 4) {
        const int nc = CC - c0 < 4 ? CC - c0 : 4;
        const uint16_t *v = vb + (long)c0 * TILE;
        float *oc = o + 16 * c0;
#define PV_TILE(T)                                                                                           \
    do {                                                                                                     \
        _tile_loadd(T, oc + 16 * (T), 4 * dp);                                                               \
        _tile_loadd(6, v + (T) * TILE, 64);                                                                  \
        _tile_dpbf16ps(T, 4, 6);                                                                             \
        if (np > 1) {                                                                                        \
            _tile_loadd(7, v + (T) * TILE + kstep, 64);                                                      \
            _tile_dpbf16ps(T, 5, 7);                                                                         \
        }                                                                                                    \
        _tile_stored(T, oc + 16 * (T), 4 * dp);                                                              \
    } while (0)
        PV_TILE(0);
        if (nc > 1) PV_TILE(1);
        if (nc > 2) PV_TILE(2);
        if (nc > 3) PV_TILE(3);
#undef PV_TILE
    }
}

/* The tile products on AVX512_BF16 (amx_tiles.h's dpbf16_rows): C (AR rows x NV vectors of 16; row r's vector v
 * at c + r * cs + 16 v) = (zero ? 0 : C) + A · B over `steps` steps of 16 pairs — A's row r pair p of step s at
 * a + r * as + 32 s + 2 p, B's vector v pair-row p of step s at b + v * bv + s * bstep + 32 p (a B tile's row).
 * 4 rows at a time, their NV vectors in registers (NV a compile-time constant: as a run-time bound the
 * accumulators spilled, 1.36x instead of 1.73x). */
static inline __attribute__((always_inline)) void rows_product(float *c, long cs, int zero, const uint16_t *a, long as,
                                                               const uint16_t *b, long bv, long bstep, int steps,
                                                               const int NV) {
    for (int r0 = 0; r0 < AR; r0 += 4) {
        __m512 acc[4 * 4];
        for (int r = 0; r < 4; r++)
            for (int v = 0; v < NV; v++)
                acc[r * NV + v] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + (r0 + r) * cs + 16 * v);
        dpbf16_rows(acc, 4, NV, a + r0 * as, as, 32, 2, b, bv, bstep, steps);
        for (int r = 0; r < 4; r++)
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(c + (r0 + r) * cs + 16 * v, acc[r * NV + v]);
    }
}

/* rows_product with nv (1..4) vectors. */
static void rows_product_nv(float *c, long cs, int zero, const uint16_t *a, long as, const uint16_t *b, long bv,
                            long bstep, int steps, int nv) {
    switch (nv) {
    case 1: rows_product(c, cs, zero, a, as, b, bv, bstep, steps, 1); break;
    case 2: rows_product(c, cs, zero, a, as, b, bv, bstep, steps, 2); break;
    case 3: rows_product(c, cs, zero, a, as, b, bv, bstep, steps, 3); break;
    default: rows_product(c, cs, zero, a, as, b, bv, bstep, steps, 4); break;
    }
}

/* scores() on AVX512_BF16: the nt key tiles are C's vectors, the element chunks the steps. */
static void scores_avx512(const uint16_t *qa, int d32, const uint16_t *kb, int DC, int nt, float *sc) {
    rows_product_nv(sc, NB, 1, qa, d32, kb, (long)DC * TILE, TILE, DC, nt);
}

/* pv() on AVX512_BF16: the rows whose max moved rescaled, then o's columns 4 chunks of 16 at a time, the key
 * halves (32 keys each, np of them) the steps. */
static void pv_avx512(const uint16_t *pb, int np, const uint16_t *vb, int CC, float *o, int dp, const float *alpha) {
    rescale_moved(o, dp, alpha);
    for (int c0 = 0; c0 < CC; c0 += 4)
        rows_product_nv(o + 16 * c0, dp, 0, pb, NB, vb + (long)c0 * TILE, TILE, (long)CC * TILE, np,
                        CC - c0 < 4 ? CC - c0 : 4);
}

static inline __attribute__((always_inline)) void unit_bf16(const qk_attn_args *a, int u, float *scratch,
                                                           const int amx) {
    int bi, g, qb;
    qk_attn_unit_coords(a, u, &bi, &g, &qb);
    const int d = a->d, dp = a->dp, tp = a->tpad, n_rep = a->n_heads / a->kv_heads, offset = a->t - a->s;
    const int DC = (d + 31) / 32, d32 = 32 * DC, CC = dp / 16, r16 = (a->qrows + 15) / 16 * 16;
    const int q0 = qb * a->qblock, q1 = q0 + a->qblock < a->s ? q0 + a->qblock : a->s;
    const int nkeys = offset + q1, npad = (nkeys + NB - 1) / NB * NB;
    uint16_t *kt = (uint16_t *)scratch;         /* (tpad / 16, DC) key tiles */
    uint16_t *vt = kt + (long)tp * d32;         /* (tpad / 32, CC) value tiles */
    uint16_t *qt = vt + (long)tp * dp;          /* (r16, d32) scaled queries */
    float *sc = (float *)(qt + (long)r16 * d32); /* (AR, NB) scores, then probabilities */
    uint16_t *pbuf = (uint16_t *)(sc + AR * NB); /* 2 x (AR, NB) bf16 probabilities: this block, previous */
    float *o = (float *)(pbuf + 2 * AR * NB);    /* (AR, dp) unnormalized output */
    float *lv = o + AR * dp;                    /* (AR, 16) running sums, per lane */
    float m[AR] __attribute__((aligned(64))), mn[AR] __attribute__((aligned(64)));
    float alphas[2][AR] __attribute__((aligned(64)));
    if (amx) tile_config();
    pack_k(a, bi, g, nkeys, npad, kt);
    pack_v(a, bi, g, nkeys, npad, vt);
    pack_q(a, bi, g, q0, q1, qt);
    const int nrows = (q1 - q0) * n_rep;
    for (int row0 = 0; row0 < nrows; row0 += AR) {
        const int rows = nrows - row0 < AR ? nrows - row0 : AR;
        int pos[AR];
        qk_attn_row_positions(a, q0, row0, rows, AR, pos);
        for (int rr = 0; rr < AR; rr++) m[rr] = MASKED;
        memset(lv, 0, sizeof(float) * AR * 16);
        memset(o, 0, sizeof(float) * AR * dp);
        const int first = pos[0], last = pos[rows - 1];
        /* The output rows are scattered: the next group's lines are fetched while this one computes, two
         * per softmax row (a burst of prefetches would wait for free fill buffers). */
        const int lines = (d * 4 + 63) / 64, next_rows = nrows - row0 - AR < AR ? nrows - row0 - AR : AR;
        int pf = 0;
        const int npf = next_rows > 0 ? next_rows * lines : 0;
        /* Software pipeline: block j's P . V runs after block j + 1's scores, so the tile loads of P (just
         * written by vector stores) and the vector loads of the scores (just written by tile stores) do not
         * wait on each other; each row's sequence of operations is unchanged. */
        int prev_np = 0;
        for (int j0 = 0, jb = 0; j0 <= last; j0 += NB, jb ^= 1) {
            const int nk = last + 1 - j0 < NB ? last + 1 - j0 : NB; /* keys any row of the group sees */
            const int nv = (nk + 15) / 16;                          /* score tiles / vectors per row */
            uint16_t *pb = pbuf + jb * AR * NB;
            float *alpha = alphas[jb];
            (amx ? scores : scores_avx512)(qt + (long)row0 * d32, d32, kt + (long)(j0 / 16) * DC * TILE, DC, nv, sc);
            if (j0 > 0)
                (amx ? pv : pv_avx512)(pbuf + (jb ^ 1) * AR * NB, prev_np, vt + (long)((j0 - NB) / 32) * CC * TILE, CC, o,
                                       dp, alphas[jb ^ 1]);
            const int diag = j0 + 16 * nv - 1 > first; /* some key is after some row's position */
            for (int rr = 0; rr < AR; rr++) {
                mn[rr] = masked_row_max(sc + rr * NB, nv, diag, pos[rr] - j0, m[rr]);
                for (int x = 0; x < 2 && pf < npf; x++, pf++) {
                    const int row = row0 + AR + pf / lines;
                    const int i = q0 + row / n_rep, h = g * n_rep + row % n_rep;
                    _mm_prefetch((const char *)(a->out + ((long)bi * a->s + i) * ((long)a->n_heads * d) +
                                                (long)h * d) + 64 * (pf % lines), _MM_HINT_T0);
                }
            }
            /* Lazy rescale: a row keeps its reference m unless the block max exceeds it by more than SLACK
             * (then p <= 2^SLACK, harmless in float32 and bf16), so alpha is exactly 1 for most blocks and
             * o needs no rescaling; the result is the same softmax. Per row, so grouping does not matter. */
            const __m512 mold = _mm512_load_ps(m);
            const __mmask16 up = _mm512_cmp_ps_mask(_mm512_load_ps(mn), _mm512_add_ps(mold, _mm512_set1_ps(SLACK)),
                                                    _CMP_GT_OQ);
            const __m512 mnew = _mm512_mask_mov_ps(mold, up, _mm512_load_ps(mn));
            _mm512_store_ps(alpha, exp2_512(_mm512_sub_ps(mold, mnew))); /* first block: 0; unchanged: 1 */
            _mm512_store_ps(m, mnew);
            _mm512_store_ps(mn, mnew);
            for (int rr = 0; rr < AR; rr++) {
                const float *sr = sc + rr * NB;
                const __m512 mv = _mm512_set1_ps(mn[rr]);
                __m512 p[4];
                __m512 lsum = _mm512_mul_ps(_mm512_loadu_ps(lv + rr * 16), _mm512_set1_ps(alpha[rr]));
                for (int v = 0; v < 4; v++) {
                    p[v] = v < nv ? exp2_512_degree(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * v), mv), 4)
                                  : _mm512_setzero_ps();
                    lsum = _mm512_add_ps(lsum, p[v]);
                }
                _mm512_storeu_ps(lv + rr * 16, lsum);
                _mm512_storeu_si512(pb + rr * NB, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0]));
                if (nv > 2) _mm512_storeu_si512(pb + rr * NB + 32, (__m512i)_mm512_cvtne2ps_pbh(p[3], p[2]));
            }
            prev_np = (nv + 1) / 2;
        }
        const int jl = last / NB * NB; /* the last block's P . V */
        (amx ? pv : pv_avx512)(pbuf + (jl / NB & 1) * AR * NB, prev_np, vt + (long)(jl / 32) * CC * TILE, CC, o, dp,
                               alphas[jl / NB & 1]);
        for (int rr = 0; rr < rows; rr++) {
            const int i = q0 + (row0 + rr) / n_rep, h = g * n_rep + (row0 + rr) % n_rep;
            float *dst = a->out + ((long)bi * a->s + i) * ((long)a->n_heads * d) + (long)h * d;
            const __m512 l = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_loadu_ps(lv + rr * 16)));
            for (int c = 0; c < d; c += 16)
                _mm512_mask_storeu_ps(dst + c, mask_upto(d - c), _mm512_div_ps(_mm512_loadu_ps(o + rr * dp + c), l));
        }
    }
    if (amx) _tile_release();
}

void qk_attn_unit_amx(const qk_attn_args *a, int u, float *scratch) { unit_bf16(a, u, scratch, 1); }
void qk_attn_unit_avx512bf16(const qk_attn_args *a, int u, float *scratch) { unit_bf16(a, u, scratch, 0); }
