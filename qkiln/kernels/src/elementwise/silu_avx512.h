/* silu_avx512.h — SiLU·up on 16 float32 lanes, shared by the element-wise kernels (elementwise_avx512.c)
 * and the AMX gate/up linear that applies it to its output tiles (x86/bf16.c), so the fused and the separate
 * paths give the same bits. The including file is compiled with -mavx512f. */
#ifndef QKILN_SILU_AVX512_H
#define QKILN_SILU_AVX512_H

#include <immintrin.h>

#include "elementwise/elementwise.h"

/* qk_ew_expf's algorithm on 16 lanes with FMAs (SiLU is compute-bound in cache: FMAs halve its time), so
 * not the same bits as the portable variant: the reduction r = x - n ln2 and the polynomial round once
 * per step instead of twice, and vscalefps forms p * 2^n (one rounding into subnormals, +inf for n = 128).
 * max_ps(x, LO) returns LO for NaN x, as the portable clamp does; the clamp also keeps x = -inf from
 * giving r = -inf + inf. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(QK_EW_EXP_LO));
    x = _mm512_min_ps(x, _mm512_set1_ps(QK_EW_EXP_HI));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(QK_EW_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(QK_EW_LN2_HI), x); /* exact, as in the portable variant */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(QK_EW_LN2_LO), r);
    __m512 p = _mm512_set1_ps(QK_EW_P7);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(QK_EW_P6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(QK_EW_P5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(QK_EW_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(QK_EW_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(QK_EW_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* g / (1 + e^-g) * u */
static inline __m512 silu_mul512(__m512 g, __m512 u) {
    const __m512 e = exp512(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

#endif
