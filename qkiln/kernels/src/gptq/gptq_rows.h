/* gptq_rows.h — the row loops of gptq.c, compiled once per variant: the includer defines QK_GPTQ_LANES
 * (floats per vector) and QK_GPTQ_SUFFIX (portable, avx2, avx512). Portable C on GCC/Clang vector extensions;
 * every variant performs the same float32 operations in the same order, so all give the same bits. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gptq/gptq.h"

#define LANES QK_GPTQ_LANES
#define QK_VEC_LANES LANES
#include "vec.h"
#define QK_PASTE2(a, b) a##_##b
#define QK_PASTE(a, b) QK_PASTE2(a, b)
#define ROWS_FN(name) QK_PASTE(name, QK_GPTQ_SUFFIX)

#define INLINE QK_VEC_INLINE
#define FLOOR_LIMIT 4194304.0f /* 2^22 */

INLINE vi lane_index(void) {
    int32_t t[LANES];
    for (int l = 0; l < LANES; l++) t[l] = l;
    vi v;
    memcpy(&v, t, sizeof v);
    return v;
}

/* The first n (1..LANES) floats at p, the other lanes `pad`: full vectors are one plain load. */
INLINE vf ldn(const float *p, long n, float pad) {
    if (n == LANES) return ldv(p);
    float t[LANES];
    for (int l = 0; l < LANES; l++) t[l] = l < n ? p[l] : pad;
    return ldv(t);
}

/* x rounded to an integer, ties to even (rint), for |x| < 2^22: adding 1.5·2^23 leaves no fraction bits. */
INLINE vf round_even(vf x) { return (x + 12582912.0f) - 12582912.0f; }

INLINE int any(vi m) {
    int32_t t[LANES];
    memcpy(t, &m, sizeof t);
    int r = 0;
    for (int l = 0; l < LANES; l++) r |= t[l];
    return r != 0;
}

/* floor(x + 0.5) + shift clamped to [qmin, qmax]: the code of (w - offset) / scale = x (grid rule). */
INLINE vf code_of(vf x, float shift, float qmin, float qmax) {
    vf y = x + 0.5f;
    y = sel(y > splat(-FLOOR_LIMIT), y, splat(-FLOOR_LIMIT));
    y = sel(y < splat(FLOOR_LIMIT), y, splat(FLOOR_LIMIT));
    vf t = __builtin_convertvector(__builtin_convertvector(y, vi), vf); /* toward zero */
    t = sel(t > y, t - 1.0f, t);                                          /* floor */
    t = t + shift;
    t = sel(t < splat(qmin), splat(qmin), t);
    return sel(t > splat(qmax), splat(qmax), t);
}

#define TILE_VECS 4 /* rows per tile: 4 vectors, whose e stays in registers through the rank-1 update */

/* Rows [r0, r1) of columns k0..k1-1, one tile of rows at a time. The tile's slice of the block is copied
 * to a contiguous buffer (count x TW floats) for the scan and back after: in place, the rows of w1 are
 * `out` floats apart — a multiple of 4 KB for out = 3072 — and all fall in the same few L1 sets. */
void ROWS_FN(qk_gptq_scan_rows)(const void *pa, long r0, long r1) {
    enum { TW = TILE_VECS * LANES };
    const scan_args_t *a = (const scan_args_t *)pa;
    const long out = a->out, count = a->count, k0 = a->k0;
    vf *buf = aligned_alloc(sizeof(vf), (size_t)(count - k0) * TW * sizeof(float));
    if (!buf) {
        ((scan_args_t *)pa)->oom = 1;
        return;
    }
    for (long t0 = r0; t0 < r1; t0 += TW) {
        const long t1 = t0 + TW < r1 ? t0 + TW : r1, nt = t1 - t0;
        const long nv = nt / LANES; /* full vectors; a partial one is zero padded in the buffer */
        float *bw = (float *)buf - k0 * TW;            /* bw + j * TW: column j's tile */
        for (long j = k0; j < count; j++) {
            memcpy(bw + j * TW, a->w1 + j * out + t0, (size_t)nt * 4);
            memset(bw + j * TW + nt, 0, (size_t)(TW - nt) * 4);
        }
        for (long k = k0; k < a->k1; k++) {
            const long g = a->gidx[k];
            const float d = a->h1[k * a->ldh + k];
            const float *col = bw + k * TW, *s = a->scale_t + g * out + t0, *o = a->offset_t + g * out + t0;
            const float *ss = a->safe_t + g * out + t0;
            float *err = a->err1 + k * out + t0;
            uint8_t *code = a->codes + k * out + t0;
            vf ev[TILE_VECS];
            for (long v = 0; v * LANES < nt; v++) {
                const long r = v * LANES, n = nt - r < LANES ? nt - r : LANES;
                const vf w = ldv(col + r), sc = ldn(s + r, n, 0.0f), off = ldn(o + r, n, 0.0f);
                const vf q = code_of((w - off) / ldn(ss + r, n, 1.0f), a->shift, a->qmin, a->qmax);
                const vf e = ev[v] = (w - ((q - a->shift) * sc + off)) / d;
                float qv[LANES], et[LANES];
                stv(qv, q);
                stv(et, e);
                memcpy(err + r, et, (size_t)n * 4);
                for (long l = 0; l < n; l++) code[r + l] = (uint8_t)qv[l];
            }
            /* w1[j] -= U_kj · e for the block's later columns: product, then difference (NumPy's order);
             * padding lanes stay 0 - U_kj · 0 = 0 */
            const float *hrow = a->h1 + k * a->ldh;
            if (nv == TILE_VECS) {
                for (long j = k + 1; j < count; j++) {
                    float *wj = bw + j * TW;
                    const float hj = hrow[j];
                    for (int v = 0; v < TILE_VECS; v++) stv(wj + v * LANES, ldv(wj + v * LANES) - hj * ev[v]);
                }
            } else {
                const long vecs = (nt + LANES - 1) / LANES;
                for (long j = k + 1; j < count; j++) {
                    float *wj = bw + j * TW;
                    const float hj = hrow[j];
                    for (long v = 0; v < vecs; v++) stv(wj + v * LANES, ldv(wj + v * LANES) - hj * ev[v]);
                }
            }
        }
        for (long j = k0; j < count; j++) memcpy(a->w1 + j * out + t0, bw + j * TW, (size_t)nt * 4);
    }
    free(buf);
}

/* x >= 0 (float32, finite) rounded to the nearest float16 value, ties to even, as NumPy's astype(float16)
 * does: +inf from 65520 on; 10 fraction bits for normals (integer rounding of the float32 bits, a carry
 * moving into the exponent as it should); multiples of 2^-24 below 2^-14 (float16 subnormals). */
INLINE vf fp16_round(vf x) {
    const vi b = (vi)x;
    const vf normal = (vf)((b + 0x0fff + ((b >> 13) & 1)) & ~0x1fff);
    const vf sub = round_even(x * 16777216.0f) * 5.9604644775390625e-08f; /* x·2^24 < 2^10: exact */
    const vf r = sel(x < splat(6.103515625e-05f), sub, normal);
    return sel(x >= splat(65520.0f), splat(__builtin_inff()), r);
}

void ROWS_FN(qk_gptq_fit_rows)(const void *pa, long r0, long r1) {
    fit_args_t *a = (fit_args_t *)pa;
    const long rows = a->rows, g = a->group;
    const float qmax = a->qmax, shift = a->shift, half = qmax / 2.0f;
    vf *wb = aligned_alloc(sizeof(vf), (size_t)g * sizeof(vf)); /* a group of LANES rows: column c is wb[c] */
    if (!wb) {
        a->oom = 1;
        return;
    }
    for (long gi = 0; gi < a->ng; gi++) {
        const float *wg = a->wt + gi * g * rows, *imp = a->imp + gi * g;
        for (long r = r0; r < r1; r += LANES) {
            const long n = r1 - r < LANES ? r1 - r : LANES;
            /* the block's weights once, and their min/max with 0 (padding lanes hold zeros) */
            vf lo = splat(0.0f), hi = splat(0.0f);
            for (long c = 0; c < g; c++) {
                const vf w = wb[c] = ldn(wg + c * rows + r, n, 0.0f);
                lo = sel(w < lo, w, lo);
                hi = sel(w > hi, w, hi);
            }
            if (a->symmetric) hi = sel(-lo > hi, -lo, hi); /* amax */
            const vi live = lane_index() < (int)n;
            vf best_err = splat(0.0f), best_s = splat(0.0f), best_z = splat(0.0f);
            for (int t = 0; t < a->nshrink; t++) {
                const float f = a->shrink[t];
                const vf lt = t ? lo * f : lo, ht = t ? hi * f : hi; /* the first factor is 1: no product */
                vf sc, zf, off;
                if (a->symmetric) {
                    sc = fp16_round(ht / half);
                    zf = splat(shift);
                    off = splat(0.0f);
                } else {
                    sc = fp16_round((ht - lt) / qmax);
                    const vi pos = sc > splat(0.0f);
                    vf z = round_even(-lt / sel(pos, sc, splat(1.0f)));
                    z = sel(z < splat(0.0f), splat(0.0f), z);
                    z = sel(z > splat(qmax), splat(qmax), z);
                    zf = sel(pos, z, splat(0.0f));
                    off = -zf * sc;
                }
                if (any(live & (sc == splat(__builtin_inff())))) a->overflow = 1;
                const vi nz = sc != splat(0.0f);
                const vf safe = sel(nz, sc, splat(1.0f));
                vf err = splat(0.0f);
                for (long c = 0; c < g; c++) {
                    const vf w = wb[c];
                    const vf x = sel(nz, (w - off) / safe, splat(0.0f));
                    const vf q = code_of(x, shift, 0.0f, qmax);
                    const vf dq = (q - zf) * sc - w; /* (code - zero) is exact in float32 */
                    err = err + (dq * dq) * imp[c];
                }
                const vi take = t == 0 ? lane_index() >= 0 : err < best_err; /* strictly better */
                best_err = sel(take, err, best_err);
                best_s = sel(take, sc, best_s);
                best_z = sel(take, zf, best_z);
            }
            float sv[LANES], zv[LANES];
            stv(sv, best_s);
            stv(zv, best_z);
            for (long l = 0; l < n; l++) {
                const _Float16 h16 = (_Float16)sv[l]; /* exact: sv is a float16 value */
                memcpy(&a->scale[(r + l) * a->ng + gi], &h16, 2);
                if (!a->symmetric) a->zero[(r + l) * a->ng + gi] = (uint8_t)zv[l];
            }
        }
    }
    free(wb);
}

