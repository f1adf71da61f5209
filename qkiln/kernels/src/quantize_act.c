/* quantize_act.c — activations to int8 per 32-value block (llama.cpp's Q8_0 rule): what every product
 * multiplies against. Scale = max|x| / 127, codes rounded half to even and clamped to [-127, 127] (never
 * -128, which the AVX2 sign trick would negate wrongly), and each block's integer sum for the zero-point and
 * offset corrections. The reference; x86/quantize_act_avx512.c gives the same bytes (dispatch.c's qk_quantize_q8
 * picks the path's). */
#include "common.h"

void qk_quantize_q8_ref(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums) {
    const int nb = K / QK8;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)m * K + b * QK8;
            int8_t *qb = qs + (size_t)m * K + b * QK8;
            float amax = 0.0f;
            for (int j = 0; j < QK8; j++) {
                const float v = xb[j] < 0 ? -xb[j] : xb[j];
                amax = v > amax ? v : amax;
            }
            const float db = amax / 127.0f;
            const float id = db != 0.0f ? 1.0f / db : 0.0f;
            int s = 0;
            for (int j = 0; j < QK8; j++) {
                /* round half to even (adding 1.5 * 2^23 and subtracting it), the same as NumPy's rint */
                float r = (xb[j] * id + 12582912.0f) - 12582912.0f;
                r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
                qb[j] = (int8_t)(int)r;
                s += (int)r;
            }
            d[(size_t)m * nb + b] = db;
            sums[(size_t)m * nb + b] = s;
        }
    }
}
