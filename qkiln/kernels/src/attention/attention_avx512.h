/* attention_avx512.h — AVX-512 pieces shared by the float32 AVX-512 unit and the bf16 units (all compiled
 * with -mavx512f): the softmax's vector 2^x, the masked-score value, a score row's masking and max, and (from
 * x86/transpose16.h) the 16 x 16 transpose of 32-bit lanes. */
#ifndef QKILN_ATTENTION_AVX512_H
#define QKILN_ATTENTION_AVX512_H

#include <immintrin.h>

#include "attention/attention.h"
#include "x86/transpose16.h"

#define MASKED (-1e30f) /* score of a key after the query: finite, so (masked - max) stays finite */

/* Max of a score row's first nv 16-key vectors and the running max m. With `diag` (some key of the block
 * lies after some row's position) the keys after `last` (the row's last visible key, counted from the block's
 * first) first get the MASKED score, with full stores: a masked store would stall the loads that follow. */
static inline __attribute__((always_inline)) float masked_row_max(float *sr, int nv, int diag, int last, float m) {
    __m512 mx = _mm512_set1_ps(m);
    if (diag) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 lim = _mm512_set1_ps((float)last);
        for (int v = 0; v < nv; v++) {
            const __mmask16 hide = _mm512_cmp_ps_mask(_mm512_add_ps(iota, _mm512_set1_ps(16.0f * v)), lim, _CMP_GT_OQ);
            const __m512 sv = _mm512_mask_mov_ps(_mm512_loadu_ps(sr + 16 * v), hide, _mm512_set1_ps(MASKED));
            _mm512_storeu_ps(sr + 16 * v, sv);
            mx = _mm512_max_ps(mx, sv);
        }
    } else {
        for (int v = 0; v < nv; v++) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + 16 * v));
    }
    return _mm512_reduce_max_ps(mx);
}

/* The 2^x of attention.h (same n, r, polynomial) with FMAs, and vscalefps for p * 2^n, which rounds once
 * into subnormals and gives 0 below them. No clamp: the kernel masks with a finite -1e30 (2^(-1e30 - m):
 * n = x, r = 0, scalef gives 0), and -inf is only for the test function, which clamps. `degree` (a
 * constant, 4..7) truncates the Taylor polynomial: 7 is the float32 one (~1 ulp); the bf16 unit uses 4,
 * relative error <= (ln2 / 2)^5 / 120 = 4.2e-5, far below the 2^-9 of rounding its probabilities to bf16. */
static inline __attribute__((always_inline)) __m512 exp2_512_degree(__m512 x, const int degree) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    const float c[8] = {1.0f, QK_EXP2_C1, QK_EXP2_C2, QK_EXP2_C3, QK_EXP2_C4, QK_EXP2_C5, QK_EXP2_C6, QK_EXP2_C7};
    __m512 p = _mm512_set1_ps(c[degree]);
    for (int i = degree - 1; i >= 0; i--) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 exp2_512(__m512 x) { return exp2_512_degree(x, 7); }

#endif
