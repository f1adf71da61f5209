/* attention_avx2.c — the AVX2 (+FMA) unit of the fused causal attention (layout, algorithm: attention.h), for
 * x86-64 CPUs without AVX-512 (AMD Zen 2/3, Intel before Skylake-SP): the AVX-512 unit's structure on 8-float
 * vectors and 16 registers. Per group of 12 query rows and block of 64 keys: scores 6 rows x 16 keys at a
 * time (12 ymm accumulators, keys along the vector, query elements broadcast), the online-softmax update on
 * the score rows with a vector 2^x, then probabilities x values 6 rows x 16 columns at a time. Keys and values
 * are packed by attention.c's packers (qk_attn_pack_kv, qk_attn_pack_q). */
#include <immintrin.h>
#include <string.h>

#include "attention/attention.h"

#if QK_ATTN_QG != 12
#error "the row group is the packed query group"
#endif

#define AR 12 /* query rows per row group */
#define HR 6  /* rows per register tile */
#define NB QK_ATTN_NB
#define MASKED (-1e30f) /* score of a key after the query: finite, so (masked - max) stays finite */

/* The 2^x of attention.h (same clamp, n, r and degree-7 polynomial) with FMAs, times 2^(n >> 1) 2^(n - (n >> 1))
 * built in the exponent field (rounds once into subnormals; the clamp keeps both factors normal). */
static inline __m256 exp2_256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(QK_EXP2_LO)), _mm256_set1_ps(QK_EXP2_HI));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(QK_EXP2_C7);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QK_EXP2_C6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QK_EXP2_C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QK_EXP2_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QK_EXP2_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QK_EXP2_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(QK_EXP2_C1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

void qk_attn_exp2_avx2(const float *x, float *y, long n) {
    for (long i = 0; i < n; i += 8) {
        float t[8] = {0};
        memcpy(t, x + i, sizeof(float) * (size_t)(n - i < 8 ? n - i : 8));
        _mm256_storeu_ps(t, exp2_256(_mm256_loadu_ps(t)));
        memcpy(y + i, t, sizeof(float) * (size_t)(n - i < 8 ? n - i : 8));
    }
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* Sum of the 8 lanes in a fixed order: (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)). */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* sc (6 rows, stride NB) columns [jj, jj + 16) = queries . panel (d, NB) columns [jj, jj + 16); qt points at
 * the first of the 6 rows in the row group's (d, AR) transposed queries. */
static __attribute__((noinline)) void qk_tile(const float *qt, int d, const float *panel, int jj, float *sc) {
    __m256 acc0[HR], acc1[HR];
#pragma GCC unroll 6
    for (int r = 0; r < HR; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int c = 0; c < d; c++) {
        const __m256 k0 = _mm256_loadu_ps(panel + c * NB + jj), k1 = _mm256_loadu_ps(panel + c * NB + jj + 8);
#pragma GCC unroll 6
        for (int r = 0; r < HR; r++) {
            const __m256 qv = _mm256_broadcast_ss(qt + c * AR + r);
            acc0[r] = _mm256_fmadd_ps(qv, k0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(qv, k1, acc1[r]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < HR; r++) {
        _mm256_storeu_ps(sc + r * NB + jj, acc0[r]);
        _mm256_storeu_ps(sc + r * NB + jj + 8, acc1[r]);
    }
}

/* o (6 rows, stride dp) columns [0, 16) = alpha o + p (6 rows, stride NB) columns [0, nk) . vp (nk, stride dp). */
static __attribute__((noinline)) void pv_tile(const float *p, const float *vp, int dp, float *o, int nk,
                                              const float *alpha) {
    __m256 acc0[HR], acc1[HR];
#pragma GCC unroll 6
    for (int r = 0; r < HR; r++) {
        const __m256 al = _mm256_set1_ps(alpha[r]); /* the online-softmax rescale of what o holds */
        acc0[r] = _mm256_mul_ps(_mm256_loadu_ps(o + r * dp), al);
        acc1[r] = _mm256_mul_ps(_mm256_loadu_ps(o + r * dp + 8), al);
    }
    for (int j = 0; j < nk; j++) {
        const __m256 v0 = _mm256_loadu_ps(vp + (long)j * dp), v1 = _mm256_loadu_ps(vp + (long)j * dp + 8);
#pragma GCC unroll 6
        for (int r = 0; r < HR; r++) {
            const __m256 pv = _mm256_broadcast_ss(p + r * NB + j);
            acc0[r] = _mm256_fmadd_ps(pv, v0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(pv, v1, acc1[r]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < HR; r++) {
        _mm256_storeu_ps(o + r * dp, acc0[r]);
        _mm256_storeu_ps(o + r * dp + 8, acc1[r]);
    }
}

/* Max of a score row's first nv 8-key vectors and the running max m. With `diag` (some key of the block lies
 * after some row's position) the keys after `last` (the row's last visible key, counted from the block's first)
 * first get the MASKED score. */
static inline float masked_row_max(float *sr, int nv, int diag, int last, float m) {
    __m256 mx = _mm256_set1_ps(m);
    if (diag) {
        const __m256 iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), lim = _mm256_set1_ps((float)last);
        for (int v = 0; v < nv; v++) {
            const __m256 hide = _mm256_cmp_ps(_mm256_add_ps(iota, _mm256_set1_ps(8.0f * v)), lim, _CMP_GT_OQ);
            const __m256 sv = _mm256_blendv_ps(_mm256_loadu_ps(sr + 8 * v), _mm256_set1_ps(MASKED), hide);
            _mm256_storeu_ps(sr + 8 * v, sv);
            mx = _mm256_max_ps(mx, sv);
        }
    } else {
        for (int v = 0; v < nv; v++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + 8 * v));
    }
    return hmax8(mx);
}

void qk_attn_unit_avx2(const qk_attn_args *a, int u, float *scratch) {
    int bi, g, qb;
    qk_attn_unit_coords(a, u, &bi, &g, &qb);
    const int d = a->d, dp = a->dp, tp = a->tpad, n_rep = a->n_heads / a->kv_heads, offset = a->t - a->s;
    const int q0 = qb * a->qblock, q1 = q0 + a->qblock < a->s ? q0 + a->qblock : a->s;
    const int nkeys = offset + q1, npad = (nkeys + NB - 1) / NB * NB;
    float *kt = scratch;                   /* (tpad / NB, d, NB) */
    float *vp = kt + (long)d * tp;         /* (tpad, dp) */
    float *qall = vp + (long)tp * dp;      /* (qrows, d) scaled queries, qk_attn_qidx layout */
    float *sc = qall + (long)a->qrows * d; /* (AR, NB) scores, then probabilities */
    float *o = sc + AR * NB;               /* (AR, dp) unnormalized output */
    float *lv = o + AR * dp;               /* (AR, 8) running sums, per lane */
    float m[16], mn[16], alpha[16];        /* running max, this block's max, rescale factor (rows 0..AR-1) */
    qk_attn_pack_kv(a, bi, g, nkeys, npad, kt, vp);
    qk_attn_pack_q(a, bi, g, q0, q1, qall);
    const int nrows = (q1 - q0) * n_rep;
    for (int row0 = 0; row0 < nrows; row0 += AR) {
        const int rows = nrows - row0 < AR ? nrows - row0 : AR;
        const float *qt = qall + qk_attn_qidx(a, row0, 0); /* (d, AR) */
        int pos[AR];
        qk_attn_row_positions(a, q0, row0, rows, AR, pos);
        for (int rr = 0; rr < 16; rr++) m[rr] = rr < AR ? MASKED : 0.0f;
        for (int rr = 0; rr < AR; rr++) _mm256_storeu_ps(lv + rr * 8, _mm256_setzero_ps());
        memset(o, 0, sizeof(float) * AR * dp);
        const int first = pos[0], last = pos[rows - 1]; /* key positions of the first/last row */
        const int halves = rows > HR ? 2 : 1;
        for (int j0 = 0; j0 <= last; j0 += NB) {
            const int nk = last + 1 - j0 < NB ? last + 1 - j0 : NB; /* keys any row of the group sees */
            const float *panel = kt + (long)j0 * d;
            for (int h = 0; h < halves; h++)
                for (int jj = 0; jj < nk; jj += 16) qk_tile(qt + h * HR, d, panel, jj, sc + h * HR * NB);
            const int nv = (nk + 7) / 8;
            const int diag = j0 + 8 * nv - 1 > first; /* some key is after some row's position */
            const int nr = halves * HR; /* rows with scores this block (past `rows`: copies of the last) */
            for (int rr = 0; rr < nr; rr++) mn[rr] = masked_row_max(sc + rr * NB, nv, diag, pos[rr] - j0, m[rr]);
            for (int rr = nr; rr < 16; rr++) mn[rr] = 0.0f;
            for (int x = 0; x < 16; x += 8) { /* all rows' rescale factors: first block 2^(-1e30 - m) = 0 */
                const __m256 mold = _mm256_loadu_ps(m + x), mnew = _mm256_loadu_ps(mn + x);
                _mm256_storeu_ps(alpha + x, exp2_256(_mm256_sub_ps(mold, mnew)));
                _mm256_storeu_ps(m + x, mnew);
            }
            for (int rr = 0; rr < nr; rr++) {
                float *sr = sc + rr * NB;
                const __m256 mv = _mm256_set1_ps(mn[rr]);
                __m256 lsum = _mm256_mul_ps(_mm256_loadu_ps(lv + rr * 8), _mm256_set1_ps(alpha[rr]));
                for (int v = 0; v < nv; v++) {
                    const __m256 pv = exp2_256(_mm256_sub_ps(_mm256_loadu_ps(sr + 8 * v), mv));
                    _mm256_storeu_ps(sr + 8 * v, pv);
                    lsum = _mm256_add_ps(lsum, pv);
                }
                _mm256_storeu_ps(lv + rr * 8, lsum);
            }
            const float *vb = vp + (long)j0 * dp;
            for (int h = 0; h < halves; h++)
                for (int c0 = 0; c0 < dp; c0 += 16)
                    pv_tile(sc + h * HR * NB, vb + c0, dp, o + h * HR * dp + c0, nk, alpha + h * HR);
        }
        for (int rr = 0; rr < rows; rr++) {
            const int i = q0 + (row0 + rr) / n_rep, h = g * n_rep + (row0 + rr) % n_rep;
            float *dst = a->out + ((long)bi * a->s + i) * ((long)a->n_heads * d) + (long)h * d;
            const float l = hsum8(_mm256_loadu_ps(lv + rr * 8));
            for (int c = 0; c < d; c++) dst[c] = o[rr * dp + c] / l;
        }
    }
}
