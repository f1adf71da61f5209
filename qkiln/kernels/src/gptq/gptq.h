/* gptq.h — the GPTQ inner loops' arguments and their per-ISA row functions (gptq_rows.h is compiled once
 * per variant: gptq.c portable, gptq_avx512.c AVX-512). What the loops compute: gptq.c. */
#ifndef QKILN_GPTQ_H
#define QKILN_GPTQ_H

#include <stdint.h>

typedef struct {
    float *w1;             /* (count, out) the block's error-updated weights, scan order */
    float *err1;           /* (count, out) e of each coded column */
    uint8_t *codes;        /* (count, out) */
    const float *h1;       /* U[i1.., i1..], row stride ldh */
    const int32_t *gidx;   /* (count,) group of each block position */
    const float *scale_t;  /* (n_groups, out) */
    const float *safe_t;   /* (n_groups, out): scale with 0 -> +inf */
    const float *offset_t; /* (n_groups, out) */
    long count, out, ldh, k0, k1;
    float shift, qmin, qmax;
    int oom; /* set (a racy write of 1, read after the join) when a thread cannot get its buffer */
} scan_args_t;

typedef struct {
    const float *wt;     /* (cols, rows): the weight transposed, so 8 rows are one vector */
    const float *imp;    /* (cols,) */
    const float *shrink; /* (nshrink,) range factors, the first 1 */
    uint16_t *scale;     /* (rows, ng) float16 bits */
    uint8_t *zero;       /* (rows, ng), asymmetric only */
    long cols, rows, group, ng;
    int nshrink, symmetric;
    float qmax, shift;
    int overflow, oom; /* set (racy writes of 1, read after the join): a scale overflows float16 / no memory */
} fit_args_t;

void qk_gptq_scan_rows_portable(const void *args, long r0, long r1);
void qk_gptq_fit_rows_portable(const void *args, long r0, long r1);
#if defined(__x86_64__)
void qk_gptq_scan_rows_avx512(const void *args, long r0, long r1);
void qk_gptq_fit_rows_avx512(const void *args, long r0, long r1);
void qk_gptq_scan_rows_avx2(const void *args, long r0, long r1);
void qk_gptq_fit_rows_avx2(const void *args, long r0, long r1);
#endif

#endif
