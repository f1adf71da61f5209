/* pow2.h — p · 2^n for the kernels' exponential polynomials (attention's 2^x, element-wise e^x): scaling
 * by 2^(n >> 1) and then 2^(n - (n >> 1)) lets results below FLT_MIN round once into subnormals, and both
 * factors stay normal floats for n in [-252, 254]. n is an integer held in a float. */
#ifndef QKILN_POW2_H
#define QKILN_POW2_H

#include <stdint.h>
#include <string.h>

static inline float qk_times_pow2(float p, float n) {
    const int32_t ni = (int32_t)n;
    const int32_t n1 = ni >> 1, n2 = ni - n1;
    const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    return (p * s1) * s2;
}

#endif
