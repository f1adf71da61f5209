/* vec.h — GCC/Clang vector-extension helpers of the portable kernel units (element-wise rows, GPTQ's row loops,
 * the portable attention unit): plain C that becomes SSE2, AVX2, AVX-512 or NEON code by what the unit is
 * compiled for. The includer defines QK_VEC_LANES (floats per vector) first; vf and vi are that many float32
 * and int32 lanes. Loads and stores go through memcpy (no alignment asked of the caller). */
#ifndef QKILN_VEC_H
#define QKILN_VEC_H

#include <stdint.h>
#include <string.h>

#ifndef QK_VEC_LANES
#error "define QK_VEC_LANES (floats per vector) before including vec.h"
#endif

typedef float vf __attribute__((vector_size(4 * QK_VEC_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * QK_VEC_LANES)));

#define QK_VEC_INLINE static inline __attribute__((always_inline)) /* vectors never cross a call (-Wpsabi) */
#pragma GCC diagnostic ignored "-Wpsabi"

QK_VEC_INLINE vf ldv(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

QK_VEC_INLINE void stv(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* f in every lane. */
QK_VEC_INLINE vf splat(float f) {
    float t[QK_VEC_LANES];
    for (int l = 0; l < QK_VEC_LANES; l++) t[l] = f;
    return ldv(t);
}

/* m ? a : b lane by lane (C has no vector ?:); m is a comparison's all-ones / zero lanes. */
QK_VEC_INLINE vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

#endif
