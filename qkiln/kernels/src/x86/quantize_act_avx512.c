/* quantize_act_avx512.c — qk_quantize_q8 on AVX-512: the same operations as quantize_act.c's reference, one
 * 32-value block per step, so the codes, scales and sums are bit-identical (max of |x|, db = amax / 127,
 * id = 1 / db, x * id rounded half to even by the same 1.5 * 2^23 addition, clamped to [-127, 127]). A prompt's
 * activations are about as many values as the products' weights, so the scalar loop cost as much as the batched
 * products themselves. */
#include <immintrin.h>

#include "../common.h"

void qk_quantize_q8_avx512(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums) {
    const int nb = K / QK8;
    const __m512 magic = _mm512_set1_ps(12582912.0f), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)m * K + (size_t)b * QK8;
            int8_t *qb = qs + (size_t)m * K + (size_t)b * QK8;
            const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float db = amax / 127.0f;
            const __m512 id = _mm512_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
            const __m512 r0 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v0, id), magic), magic);
            const __m512 r1 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v1, id), magic), magic);
            const __m512i i0 = _mm512_cvttps_epi32(_mm512_max_ps(_mm512_min_ps(r0, hi), lo));
            const __m512i i1 = _mm512_cvttps_epi32(_mm512_max_ps(_mm512_min_ps(r1, hi), lo));
            _mm_storeu_si128((__m128i *)qb, _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(qb + 16), _mm512_cvtepi32_epi8(i1));
            d[(size_t)m * nb + b] = db;
            sums[(size_t)m * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        }
}
