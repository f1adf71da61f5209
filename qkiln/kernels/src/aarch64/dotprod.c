/* Armv8.2 dot product (sdot; Neoverse N1 / Graviton2 and later): 4 int8 products per int32 lane. */
#include <arm_neon.h>

static inline int32x4_t DOT16(int32x4_t acc, int8x16_t w, int8x16_t a) { return vdotq_s32(acc, w, a); }

#define FILL_NAME qk_fill_dotprod
#include "arm_rows.h"
