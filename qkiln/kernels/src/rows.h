/* rows.h — the row loops of every weight layout, written once. An ISA file (fallback/scalar.c, x86/avx2.c,
 * x86/avx512.c, aarch64/neon.c and dotprod.c through arm_rows.h, aarch64/sve.c) defines the inner products it
 * has, says which with QK_DOT_* macros, and includes this file, which then defines rows_<layout> for each
 * (NULL for the others) and qk_rows_fill() to enter them in a qk_kernels table. (The scheme of ggml-cpu's arch/<isa>/quants.c.)
 *
 *   QK_DOT_Q4_0, QK_DOT_Q8_0, QK_DOT_Q5_0, QK_DOT_Q4_1, QK_DOT_Q5_1, QK_DOT_Q2_K, QK_DOT_Q3_K, QK_DOT_Q4_K,
 *   QK_DOT_Q5_K, QK_DOT_Q6_K: one weight row
 *       against one activation row,
 *       static float dot_<t>(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nw)
 *       (nw blocks of the layout: 32 elements for the legacy types, 256 for the K-quants; ad/as per 32);
 *   QK_DOT4_Q4_0, QK_DOT4_Q8_0, QK_DOT4_Q5_0: optionally four consecutive rows at once (rows `stride` bytes apart),
 *       static void dot4_<t>(const uint8_t *w, size_t stride, const int8_t *a, const float *ad,
 *                            const int32_t *as, int nw, float out[4])  — the same value per row as dot_<t>;
 *   QK_DOT_INT4G: static float dot_int4g(const uint8_t *codes, const float *sc, const uint8_t *zp, int group,
 *                                        const int8_t *a, const float *ad, const int32_t *as, int nb);
 *   QK_DOT8_Q4_0X8, QK_DOT8_Q8_0X8, QK_DOT8_Q5_0X8, QK_DOT8_INT4GX8: one 8-row group of the X8 repacks, all 8 rows,
 *       static void dot8_<t>(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad,
 *                            const int32_t *as, const void *prep, float out[8])
 *       A file that defines QK_PREP8_BYTES(nb) also names, as QK_PREP8_<T> for each X8 layout, a
 *       static void prep(const int8_t *a, int nb, void *buf) that readies one activation row into that many
 *       bytes of 64-byte aligned scratch, passed back to dot8 as `prep`.
 *
 * Every output element is one inner product, written once, so the split of rows over threads never changes
 * a result. */
#ifndef QKILN_ROWS_H
#define QKILN_ROWS_H

#include <stdlib.h>

#include "common.h"

typedef float (*qk_dot_fn)(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nw);
typedef void (*qk_dot4_fn)(const uint8_t *w, size_t stride, const int8_t *a, const float *ad, const int32_t *as,
                           int nw, float out[4]);
typedef void (*qk_dot8_fn)(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                           const void *prep, float out[8]);
typedef void (*qk_prep8_fn)(const int8_t *a, int nb, void *buf);

/* Layouts whose row n is nw contiguous blocks of `bytes`: rows [n0, n1) for every activation row. */
static inline __attribute__((always_inline)) void qk_rows_blocks(const qk_job *j, int n0, int n1, int elems,
                                                                 int bytes, qk_dot_fn dot, qk_dot4_fn dot4) {
    const int nb = j->K / QK8, nw = j->K / elems;
    const size_t stride = (size_t)nw * bytes;
    int n = n0;
    if (dot4)
        for (; n + 4 <= n1; n += 4)
            for (int m = 0; m < j->M; m++) {
                float r[4];
                dot4(j->w + (size_t)n * stride, stride, j->qs + (size_t)m * j->K, j->d + (size_t)m * nb,
                     j->sums + (size_t)m * nb, nw, r);
                for (int i = 0; i < 4; i++) j->y[(size_t)m * j->N + n + i] = r[i];
            }
    for (; n < n1; n++) {
        const uint8_t *w = j->w + (size_t)n * stride;
        for (int m = 0; m < j->M; m++)
            j->y[(size_t)m * j->N + n] =
                dot(w, j->qs + (size_t)m * j->K, j->d + (size_t)m * nb, j->sums + (size_t)m * nb, nw);
    }
}

/* The X8 repacks: per activation row, each 8-row group overlapping [n0, n1) gives 8 results, of which those
 * inside the range are stored. */
static inline __attribute__((always_inline)) void qk_rows_x8(const qk_job *j, int n0, int n1, size_t group_bytes,
                                                             qk_prep8_fn prep, size_t prep_bytes, qk_dot8_fn dot8) {
    const int nb = j->K / QK8;
    void *buf = NULL;
    if (prep && !(buf = aligned_alloc(64, prep_bytes))) return;
    for (int m = 0; m < j->M; m++) {
        const int8_t *a = j->qs + (size_t)m * j->K;
        const float *ad = j->d + (size_t)m * nb;
        const int32_t *as = j->sums + (size_t)m * nb;
        if (prep) prep(a, nb, buf);
        for (int n = n0 & ~7; n < n1; n += 8) {
            float out[8];
            dot8(j, j->w + (size_t)(n / 8) * group_bytes, a, ad, as, buf, out);
            for (int r = 0; r < 8 && n + r < n1; r++)
                if (n + r >= n0) j->y[(size_t)m * j->N + n + r] = out[r];
        }
    }
    free(buf);
}

#ifndef QK_DOT4_Q4_0
#define dot4_q4_0 NULL
#endif
#ifndef QK_DOT4_Q8_0
#define dot4_q8_0 NULL
#endif
#ifndef QK_DOT4_Q5_0
#define dot4_q5_0 NULL
#endif
#ifndef QK_PREP8_BYTES /* no activation prep for the X8 layouts */
#define QK_PREP8_BYTES(nb) 0
#define QK_PREP8_Q4_0X8 NULL
#define QK_PREP8_Q8_0X8 NULL
#define QK_PREP8_Q5_0X8 NULL
#define QK_PREP8_INT4GX8 NULL
#endif

#ifdef QK_DOT_Q4_0
static void rows_q4_0(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QK8, Q4_0_BYTES, dot_q4_0, dot4_q4_0); }
#else
#define rows_q4_0 NULL
#endif
#ifdef QK_DOT_Q8_0
static void rows_q8_0(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QK8, Q8_0_BYTES, dot_q8_0, dot4_q8_0); }
#else
#define rows_q8_0 NULL
#endif
#ifdef QK_DOT_Q5_0
static void rows_q5_0(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QK8, Q5_0_BYTES, dot_q5_0, dot4_q5_0); }
#else
#define rows_q5_0 NULL
#endif
#ifdef QK_DOT_Q4_1
static void rows_q4_1(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QK8, Q4_1_BYTES, dot_q4_1, NULL); }
#else
#define rows_q4_1 NULL
#endif
#ifdef QK_DOT_Q5_1
static void rows_q5_1(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QK8, Q5_1_BYTES, dot_q5_1, NULL); }
#else
#define rows_q5_1 NULL
#endif
#ifdef QK_DOT_Q2_K
static void rows_q2_k(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QKK, Q2_K_BYTES, dot_q2_k, NULL); }
#else
#define rows_q2_k NULL
#endif
#ifdef QK_DOT_Q3_K
static void rows_q3_k(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QKK, Q3_K_BYTES, dot_q3_k, NULL); }
#else
#define rows_q3_k NULL
#endif
#ifdef QK_DOT_Q5_K
static void rows_q5_k(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QKK, Q5_K_BYTES, dot_q5_k, NULL); }
#else
#define rows_q5_k NULL
#endif
#ifdef QK_DOT_Q4_K
static void rows_q4_k(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QKK, Q4_K_BYTES, dot_q4_k, NULL); }
#else
#define rows_q4_k NULL
#endif
#ifdef QK_DOT_Q6_K
static void rows_q6_k(const qk_job *j, int n0, int n1) { qk_rows_blocks(j, n0, n1, QKK, Q6_K_BYTES, dot_q6_k, NULL); }
#else
#define rows_q6_k NULL
#endif

#ifdef QK_DOT_INT4G
/* INT4 with zero points: row n's codes are K/2 bytes, its scales and zero points K/group entries. */
static void rows_int4g(const qk_job *j, int n0, int n1) {
    const int nb = j->K / QK8, ng = j->K / j->group;
    for (int n = n0; n < n1; n++)
        for (int m = 0; m < j->M; m++)
            j->y[(size_t)m * j->N + n] =
                dot_int4g(j->w + (size_t)n * (j->K / 2), j->scales + (size_t)n * ng, j->zeros + (size_t)n * ng,
                          j->group, j->qs + (size_t)m * j->K, j->d + (size_t)m * nb, j->sums + (size_t)m * nb, nb);
}
#else
#define rows_int4g NULL
#endif

/* rows_<t> for an X8 layout whose 8-row groups are GROUP_BYTES apart. */
#define QK_ROWS_X8(T, GROUP_BYTES, PREP)                                                                   \
    static void rows_##T(const qk_job *j, int n0, int n1) {                                                 \
        qk_rows_x8(j, n0, n1, GROUP_BYTES, PREP, QK_PREP8_BYTES(j->K / QK8), dot8_##T);                     \
    }

#ifdef QK_DOT8_Q4_0X8
QK_ROWS_X8(q4_0x8, (size_t)(j->K / QK8) * Q4_0X8_BYTES, QK_PREP8_Q4_0X8)
#else
#define rows_q4_0x8 NULL
#endif
#ifdef QK_DOT8_Q8_0X8
QK_ROWS_X8(q8_0x8, (size_t)(j->K / QK8) * Q8_0X8_BYTES, QK_PREP8_Q8_0X8)
#else
#define rows_q8_0x8 NULL
#endif
#ifdef QK_DOT8_Q5_0X8
QK_ROWS_X8(q5_0x8, (size_t)(j->K / QK8) * Q5_0X8_BYTES, QK_PREP8_Q5_0X8)
#else
#define rows_q5_0x8 NULL
#endif
#ifdef QK_DOT8_INT4GX8
QK_ROWS_X8(int4gx8, (size_t)(j->K / j->group) * qk_int4gx8_group_bytes(j->group), QK_PREP8_INT4GX8)
#else
#define rows_int4gx8 NULL
#endif

/* Enter the row loops this file defined. */
static void qk_rows_fill(qk_kernels *k) {
    const qk_kernels mine = {{[QK_L_Q4_0] = rows_q4_0, [QK_L_Q8_0] = rows_q8_0, [QK_L_Q4_K] = rows_q4_k,
                              [QK_L_Q6_K] = rows_q6_k, [QK_L_INT4G] = rows_int4g, [QK_L_Q4_0X8] = rows_q4_0x8,
                              [QK_L_Q8_0X8] = rows_q8_0x8, [QK_L_INT4GX8] = rows_int4gx8, [QK_L_Q5_0] = rows_q5_0,
                              [QK_L_Q4_1] = rows_q4_1, [QK_L_Q5_1] = rows_q5_1, [QK_L_Q2_K] = rows_q2_k,
                              [QK_L_Q3_K] = rows_q3_k, [QK_L_Q5_K] = rows_q5_k, [QK_L_Q5_0X8] = rows_q5_0x8}};
    qk_kernels_over(k, &mine);
}

#endif
