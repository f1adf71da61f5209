/* aarch64 baseline Advanced SIMD (Armv8.0, e.g. Cortex-A72 / Graviton1): widening multiplies, pairwise adds.
 * Two int8 products fit an int16 lane (|w| <= 128, |a| <= 127), so each 16-wide dot is exact. */
#include <arm_neon.h>

static inline int32x4_t DOT16(int32x4_t acc, int8x16_t w, int8x16_t a) {
    int16x8_t t = vmull_s8(vget_low_s8(w), vget_low_s8(a));
    t = vmlal_s8(t, vget_high_s8(w), vget_high_s8(a));
    return vpadalq_s16(acc, t);
}

#define FILL_NAME qk_fill_neon
#include "arm_rows.h"
