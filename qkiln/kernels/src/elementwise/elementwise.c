/* elementwise.c — entry points of the element-wise kernels (argument checks, the run-time choice of
 * variant, an optional split of rows over threads) and their portable variant: plain loops and 8-float vector
 * extensions the compiler vectorizes (SSE2 on baseline x86-64 and AVX2 in target clones, NEON on aarch64). The
 * AVX-512 variant is in elementwise_avx512.c;
 * what each function computes and how it rounds: elementwise.h. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qkiln_kernels.h"
#include "cpu.h"
#include "elementwise/elementwise.h"
#include "threads.h"


/* ---- portable variant ----
 * Its row functions are built as GCC target clones on x86-64: AVX2 where the CPU has it (chosen at load), else
 * the baseline. "avx2" adds no FMA and the code contracts nothing (-ffp-contract=off), so every clone performs
 * the same operations on every element: the same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QK_EW_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define QK_EW_CLONES
#endif


QK_EW_CLONES static void rms_rows(const qk_ew_rms_args *a, long r0, long r1) {
    const long n = a->n, nfull = n / QK_EW_LANES * QK_EW_LANES;
    for (long i = r0; i < r1; i++) {
        const float *x = a->x + i * a->xs;
        double acc[QK_EW_LANES] = {0};
        for (long j = 0; j < nfull; j += QK_EW_LANES)
            for (int l = 0; l < QK_EW_LANES; l++) acc[l] += (double)x[j + l] * (double)x[j + l];
        for (long j = nfull; j < n; j++) acc[j - nfull] += (double)x[j] * (double)x[j];
        double s8[8];
        for (int l = 0; l < 8; l++) s8[l] = (acc[l] + acc[l + 8]) + (acc[l + 16] + acc[l + 24]);
        const float r = qk_ew_rms_scale(qk_ew_fold(s8), n, a->eps);
        const float *w = a->w;
        if (a->obf16) {
            uint16_t *o = (uint16_t *)a->out + i * n;
            for (long j = 0; j < n; j++) o[j] = qk_ew_bf16_bits((x[j] * r) * w[j]);
        } else {
            float *o = (float *)a->out + i * n;
            for (long j = 0; j < n; j++) o[j] = (x[j] * r) * w[j];
        }
    }
}

/* 8-float vectors (vec.h: two SSE2 or NEON registers, one AVX2 register in the AVX2 clone): GCC does not
 * if-convert qk_ew_expf's clamps in a plain loop without fast-math, so SiLU's exp is written on vectors, the
 * same operations lane by lane. */
#define VW 8
#define QK_VEC_LANES VW
#include "vec.h"

static inline vf expv(vf x) {
    x = sel(x > splat(QK_EW_EXP_LO), x, splat(QK_EW_EXP_LO)); /* NaN -> LO */
    x = sel(x < splat(QK_EW_EXP_HI), x, splat(QK_EW_EXP_HI));
    const vf n = (x * QK_EW_LOG2E + QK_EW_ROUND_SHIFT) - QK_EW_ROUND_SHIFT;
    const vf r = (x - n * QK_EW_LN2_HI) - n * QK_EW_LN2_LO;
    vf p = splat(QK_EW_P7);
    p = p * r + QK_EW_P6;
    p = p * r + QK_EW_P5;
    p = p * r + QK_EW_P4;
    p = p * r + QK_EW_P3;
    p = p * r + QK_EW_P2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi ni = __builtin_convertvector(n, vi);
    const vi n1 = ni >> 1, n2 = ni - n1;
    const vi b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    vf s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return (p * s1) * s2;
}

static inline vf siluv(vf g, vf u) { return g / (1.0f + expv(-g)) * u; }

/* VW results to o[j..j+VW) (float32), or their bfloat16 bits to ob[j..) when ob is not NULL; `count` of them. */
static inline void putv(float *o, uint16_t *ob, long j, vf y, long count) {
    float t[VW];
    stv(t, y);
    if (ob)
        for (long x = 0; x < count; x++) ob[j + x] = qk_ew_bf16_bits(t[x]);
    else
        memcpy(o + j, t, sizeof(float) * (size_t)count);
}

QK_EW_CLONES static void silu_rows(const qk_ew_silu_args *a, long r0, long r1) {
    const long n = a->n, nv = n / VW * VW;
    for (long i = r0; i < r1; i++) {
        const float *g = a->g + i * a->gs, *u = a->u + i * a->us;
        float *o = a->obf16 ? NULL : (float *)a->out + i * n;
        uint16_t *ob = a->obf16 ? (uint16_t *)a->out + i * n : NULL;
        for (long j = 0; j < nv; j += VW) putv(o, ob, j, siluv(ldv(g + j), ldv(u + j)), VW);
        if (nv < n) { /* the tail through a zero-padded vector */
            float gt[VW] = {0}, ut[VW] = {0};
            memcpy(gt, g + nv, sizeof(float) * (size_t)(n - nv));
            memcpy(ut, u + nv, sizeof(float) * (size_t)(n - nv));
            putv(o, ob, nv, siluv(ldv(gt), ldv(ut)), n - nv);
        }
    }
}

QK_EW_CLONES static void rope_rows(const qk_ew_rope_args *a, long r0, long r1) {
    const long half = a->d / 2;
    for (long row = r0; row < r1; row++) {
        const long bi = row / a->s, p = row % a->s;
        const float *c = a->cos + p * a->cs, *sn = a->sin + p * a->ss;
        for (long h = 0; h < a->h; h++) {
            const float *x1 = a->x + bi * a->xb + p * a->xsp + h * a->xh, *x2 = x1 + half;
            float *o1 = a->out + (row * a->h + h) * a->d, *o2 = o1 + half;
            for (long j = 0; j < half; j++) {
                o1[j] = x1[j] * c[j] - x2[j] * sn[j];
                o2[j] = x2[j] * c[j] + x1[j] * sn[j];
            }
        }
    }
}

/* The clones behind plain symbols (a clone's resolver would be exported with it). */
void qk_ew_rms_rows_portable(const qk_ew_rms_args *a, long r0, long r1) { rms_rows(a, r0, r1); }
void qk_ew_silu_rows_portable(const qk_ew_silu_args *a, long r0, long r1) { silu_rows(a, r0, r1); }
void qk_ew_rope_rows_portable(const qk_ew_rope_args *a, long r0, long r1) { rope_rows(a, r0, r1); }

void qk_ew_exp_portable(const float *x, float *y, long n) {
    for (long i = 0; i < n; i += VW) {
        float t[VW] = {0};
        memcpy(t, x + i, sizeof(float) * (size_t)(n - i < VW ? n - i : VW));
        stv(t, expv(ldv(t)));
        memcpy(y + i, t, sizeof(float) * (size_t)(n - i < VW ? n - i : VW));
    }
}

/* ---- run-time choice of variant ---- */

/* Variant: 0 = best this CPU runs, 1 = portable, 2 = AVX-512. Which one `0` means here: */
int qk_elementwise_variant(void) { return qk_have_avx512() ? 2 : 1; }

typedef qk_range_fn rows_fn;

/* Row functions behind one signature (calling through a cast function pointer would be undefined). */
static void rms_p(const void *a, long r0, long r1) { qk_ew_rms_rows_portable(a, r0, r1); }
static void silu_p(const void *a, long r0, long r1) { qk_ew_silu_rows_portable(a, r0, r1); }
static void rope_p(const void *a, long r0, long r1) { qk_ew_rope_rows_portable(a, r0, r1); }
#if defined(__x86_64__)
static void rms_x(const void *a, long r0, long r1) { qk_ew_rms_rows_avx512(a, r0, r1); }
static void silu_x(const void *a, long r0, long r1) { qk_ew_silu_rows_avx512(a, r0, r1); }
static void rope_x(const void *a, long r0, long r1) { qk_ew_rope_rows_avx512(a, r0, r1); }
#endif

/* The row function of (kernel k, variant v), or NULL when v cannot run here. k: 0 rms, 1 silu, 2 rope. */
static rows_fn pick(int k, int variant) {
    if (variant == 0) variant = qk_elementwise_variant();
    if (variant == 1) return k == 0 ? rms_p : k == 1 ? silu_p : rope_p;
#if defined(__x86_64__)
    if (variant == 2 && qk_have_avx512()) return k == 0 ? rms_x : k == 1 ? silu_x : rope_x;
#endif
    return NULL;
}

/* ---- optional threads: contiguous row ranges, one per thread (rows cost the same), at most one per
 * 32768 floats so that small calls (a decode step) stay on the caller ---- */

static void run_rows(rows_fn fn, const void *args, long rows, long row_floats, int threads) {
    qk_run_rows(fn, args, rows, 1, (32768 + row_floats - 1) / (row_floats > 0 ? row_floats : 1), threads);
}

/* ---- entry points: 0 ok, -1 bad sizes, -2 variant unavailable. Strides in floats. ---- */

int qk_rms_norm(int variant, const float *x, long xs, const float *w, void *out, long t, long n, float eps,
                int threads, int obf16) {
    if (t < 0 || n < 1 || xs < n) return -1;
    rows_fn fn = pick(0, variant);
    if (!fn) return -2;
    const qk_ew_rms_args a = {x, w, out, t, n, xs, eps, obf16};
    run_rows(fn, &a, t, n, threads);
    return 0;
}

int qk_silu_mul(int variant, const float *g, long gs, const float *u, long us, void *out, long t, long n,
                int threads, int obf16) {
    if (t < 0 || n < 0 || gs < n || us < n) return -1;
    rows_fn fn = pick(1, variant);
    if (!fn) return -2;
    const qk_ew_silu_args a = {g, u, out, t, n, gs, us, obf16};
    run_rows(fn, &a, t, n, threads);
    return 0;
}

/* x (b, s, h, d) with strides xstr = {batch, position, head} in floats; cos/sin (s, d / 2), row strides cs
 * and ss; out (b, s, h, d) contiguous. d even. */
int qk_apply_rope(int variant, const float *x, const long *xstr, const float *cos, long cs, const float *sin,
                  long ss, float *out, long b, long s, long h, long d, int threads) {
    if (b < 0 || s < 0 || h < 0 || d < 0 || d % 2) return -1;
    rows_fn fn = pick(2, variant);
    if (!fn) return -2;
    const qk_ew_rope_args a = {x, cos, sin, out, b, s, h, d, xstr[0], xstr[1], xstr[2], cs, ss};
    run_rows(fn, &a, b * s, h * d, threads);
    return 0;
}

/* y = e^x with the variant's polynomial (for the error test). */
int qk_elementwise_exp(int variant, const float *x, float *y, long n) {
    if (variant == 0) variant = qk_elementwise_variant();
    if (variant == 1) {
        qk_ew_exp_portable(x, y, n);
        return 0;
    }
#if defined(__x86_64__)
    if (variant == 2 && qk_have_avx512()) {
        qk_ew_exp_avx512(x, y, n);
        return 0;
    }
#endif
    return -2;
}

/* ---- bfloat16 conversions for the NumPy products' inputs (qkiln/kernels/bf16.py): n values, one pass, no
 * threads (calibration's workers call them); integer operations only, so every clone gives the same bits. ---- */

QK_EW_CLONES static void round_values(const float *x, void *out, long n, int wide) {
    if (wide) {
        uint32_t *o = out;
        for (long i = 0; i < n; i++) o[i] = (uint32_t)qk_ew_bf16_bits(x[i]) << 16;
    } else {
        uint16_t *o = out;
        for (long i = 0; i < n; i++) o[i] = qk_ew_bf16_bits(x[i]);
    }
}

QK_EW_CLONES static void widen_values(const uint16_t *x, uint32_t *o, long n) {
    for (long i = 0; i < n; i++) o[i] = (uint32_t)x[i] << 16;
}

/* x rounded by qk_ew_bf16_bits: into `out` as bfloat16 bits (uint16), or with `wide` as the float32 values
 * they stand for (the bits in a float32's upper half). */
int qk_round_bf16(const float *x, void *out, long n, int wide) {
    if (n < 0) return -1;
    round_values(x, out, n, wide);
    return 0;
}

/* bfloat16 bits to the float32 values they stand for, exactly. */
int qk_widen_bf16(const uint16_t *x, float *out, long n) {
    if (n < 0) return -1;
    widen_values(x, (uint32_t *)out, n);
    return 0;
}
