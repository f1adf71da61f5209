/* x86-64 AVX-512 VNNI kernels (placeholder filled below). */
#include "../common.h"

void qk_fill_avx512(qk_kernels *k) { (void)k; }
