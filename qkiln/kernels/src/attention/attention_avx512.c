/* attention_avx512.c — the AVX-512F (+FMA) unit of the fused causal attention (layout, algorithm:
 * attention.h). Per group of 12 query rows and block of 64 keys: scores 12 x 32 at a time in 24 zmm
 * accumulators (keys along the vector, query elements broadcast), the online-softmax update on the score
 * rows with a vector exp, then probabilities x values 6 rows x 64 columns at a time (24 accumulators).
 * The hot loops are these two tiles; everything else is per row and per block. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "attention/attention.h"
#include "attention/attention_avx512.h"

#if QK_ATTN_QG != 12
#error "the row group is the packed query group"
#endif

#define AR 12 /* query rows per row group */
#define NB QK_ATTN_NB

void qk_attn_exp2_avx512(const float *x, float *y, long n) {
    const __m512 lo = _mm512_set1_ps(QK_EXP2_LO);
    long i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, exp2_512(_mm512_max_ps(_mm512_loadu_ps(x + i), lo)));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, exp2_512(_mm512_max_ps(_mm512_maskz_loadu_ps(m, x + i), lo)));
    }
}

/* The keys of qk_attn_pack_kv's Kt panels, 16 keys x 16 elements per in-register transpose (the scalar
 * strided copy was a quarter of a decode step); values are packed only when d is not a multiple of 16,
 * else the PV tile reads the source rows. */
static void pack_kv512(const qk_attn_args *a, int bi, int g, int nkeys, int npad, float *kt, float *vp) {
    const float *k = a->k + (long)bi * a->ks_b + (long)g * a->ks_h;
    const int d = a->d, d16 = d & ~15;
    for (int j0 = 0; j0 < npad; j0 += 16) {
        float *panel = kt + (long)(j0 / NB) * d * NB + j0 % NB;
        const int nj = nkeys - j0 < 16 ? (nkeys - j0 > 0 ? nkeys - j0 : 0) : 16;
        for (int c0 = 0; c0 < d16; c0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < nj ? _mm512_loadu_ps(k + (long)(j0 + i) * a->ks_t + c0) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(panel + (c0 + i) * NB, r[i]);
        }
        for (int c = d16; c < d; c++)
            for (int i = 0; i < 16; i++) panel[c * NB + i] = i < nj ? k[(long)(j0 + i) * a->ks_t + c] : 0.0f;
    }
    if (d % 16) {
        const float *v = a->v + (long)bi * a->vs_b + (long)g * a->vs_h;
        const int dp = a->dp;
        const __mmask16 tail = (__mmask16)((1u << (d % 16)) - 1);
        for (int j = 0; j < nkeys; j++)
            for (int c = 0; c < dp; c += 16) {
                const __mmask16 mk = c + 16 <= d ? (__mmask16)0xffff : tail;
                _mm512_storeu_ps(vp + (long)j * dp + c, _mm512_maskz_loadu_ps(mk, v + (long)j * a->vs_t + c));
            }
    }
}

/* qk_attn_pack_q by in-register transposes: a row group's 12 query rows (x 16 elements) become 16 columns of
 * 12, stored masked; the next group's rows are prefetched (positions are a page apart). Same products, so
 * the same bits as the portable packer. */
static void pack_q512(const qk_attn_args *a, int bi, int g, int q0, int q1, float *qp) {
    const int d = a->d, d16 = d & ~15, n_rep = a->n_heads / a->kv_heads, nrows = (q1 - q0) * n_rep;
    const __m512 scale = _mm512_set1_ps((float)(QK_LOG2E / sqrt((double)d)));
    const float *base = a->q + (long)bi * a->qs_b + (long)q0 * a->qs_s + (long)g * n_rep * a->qs_h;
#define QROW(row) (base + (long)((row) / n_rep) * a->qs_s + (long)((row) % n_rep) * a->qs_h)
    for (int row0 = 0; row0 < a->qrows; row0 += AR) {
        const int nr = nrows - row0 < AR ? (nrows - row0 > 0 ? nrows - row0 : 0) : AR;
        for (int i = 0; i < AR && row0 + AR + i < nrows; i++)
            for (int c = 0; c < d; c += 16) _mm_prefetch((const char *)(QROW(row0 + AR + i) + c), _MM_HINT_T0);
        float *dst = qp + qk_attn_qidx(a, row0, 0); /* (d, AR) */
        for (int c0 = 0; c0 < d16; c0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < nr ? _mm512_mul_ps(_mm512_loadu_ps(QROW(row0 + i) + c0), scale) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_mask_storeu_ps(dst + (c0 + i) * AR, (__mmask16)0x0fff, r[i]);
        }
        for (int c = d16; c < d; c++)
            for (int i = 0; i < AR; i++) dst[c * AR + i] = i < nr ? QROW(row0 + i)[c] * scale[0] : 0.0f;
    }
#undef QROW
}

/* sc (AR, NB) columns [jj, jj + 32) = queries . panel (d, NB) columns [jj, jj + 32); qt is the row group's
 * (d, AR) transposed queries. */
static __attribute__((noinline)) void qk_tile(const float *qt, int d, const float *panel, int jj, float *sc) {
    __m512 acc0[AR], acc1[AR];
#pragma GCC unroll 12
    for (int r = 0; r < AR; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int c = 0; c < d; c++) {
        const __m512 k0 = _mm512_loadu_ps(panel + c * NB + jj), k1 = _mm512_loadu_ps(panel + c * NB + jj + 16);
#pragma GCC unroll 12
        for (int r = 0; r < AR; r++) {
            const __m512 qv = _mm512_set1_ps(qt[c * AR + r]);
            acc0[r] = _mm512_fmadd_ps(qv, k0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(qv, k1, acc1[r]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < AR; r++) {
        _mm512_storeu_ps(sc + r * NB + jj, acc0[r]);
        _mm512_storeu_ps(sc + r * NB + jj + 16, acc1[r]);
    }
}

/* o (6 rows, stride dp) columns [0, 16 NV) = alpha o + p (6 rows, stride NB) columns [0, nk) . vp (nk, stride vs). */
static inline __attribute__((always_inline)) void pv_tile(const int NV, const float *p, const float *vp, long vs,
                                                          int dp, float *o, int nk, const float *alpha) {
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) {
        const __m512 al = _mm512_set1_ps(alpha[r]); /* the online-softmax rescale of what o holds */
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o + r * dp + 16 * v), al);
    }
    for (int j = 0; j < nk; j++) {
        __m512 vv[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) vv[v] = _mm512_loadu_ps(vp + j * vs + 16 * v);
#pragma GCC unroll 6
        for (int r = 0; r < 6; r++) {
            const __m512 pv = _mm512_set1_ps(p[r * NB + j]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(pv, vv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(o + r * dp + 16 * v, acc[r][v]);
}

static void pv_rows6(const float *p, const float *vp, long vs, int dp, float *o, int nk, const float *alpha) {
    for (int c0 = 0; c0 < dp; c0 += 64) {
        switch ((dp - c0) / 16) {
        case 1: pv_tile(1, p, vp + c0, vs, dp, o + c0, nk, alpha); break;
        case 2: pv_tile(2, p, vp + c0, vs, dp, o + c0, nk, alpha); break;
        case 3: pv_tile(3, p, vp + c0, vs, dp, o + c0, nk, alpha); break;
        default: pv_tile(4, p, vp + c0, vs, dp, o + c0, nk, alpha); break;
        }
    }
}

void qk_attn_unit_avx512(const qk_attn_args *a, int u, float *scratch) {
    int bi, g, qb;
    qk_attn_unit_coords(a, u, &bi, &g, &qb);
    const int d = a->d, dp = a->dp, tp = a->tpad, n_rep = a->n_heads / a->kv_heads, offset = a->t - a->s;
    const int q0 = qb * a->qblock, q1 = q0 + a->qblock < a->s ? q0 + a->qblock : a->s;
    const int nkeys = offset + q1, npad = (nkeys + NB - 1) / NB * NB;
    float *kt = scratch;                 /* (tpad / NB, d, NB) */
    float *vp = kt + (long)d * tp;       /* (tpad, dp) */
    float *qall = vp + (long)tp * dp;    /* (qrows, d) scaled queries, qk_attn_qidx layout */
    float *sc = qall + (long)a->qrows * d; /* (AR, NB) scores, then probabilities */
    float *o = sc + AR * NB;             /* (AR, dp) unnormalized output */
    float *lv = o + AR * dp;             /* (AR, 16) running sums, per lane */
    float m[16], mn[16], alpha[16];      /* running max, this block's max, rescale factor (rows 0..AR-1) */
    pack_kv512(a, bi, g, nkeys, npad, kt, vp);
    pack_q512(a, bi, g, q0, q1, qall);
    /* values: the source rows when d is a multiple of 16, else the padded copy */
    const float *vsrc = d % 16 ? vp : a->v + (long)bi * a->vs_b + (long)g * a->vs_h;
    const long vs = d % 16 ? dp : a->vs_t;
    const int nrows = (q1 - q0) * n_rep;
    for (int row0 = 0; row0 < nrows; row0 += AR) {
        const int rows = nrows - row0 < AR ? nrows - row0 : AR;
        const float *qt = qall + qk_attn_qidx(a, row0, 0); /* (d, AR) */
        int pos[AR];
        qk_attn_row_positions(a, q0, row0, rows, AR, pos);
        for (int rr = 0; rr < 16; rr++) m[rr] = rr < AR ? MASKED : 0.0f;
        for (int rr = 0; rr < AR; rr++) _mm512_storeu_ps(lv + rr * 16, _mm512_setzero_ps());
        memset(o, 0, sizeof(float) * AR * dp);
        const int first = pos[0], last = pos[rows - 1]; /* key positions of the first/last row */
        for (int rr = 0; rr < rows; rr++) { /* the output rows are scattered: fetch them while we compute */
            const int i = q0 + (row0 + rr) / n_rep, h = g * n_rep + (row0 + rr) % n_rep;
            const char *dst = (const char *)(a->out + ((long)bi * a->s + i) * ((long)a->n_heads * d) +
                                             (long)h * d);
            for (int c = 0; c < d * 4; c += 64) _mm_prefetch(dst + c, _MM_HINT_T0);
        }
        for (int j0 = 0; j0 <= last; j0 += NB) {
            const int nk = last + 1 - j0 < NB ? last + 1 - j0 : NB; /* keys any row of the group sees */
            const float *panel = kt + (long)j0 * d;
            qk_tile(qt, d, panel, 0, sc);
            if (nk > 32) qk_tile(qt, d, panel, 32, sc);
            const int nv = (nk + 15) / 16;
            const int diag = j0 + 16 * nv - 1 > first; /* some key is after some row's position */
            /* Block maxima per row (masking keys after the row's position), then all rows' rescale
             * factors in one vector exp: no data-dependent branch. */
            for (int rr = 0; rr < AR; rr++) mn[rr] = masked_row_max(sc + rr * NB, nv, diag, pos[rr] - j0, m[rr]);
            for (int rr = AR; rr < 16; rr++) mn[rr] = 0.0f;
            const __m512 mold = _mm512_loadu_ps(m), mnew = _mm512_loadu_ps(mn);
            _mm512_storeu_ps(alpha, exp2_512(_mm512_sub_ps(mold, mnew))); /* first block: 2^(-1e30 - m) = 0 */
            _mm512_storeu_ps(m, mnew);
            for (int rr = 0; rr < AR; rr++) {
                float *sr = sc + rr * NB;
                const __m512 mv = _mm512_set1_ps(mn[rr]);
                __m512 lsum = _mm512_mul_ps(_mm512_loadu_ps(lv + rr * 16), _mm512_set1_ps(alpha[rr]));
                for (int v = 0; v < nv; v++) {
                    const __m512 pv = exp2_512(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * v), mv));
                    _mm512_storeu_ps(sr + 16 * v, pv);
                    lsum = _mm512_add_ps(lsum, pv);
                }
                _mm512_storeu_ps(lv + rr * 16, lsum);
            }
            pv_rows6(sc, vsrc + j0 * vs, vs, dp, o, nk, alpha);
            if (rows > 6) pv_rows6(sc + 6 * NB, vsrc + j0 * vs, vs, dp, o + 6 * dp, nk, alpha + 6);
        }
        for (int rr = 0; rr < rows; rr++) {
            const int i = q0 + (row0 + rr) / n_rep, h = g * n_rep + (row0 + rr) % n_rep;
            float *dst = a->out + ((long)bi * a->s + i) * ((long)a->n_heads * d) + (long)h * d;
            const __m512 l = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_loadu_ps(lv + rr * 16)));
            int c = 0;
            for (; c + 16 <= d; c += 16) _mm512_storeu_ps(dst + c, _mm512_div_ps(_mm512_loadu_ps(o + rr * dp + c), l));
            if (c < d) {
                const __mmask16 mk = (__mmask16)((1u << (d - c)) - 1);
                _mm512_mask_storeu_ps(dst + c, mk, _mm512_div_ps(_mm512_loadu_ps(o + rr * dp + c), l));
            }
        }
    }
}

/* Values: out[c] = sum_j p[j] v[j][c] / l for NV (a constant) 16-float column vectors from column c0. */
static inline __attribute__((always_inline)) void head_values(const int NV, const float *p, const float *v, long vs,
                                                              int n, int c0, __m512 l, float *out) {
    __m512 acc[4];
    for (int x = 0; x < NV; x++) acc[x] = _mm512_setzero_ps();
    for (int j = 0; j < n; j++) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        const float *vr = v + (long)j * vs + c0;
        for (int x = 0; x < NV; x++) acc[x] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * x), acc[x]);
    }
    for (int x = 0; x < NV; x++) _mm512_storeu_ps(out + c0 + 16 * x, _mm512_div_ps(acc[x], l));
}

/* qk_attn_head_fn for d % 16 == 0, d <= QK_ATTN_HEAD_AVX512_MAX_D. Scores 16 keys at a time: each key's
 * d-long product as one vector of 16 partial sums, the 16 vectors transposed and added, so the tile's scores
 * come out as one vector (no horizontal sum per key); then the softmax with exp2_512 and the values, 64
 * columns per pass over the probabilities. */
void qk_attn_head_avx512(const float *q, const float *k, long ks, const float *v, long vs, int n, int d, float *out,
                         float *sc) {
    const int nv = d / 16;
    float qs[QK_ATTN_HEAD_AVX512_MAX_D] __attribute__((aligned(64)));
    const __m512 scale = _mm512_set1_ps((float)(QK_LOG2E / sqrt((double)d)));
    for (int x = 0; x < nv; x++) _mm512_store_ps(qs + 16 * x, _mm512_mul_ps(_mm512_loadu_ps(q + 16 * x), scale));
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int j0 = 0; j0 < n; j0 += 16) {
        const int cnt = n - j0 < 16 ? n - j0 : 16;
        __m512 r[16];
        for (int j = 0; j < 16; j++) {
            __m512 acc = _mm512_setzero_ps();
            if (j < cnt) {
                const float *kr = k + (long)(j0 + j) * ks;
                for (int x = 0; x < nv; x++)
                    acc = _mm512_fmadd_ps(_mm512_load_ps(qs + 16 * x), _mm512_loadu_ps(kr + 16 * x), acc);
            }
            r[j] = acc;
        }
        transpose16(r);
        for (int w = 8; w > 0; w /= 2)
            for (int j = 0; j < w; j++) r[j] = _mm512_add_ps(r[j], r[j + w]);
        const __mmask16 m = (__mmask16)((1u << cnt) - 1);
        _mm512_mask_storeu_ps(sc + j0, m, r[0]);
        mx = _mm512_mask_max_ps(mx, m, mx, r[0]);
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int j0 = 0; j0 < n; j0 += 16) {
        const __mmask16 m = (__mmask16)((1u << (n - j0 < 16 ? n - j0 : 16)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(m, exp2_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j0), mv)));
        _mm512_mask_storeu_ps(sc + j0, m, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 l = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    int x = 0;
    for (; x + 4 <= nv; x += 4) head_values(4, sc, v, vs, n, 16 * x, l, out);
    for (; x < nv; x++) head_values(1, sc, v, vs, n, 16 * x, l, out);
}
