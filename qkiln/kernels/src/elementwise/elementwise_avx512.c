/* elementwise_avx512.c — the AVX-512F variant of the element-wise kernels: 16 floats per instruction,
 * masked loads and stores for the tail of a row. rms_norm and apply_rope do the same operations in the
 * same order as the portable variant (elementwise.h; no FMA is contracted: -ffp-contract=off), so they
 * give the same bits; silu_mul's e^x uses FMAs (see exp512). */
#include <immintrin.h>
#include <string.h>

#include "elementwise/elementwise.h"
#include "elementwise/silu_avx512.h"

/* Lanes [0, left) of 16 (none when left <= 0). */
static inline __mmask16 tail_mask(long left) {
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

void qk_ew_exp_avx512(const float *x, float *y, long n) {
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, exp512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* qk_ew_bf16_bits on 16 lanes, in 32-bit lanes (AVX-512F integer operations: no AVX512_BF16 needed). */
static inline __m512i bf16_bits512(__m512 f) {
    __m512i b = _mm512_castps_si512(f);
    const __mmask16 denormal = _mm512_testn_epi32_mask(b, _mm512_set1_epi32(0x7f800000));
    b = _mm512_mask_and_epi32(b, denormal, b, _mm512_set1_epi32((int)0x80000000u));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_epi32(b, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i odd = _mm512_and_epi32(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_srli_epi32(_mm512_or_epi32(b, _mm512_set1_epi32(0x00400000)), 16);
    return _mm512_mask_blend_epi32(nan, rounded, quiet);
}

/* Hot: one read of the row for the float64 sum of squares (lanes j % 32 in four accumulators, so four
 * FMA chains overlap; elementwise.h), one to scale. */
void qk_ew_rms_rows_avx512(const qk_ew_rms_args *a, long r0, long r1) {
    const long n = a->n;
    for (long i = r0; i < r1; i++) {
        const float *x = a->x + i * a->xs;
        __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
        for (long j = 0; j < n; j += 32) { /* acc[k] lane l: elements j + 8k + l */
            for (int h = 0; h < 2; h++) {
                const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - j - 16 * h), x + j + 16 * h);
                const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
                acc[2 * h] = _mm512_fmadd_pd(lo, lo, acc[2 * h]); /* x² is exact in float64: as a multiply-add */
                acc[2 * h + 1] = _mm512_fmadd_pd(hi, hi, acc[2 * h + 1]);
            }
        }
        double s8[8];
        _mm512_storeu_pd(s8, _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
        const __m512 r = _mm512_set1_ps(qk_ew_rms_scale(qk_ew_fold(s8), n, a->eps));
        for (long j = 0; j < n; j += 16) {
            const __mmask16 m = tail_mask(n - j);
            const __m512 v = _mm512_maskz_loadu_ps(m, x + j), w = _mm512_maskz_loadu_ps(m, a->w + j);
            const __m512 y = _mm512_mul_ps(_mm512_mul_ps(v, r), w);
            if (a->obf16) _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)a->out + i * n + j, m, bf16_bits512(y));
            else _mm512_mask_storeu_ps((float *)a->out + i * n + j, m, y);
        }
    }
}

/* Hot: g / (1 + e^-g) * u, one pass over both inputs. */
void qk_ew_silu_rows_avx512(const qk_ew_silu_args *a, long r0, long r1) {
    const long n = a->n;
    for (long i = r0; i < r1; i++) {
        const float *g = a->g + i * a->gs, *u = a->u + i * a->us;
        for (long j = 0; j < n; j += 16) {
            const __mmask16 m = tail_mask(n - j);
            const __m512 y = silu_mul512(_mm512_maskz_loadu_ps(m, g + j), _mm512_maskz_loadu_ps(m, u + j));
            if (a->obf16) _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)a->out + i * n + j, m, bf16_bits512(y));
            else _mm512_mask_storeu_ps((float *)a->out + i * n + j, m, y);
        }
    }
}

void qk_ew_rope_rows_avx512(const qk_ew_rope_args *a, long r0, long r1) {
    const long half = a->d / 2;
    for (long row = r0; row < r1; row++) {
        const long bi = row / a->s, p = row % a->s;
        const float *c = a->cos + p * a->cs, *sn = a->sin + p * a->ss;
        for (long h = 0; h < a->h; h++) {
            const float *x1 = a->x + bi * a->xb + p * a->xsp + h * a->xh, *x2 = x1 + half;
            float *o1 = a->out + (row * a->h + h) * a->d, *o2 = o1 + half;
            for (long j = 0; j < half; j += 16) {
                const __mmask16 m = tail_mask(half - j);
                const __m512 a1 = _mm512_maskz_loadu_ps(m, x1 + j), a2 = _mm512_maskz_loadu_ps(m, x2 + j);
                const __m512 cv = _mm512_maskz_loadu_ps(m, c + j), sv = _mm512_maskz_loadu_ps(m, sn + j);
                _mm512_mask_storeu_ps(o1 + j, m, _mm512_sub_ps(_mm512_mul_ps(a1, cv), _mm512_mul_ps(a2, sv)));
                _mm512_mask_storeu_ps(o2 + j, m, _mm512_add_ps(_mm512_mul_ps(a2, cv), _mm512_mul_ps(a1, sv)));
            }
        }
    }
}
