/* elementwise.h — RMSNorm, SiLU·up and RoPE on float32 rows, shared by the portable and AVX-512 files.
 *
 * The three functions NumPy spends several passes on in a transformer layer (runtime/llama.py rms_norm,
 * silu_mul; runtime/rope.py apply_rope), done in one pass per row. Every rounding step is the one NumPy
 * does, in the same order, with no FMA contraction, so:
 *   apply_rope  equals NumPy bit for bit (two products and one add/sub per element, as NumPy does them);
 *   rms_norm    differs only in the sum of squares: float64 here (each x² is exact in float64, 16 lanes,
 *               a fixed order), float32 with NumPy's own order there; the float64 sum rounded to float32
 *               is within 1 ulp of exact, NumPy's float32 sum within a few ulp, and r = 1/sqrt(ms + eps)
 *               moves by half the relative change of ms;
 *   silu_mul    differs only in e^x (this file's polynomial, within 1.2 ulp, vs NumPy's SIMD expf).
 * For rms_norm and apply_rope the portable and AVX-512 variants perform the same operations in the same
 * order on every element (the AVX-512 file contracts nothing; x² in float64 is exact, so its FMA there
 * changes nothing), so they give the same bits; the test checks it. silu_mul's AVX-512 e^x uses FMAs
 * (half the time), so the two variants' silu_mul may differ in the last bit.
 */
#ifndef QKILN_ELEMENTWISE_H
#define QKILN_ELEMENTWISE_H

#include <stdint.h>
#include <string.h>

#include "pow2.h"

/* Arguments in floats; rows are a stride apart, elements inside a row contiguous. */
typedef struct {
    const float *x;    /* (t, n), row stride xs */
    const float *w;    /* (n,) */
    void *out;         /* (t, n) contiguous: float32, or bfloat16 bits when obf16 */
    long t, n, xs;
    float eps;
    int obf16;
} qk_ew_rms_args;

typedef struct {
    const float *g, *u; /* (t, n), row strides gs, us */
    void *out;          /* (t, n) contiguous: float32, or bfloat16 bits when obf16 */
    long t, n, gs, us;
    int obf16;
} qk_ew_silu_args;

typedef struct {
    const float *x;          /* (b, s, h, d), strides xb, xs, xh; d contiguous */
    const float *cos, *sin;  /* (s, d / 2), row strides cs, ss */
    float *out;              /* (b, s, h, d) contiguous */
    long b, s, h, d, xb, xsp, xh, cs, ss;
} qk_ew_rope_args;

/* e^x for SiLU: n = round(x log2 e), r = x - n ln2 in two steps (Cody-Waite: ln2_hi has 9 significant
 * bits, so n * ln2_hi is exact for |n| <= 2^15 and x - n * ln2_hi is exact), degree-7 Taylor polynomial of
 * e^r on |r| <= 0.35 (truncation 5e-9 relative), times 2^(n >> 1) * 2^(n - (n >> 1)), which rounds once
 * into subnormals and overflows to +inf for n = 128 like expf. x is clamped to [-104, 89] first, where
 * e^x is already 0 (below half the least subnormal) or +inf (above FLT_MAX); NaN becomes -104 (the
 * callers' results are NaN through the other operand). Branch-free, so compilers vectorize loops over it. */
#define QK_EW_EXP_LO (-104.0f)
#define QK_EW_EXP_HI 89.0f
#define QK_EW_LOG2E 1.44269504088896341f
#define QK_EW_LN2_HI 0.693359375f        /* 355 / 512 */
#define QK_EW_LN2_LO (-2.12194440054690583e-4f) /* ln 2 - LN2_HI */
#define QK_EW_P2 0.5f                    /* 1 / k! */
#define QK_EW_P3 0.166666666666666667f
#define QK_EW_P4 0.0416666666666666667f
#define QK_EW_P5 0.00833333333333333333f
#define QK_EW_P6 0.00138888888888888889f
#define QK_EW_P7 0.000198412698412698413f
#define QK_EW_ROUND_SHIFT 12582912.0f /* 1.5 * 2^23: v + shift - shift rounds v to the nearest even integer */

static inline float qk_ew_expf(float x) {
    x = x > QK_EW_EXP_LO ? x : QK_EW_EXP_LO; /* NaN -> LO */
    x = x < QK_EW_EXP_HI ? x : QK_EW_EXP_HI;
    const float n = (x * QK_EW_LOG2E + QK_EW_ROUND_SHIFT) - QK_EW_ROUND_SHIFT;
    const float r = (x - n * QK_EW_LN2_HI) - n * QK_EW_LN2_LO;
    float p = QK_EW_P7;
    p = p * r + QK_EW_P6;
    p = p * r + QK_EW_P5;
    p = p * r + QK_EW_P4;
    p = p * r + QK_EW_P3;
    p = p * r + QK_EW_P2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return qk_times_pow2(p, n);
}

/* Lanes of the float64 sum of squares: element j of a row goes to lane j % 32 (the AVX-512 file's four
 * 8-double accumulators); the 32 lanes are folded as (lane[l] + lane[l + 8]) + (lane[l + 16] + lane[l + 24])
 * into 8, then summed in qk_ew_fold's order. */
#define QK_EW_LANES 32
static inline double qk_ew_fold(const double s[8]) {
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* 1 / sqrt(ms + eps) exactly as NumPy computes it in float32: ms = float32(sum) / float32(n). */
static inline float qk_ew_rms_scale(double ss, long n, float eps) {
    const float ms = (float)ss / (float)n;
    return 1.0f / __builtin_sqrtf(ms + eps);
}

/* float32 -> bfloat16 bits by the rule of the AMX products' inputs (x86/bf16.c, qkiln/kernels/bf16.py round_bf16):
 * denormals flushed to a zero of the same sign, round to nearest even (overflow to inf), NaN kept quiet. */
static inline uint16_t qk_ew_bf16_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    b = (b & 0x7f800000u) ? b : (b & 0x80000000u); /* selects, no branches: loops over it vectorize */
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16, quiet = (b | 0x00400000u) >> 16;
    return (uint16_t)((b & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

void qk_ew_rms_rows_portable(const qk_ew_rms_args *a, long r0, long r1);
void qk_ew_silu_rows_portable(const qk_ew_silu_args *a, long r0, long r1);
void qk_ew_rope_rows_portable(const qk_ew_rope_args *a, long r0, long r1); /* rows = (batch, position) */
void qk_ew_exp_portable(const float *x, float *y, long n);
#if defined(__x86_64__)
void qk_ew_rms_rows_avx512(const qk_ew_rms_args *a, long r0, long r1);
void qk_ew_silu_rows_avx512(const qk_ew_silu_args *a, long r0, long r1);
void qk_ew_rope_rows_avx512(const qk_ew_rope_args *a, long r0, long r1);
void qk_ew_exp_avx512(const float *x, float *y, long n);
#endif

#endif
