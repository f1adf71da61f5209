/* gptq.c — the two loops of GPTQ that NumPy cannot vectorize well, on uniform integer grids
 * (value = code - shift, codes clamped to [qmin, qmax]: INT4/INT8, Q4_0/Q5_0/Q8_0, the K-quants' codes):
 *
 *   qk_gptq_scan   the column-by-column scan inside one lazy block: code a column on its fixed
 *                  (scale, offset), turn the rounding error into e = (w - q) / U_kk and subtract
 *                  U_kj · e from every later column of the block;
 *   qk_int_fit_t   IntGrid's importance-weighted range search: per (row, group), 20 shrunk min/max
 *                  ranges, each coded and scored by Σ imp · (decoded - w)², the least error kept.
 *
 * Both are the NumPy definitions in quantize/gptq.py (`_scan_numpy`) and quantize/int_grid.py
 * (`IntGrid.fit`) done in one pass, with the same float32 operations in the same order and no FMA
 * contraction (the library is built with -ffp-contract=off), so they give the same bits; the tests check
 * it. Every output row (weight row) is independent of the others in both loops, so rows are split over
 * threads and the result does not depend on the thread count.
 *
 * Portable C on 16-float vectors of GCC's vector extension; on x86-64 the two row loops are compiled for
 * AVX-512, AVX2 and baseline SSE2 and the CPU's best copy runs (the same operations, so the same bits).
 * floor() is done on vectors as truncation toward zero minus one where that rounded up, after clamping
 * to ±2^22 (where every float is exact as an int32): the clamp cannot change a code, which is clamped to
 * [qmin, qmax] ⊂ [0, 255] afterwards.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* 16 floats: one AVX-512 register in the avx512f clone, two AVX2 or four SSE2/NEON registers otherwise. */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

#define LANES 16
#define INLINE static inline __attribute__((always_inline)) /* vectors never cross a call (-Wpsabi) */
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__x86_64__)
/* one compiled copy per ISA, chosen when the library loads (GCC function multiversioning) */
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#define MAX_THREADS 16
#define FLOOR_LIMIT 4194304.0f /* 2^22 */

INLINE vf ldv(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void stv(float *p, vf v) { memcpy(p, &v, sizeof v); }

INLINE vf splat(float f) { return (vf){f, f, f, f, f, f, f, f, f, f, f, f, f, f, f, f}; }

/* m ? a : b lane by lane; m is a comparison's all-ones / zero lanes. */
INLINE vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

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

/* Run fn(i) for thread i in [0, n), the caller being thread 0. */
typedef struct {
    void (*fn)(const void *, long, long);
    const void *args;
    long r0, r1;
} part_t;

static void *part_main(void *p) {
    const part_t *t = (const part_t *)p;
    if (t->r0 < t->r1) t->fn(t->args, t->r0, t->r1);
    return NULL;
}

/* Split rows [0, rows) over n threads in multiples of LANES; each part runs fn(args, r0, r1). */
static void split_rows(void (*fn)(const void *, long, long), const void *args, long rows, int n) {
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    const long blocks = (rows + LANES - 1) / LANES;
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (n > blocks / 4) n = (int)(blocks / 4); /* at least 32 rows a thread */
    if (n < 1) n = 1;
    part_t parts[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < n; i++) {
        long r0 = blocks * i / n * LANES, r1 = blocks * (i + 1) / n * LANES;
        parts[i] = (part_t){fn, args, r0, r1 < rows ? r1 : rows};
    }
    for (int i = 1; i < n; i++) started[i] = pthread_create(&th[i], NULL, part_main, &parts[i]) == 0;
    part_main(&parts[0]);
    for (int i = 1; i < n; i++) {
        if (started[i]) pthread_join(th[i], NULL);
        else part_main(&parts[i]);
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* the scan inside a lazy block                                                                           */

typedef struct {
    float *w1;             /* (count, out) the block's error-updated weights, scan order */
    float *err1;           /* (count, out) e of each coded column */
    uint8_t *codes;        /* (count, out) */
    const float *h1;       /* U[i1.., i1..], row stride ldh */
    const int32_t *gidx;   /* (count,) group of each block position */
    const float *scale_t;  /* (n_groups, out) */
    const float *safe_t;   /* (n_groups, out): scale with 0 -> +inf */
    const float *offset_t; /* (n_groups, out) */
    long count, out, ldh, k0, k1;
    float shift, qmin, qmax;
} scan_args_t;

/* Rows [r0, r1) of columns k0..k1-1, in tiles of 64 rows so a tile's block (count x 64 floats) stays in
 * L1/L2 for the whole scan. */
CLONES static void scan_rows(const void *pa, long r0, long r1) {
    const scan_args_t *a = (const scan_args_t *)pa;
    const long out = a->out;
    for (long t0 = r0; t0 < r1; t0 += 64) {
        const long t1 = t0 + 64 < r1 ? t0 + 64 : r1;
        for (long k = a->k0; k < a->k1; k++) {
            const long g = a->gidx[k];
            const float d = a->h1[k * a->ldh + k];
            float *col = a->w1 + k * out, *err = a->err1 + k * out;
            const float *s = a->scale_t + g * out, *ss = a->safe_t + g * out, *o = a->offset_t + g * out;
            uint8_t *code = a->codes + k * out;
            for (long r = t0; r < t1; r += LANES) {
                const long n = t1 - r < LANES ? t1 - r : LANES;
                float cv[LANES] = {0}, sv[LANES] = {0}, ssv[LANES], ov[LANES] = {0};
                for (int l = 0; l < LANES; l++) ssv[l] = 1.0f;
                memcpy(cv, col + r, (size_t)n * 4);
                memcpy(sv, s + r, (size_t)n * 4);
                memcpy(ssv, ss + r, (size_t)n * 4);
                memcpy(ov, o + r, (size_t)n * 4);
                const vf w = ldv(cv), sc = ldv(sv), off = ldv(ov);
                const vf q = code_of((w - off) / ldv(ssv), a->shift, a->qmin, a->qmax);
                const vf e = (w - ((q - a->shift) * sc + off)) / d;
                float ev[LANES], qv[LANES];
                stv(ev, e);
                stv(qv, q);
                memcpy(err + r, ev, (size_t)n * 4);
                for (long l = 0; l < n; l++) code[r + l] = (uint8_t)qv[l];
            }
            const float *hrow = a->h1 + k * a->ldh;
            for (long j = k + 1; j < a->count; j++) {
                const float hj = hrow[j];
                float *wj = a->w1 + j * out;
                for (long r = t0; r < t1; r++) wj[r] -= hj * err[r];
            }
        }
    }
}

int qk_gptq_scan(float *w1, float *err1, uint8_t *codes, long count, long out, const float *h1, long ldh,
                 long k0, long k1, const int32_t *gidx, const float *scale_t, const float *safe_t,
                 const float *offset_t, float shift, float qmin, float qmax, int nthreads) {
    if (count < 0 || out < 0 || k0 < 0 || k1 > count || k0 > k1 || ldh < count) return -1;
    if (!(qmin >= 0.0f && qmax <= 255.0f && qmin <= qmax)) return -1;
    const scan_args_t a = {w1, err1, codes, h1, gidx, scale_t, safe_t, offset_t, count, out, ldh, k0, k1,
                           shift, qmin, qmax};
    if (out > 0 && k1 > k0) split_rows(scan_rows, &a, out, nthreads);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* IntGrid's importance-weighted range search                                                           */

typedef struct {
    const float *wt;     /* (cols, rows): the weight transposed, so 8 rows are one vector */
    const float *imp;    /* (cols,) */
    const float *shrink; /* (nshrink,) range factors, the first 1 */
    uint16_t *scale;     /* (rows, ng) float16 bits */
    uint8_t *zero;       /* (rows, ng), asymmetric only */
    long cols, rows, group, ng;
    int nshrink, symmetric;
    float qmax, shift;
    int overflow; /* set (racy write of 1, read after join) when a scale overflows float16 */
} fit_args_t;

INLINE float round_fp16(float x, uint16_t *bits) {
    const _Float16 h = (_Float16)x; /* round to nearest even, as NumPy's astype(float16) */
    memcpy(bits, &h, 2);
    return (float)h;
}

CLONES static void fit_rows(const void *pa, long r0, long r1) {
    fit_args_t *a = (fit_args_t *)pa;
    const long rows = a->rows, g = a->group;
    const float qmax = a->qmax, shift = a->shift, half = qmax / 2.0f;
    for (long gi = 0; gi < a->ng; gi++) {
        const float *wg = a->wt + gi * g * rows, *imp = a->imp + gi * g;
        for (long r = r0; r < r1; r += LANES) {
            const long n = r1 - r < LANES ? r1 - r : LANES;
            /* min/max of the group, each row in a lane (padding lanes see zeros) */
            float lov[LANES], hiv[LANES];
            for (int l = 0; l < LANES; l++) lov[l] = hiv[l] = 0.0f;
            for (long c = 0; c < g; c++) {
                for (long l = 0; l < n; l++) {
                    const float w = wg[c * rows + r + l];
                    lov[l] = w < lov[l] ? w : lov[l];
                    hiv[l] = w > hiv[l] ? w : hiv[l];
                }
            }
            float best_err[LANES] = {0};
            uint16_t best_bits[LANES] = {0};
            uint8_t best_z[LANES] = {0};
            for (int t = 0; t < a->nshrink; t++) {
                const float f = a->shrink[t];
                float sv[LANES], ov[LANES], zv[LANES];
                uint16_t bits[LANES];
                uint8_t zq[LANES];
                for (int l = 0; l < LANES; l++) {
                    float lo = lov[l], hi = hiv[l];
                    if (a->symmetric) {
                        hi = -lo > hi ? -lo : hi; /* amax */
                        hi = t ? hi * f : hi;
                        sv[l] = round_fp16(hi / half, &bits[l]);
                        zq[l] = (uint8_t)shift;
                        ov[l] = 0.0f;
                    } else {
                        lo = t ? lo * f : lo;
                        hi = t ? hi * f : hi;
                        const float s = round_fp16((hi - lo) / qmax, &bits[l]);
                        float z = s > 0.0f ? __builtin_rintf(-lo / s) : 0.0f;
                        z = z < 0.0f ? 0.0f : z > qmax ? qmax : z;
                        zq[l] = (uint8_t)z;
                        sv[l] = s;
                        ov[l] = -(float)zq[l] * s;
                    }
                    if (l < n && !(sv[l] - sv[l] == 0.0f)) a->overflow = 1; /* inf or NaN */
                    zv[l] = (float)zq[l];
                }
                const vf sc = ldv(sv), off = ldv(ov), zf = ldv(zv);
                const vi nz = sc != splat(0.0f);
                const vf safe = sel(nz, sc, splat(1.0f));
                vf err = splat(0.0f);
                for (long c = 0; c < g; c++) {
                    float wv[LANES] = {0};
                    memcpy(wv, wg + c * rows + r, (size_t)n * 4);
                    const vf w = ldv(wv);
                    const vf x = sel(nz, (w - off) / safe, splat(0.0f));
                    const vf q = code_of(x, shift, 0.0f, qmax);
                    const vf dq = (q - zf) * sc - w; /* (code - zero) is exact in float32 */
                    err = err + (dq * dq) * imp[c];
                }
                float ev[LANES];
                stv(ev, err);
                for (int l = 0; l < LANES; l++) {
                    if (t == 0 || ev[l] < best_err[l]) {
                        best_err[l] = ev[l];
                        best_bits[l] = bits[l];
                        best_z[l] = zq[l];
                    }
                }
            }
            for (long l = 0; l < n; l++) {
                a->scale[(r + l) * a->ng + gi] = best_bits[l];
                if (!a->symmetric) a->zero[(r + l) * a->ng + gi] = best_z[l];
            }
        }
    }
}

/* Returns 0, 1 when some scale overflows float16 (the caller names the tensor), -1 on bad sizes. */
int qk_int_fit_t(const float *wt, long cols, long rows, long group, int bits, int symmetric, const float *imp,
                 const float *shrink, int nshrink, uint16_t *scale, uint8_t *zero, int nthreads) {
    if (cols <= 0 || rows < 0 || group <= 0 || cols % group || bits < 1 || bits > 8 || nshrink < 1) return -1;
    fit_args_t a = {wt, imp, shrink, scale, zero, cols, rows, group, cols / group, nshrink, symmetric != 0,
                    (float)((1 << bits) - 1), symmetric ? (float)(1 << (bits - 1)) : 0.0f, 0};
    if (rows > 0) split_rows(fit_rows, &a, rows, nthreads);
    return a.overflow ? 1 : 0;
}
