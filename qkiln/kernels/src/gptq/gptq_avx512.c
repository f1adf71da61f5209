/* gptq_avx512.c — gptq_rows.h on 16-float vectors, compiled with AVX-512 (see gptq.c). */
#define QK_GPTQ_LANES 16
#define QK_GPTQ_SUFFIX avx512
#include "gptq/gptq_rows.h"
