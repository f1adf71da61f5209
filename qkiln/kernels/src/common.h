/* Internal to the kernel library: the job description every ISA file implements, and small helpers. */
#ifndef QKILN_COMMON_H
#define QKILN_COMMON_H

#include <stdint.h>
#include <string.h>

#include "qkiln_kernels.h"

#define QK8 32          /* activation block */
#define QKK 256         /* K-quant super-block */
#define Q4_0_BYTES 18
#define Q8_0_BYTES 34
#define Q4_1_BYTES 20
#define Q5_0_BYTES 22
#define Q5_1_BYTES 24
#define Q2_K_BYTES 84
#define Q3_K_BYTES 110
#define Q4_K_BYTES 144
#define Q5_K_BYTES 176
#define Q6_K_BYTES 210
#define Q4_0X2_BYTES 36 /* per row pair and block */
#define Q4_0X8_BYTES 144 /* per 8-row group and block */
#define Q8_0X8_BYTES 272
#define Q5_0X8_BYTES 176 /* Q4_0X8's 144, then 4 u64 bit-4 masks */
#define INT4GX8_HEAD 40  /* per 8-row group and weight group: 8 fp32 scales, 8 zero points */
#define INT4GX8_BLOCK 128 /* per 8-row group and 32-element block: the codes, Q4_0X8's nibble order */

/* One multiplication; kernels compute rows [n0, n1) of y for all M activation rows. */
typedef struct {
    int wtype, N, K, M;
    const uint8_t *w;          /* ggml blocks, or INT4 codes */
    const float *scales;       /* INT4: (N, K/group) */
    const uint8_t *zeros;      /* INT4: (N, K/group) */
    int group;                 /* INT4, INT4GX8 */
    const int8_t *qs;          /* (M, K) */
    const float *d;            /* (M, K/32) */
    const int32_t *sums;       /* (M, K/32) */
    float *y;                  /* (M, N) */
} qk_job;

typedef void (*qk_rows_fn)(const qk_job *job, int n0, int n1);

/* The row functions of one path, by layout. */
enum qk_layout { QK_L_Q4_0, QK_L_Q8_0, QK_L_Q4_K, QK_L_Q6_K, QK_L_Q4_0X2, QK_L_INT4G, QK_L_Q4_0X8, QK_L_Q8_0X8,
                 QK_L_INT4GX8, QK_L_Q5_0, QK_L_Q4_1, QK_L_Q5_1, QK_L_Q2_K, QK_L_Q3_K, QK_L_Q5_K, QK_L_Q5_0X8,
                 QK_NLAYOUTS };

typedef struct {
    qk_rows_fn rows[QK_NLAYOUTS];
} qk_kernels;

/* Enter the row functions `o` has (non-NULL) into k, replacing k's. */
static inline void qk_kernels_over(qk_kernels *k, const qk_kernels *o) {
    for (int i = 0; i < QK_NLAYOUTS; i++)
        if (o->rows[i]) k->rows[i] = o->rows[i];
}

/* Each ISA file enters the row functions it has; dispatch.c starts from the scalar table, so a path runs
 * the scalar loop for a layout its files do not cover. */
void qk_fill_scalar(qk_kernels *k);
void qk_fill_avx2(qk_kernels *k);
void qk_fill_avx512(qk_kernels *k);
void qk_fill_neon(qk_kernels *k);
void qk_fill_dotprod(qk_kernels *k);
void qk_fill_i8mm(qk_kernels *k);
void qk_fill_sve(qk_kernels *k);
int qk_sve_vector_bytes(void);
/* Batched row functions (many activation rows against one unpacked weight strip, x86/gemm_panel.h), for the
 * layouts they cover; dispatch.c uses them from a few activation rows on. */
void qk_fill_gemm_avx2(qk_kernels *k);
void qk_fill_gemm_avx512(qk_kernels *k);

/* qk_quantize_q8 (qkiln_kernels.h): the reference (quantize_act.c) and its bit-identical AVX-512 form, which the
 * avx512 path uses. */
void qk_quantize_q8_ref(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums);
void qk_quantize_q8_avx512(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums);

/* IEEE half -> float, exact: the one definition every kernel calls. Files compiled for F16C (x86) or any
 * aarch64 target convert in hardware (_cvtsh_ss, fcvt: the same value for every half but a signalling NaN,
 * which they quiet); the scalar reference defines QK_PLAIN_C and keeps to plain integer operations. */
#if defined(__F16C__) && !defined(QK_PLAIN_C)
#include <immintrin.h>
static inline float qk_h2f(uint16_t h) { return _cvtsh_ss(h); }
#elif defined(__aarch64__) && !defined(QK_PLAIN_C)
static inline float qk_h2f(uint16_t h) {
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}
#else
static inline float qk_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: man * 2^-24, exact in float */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}
#endif

static inline uint16_t qk_rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* Q5_0/Q5_1's qh: the 32 high bits stored little-endian at p (bit j = bit 4 of element j). */
static inline uint32_t qk_rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The fp16 scale stored little-endian at p. */
static inline float qk_h2f_at(const uint8_t *p) { return qk_h2f(qk_rd16(p)); }

/* Q4_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes. */
static inline void qk_q4k_scale_min(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q3_K: the 16 signed 6-bit sub-block scales (-32..31) from the 12 packed bytes: low 4 bits of scale j in
 * byte j % 8 (low nibble for j < 8, high for j >= 8), high 2 bits at bits 2*(j/4) of byte 8 + j % 4. */
static inline void qk_q3k_scales(const uint8_t *p, int8_t sc[16]) {
    for (int j = 0; j < 16; j++) {
        const int lo = j < 8 ? p[j] & 0x0f : p[j - 8] >> 4, hi = (p[8 + j % 4] >> (2 * (j / 4))) & 3;
        sc[j] = (int8_t)((lo | hi << 4) - 32);
    }
}

/* Q4_0X8: byte offset (within a group's block) and nibble shift of code k (0..31) of row r (0..7). */
static inline int qk_x8_pos(int r, int k, int *shift) {
    const int g = k / 4, j = k % 4;          /* 4-element group 0..7 */
    const int hi = g >= 4, gg = g % 4;       /* low nibbles: groups 0-3, high: 4-7 */
    const int c = gg / 2, h = gg % 2;        /* chunk, half */
    *shift = hi ? 4 : 0;
    return 16 + c * 64 + 4 * (8 * h + r) + j;
}

/* Q5_0X8: which of the block's four u64 masks (at byte 144) and which bit of it stand for code k of row r. */
static inline int qk_x8_mask_bit(int r, int k, int *mask) {
    int shift;
    const int pos = qk_x8_pos(r, k, &shift) - 16;
    *mask = 2 * (pos / 64) + (shift ? 1 : 0);
    return pos % 64;
}

/* INT4GX8: bytes of one 8-row group's weight group (scales, zeros, then group/32 blocks of codes). */
static inline size_t qk_int4gx8_group_bytes(int group) { return INT4GX8_HEAD + (size_t)(group / QK8) * INT4GX8_BLOCK; }

/* Q8_0X8: byte offset (within a group's block) of element k of row r. */
static inline int qk_x8q8_pos(int r, int k) {
    const int g = k / 4, j = k % 4, c = g / 2, h = g % 2;
    return 16 + c * 64 + 4 * (8 * h + r) + j;
}

#endif
