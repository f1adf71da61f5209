/* gptq_avx2.c — gptq_rows.h on 8-float vectors, compiled with AVX2 (see gptq.c). */
#define QK_GPTQ_LANES 8
#define QK_GPTQ_SUFFIX avx2
#include "gptq/gptq_rows.h"
