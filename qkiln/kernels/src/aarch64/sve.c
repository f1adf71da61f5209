/* SVE (vector-length agnostic: the same binary runs 128-bit Graviton4, 256-bit Graviton3, 512-bit A64FX).
 * Uses SVE's own sdot (base SVE, so A64FX without NEON dotprod runs it). Each 32-element block is covered
 * by whole vectors: with >= 256-bit vectors the 16 low and 16 high nibbles are spliced into one vector and
 * one sdot does the block; with 128-bit vectors two sdots do it. */
#include <arm_sve.h>

#include "../common.h"

int qk_sve_vector_bytes(void) { return (int)svcntb(); }

/* Integer dot of one block of 32 signed codes given as low/high 16-code halves (elements 0-15, 16-31; lanes
 * past 16 unused). */
static inline int32_t block_dot(svint8_t lo, svint8_t hi, const int8_t *a) {
    const svbool_t p16 = svwhilelt_b8_s32(0, 16);
    if (svcntb() >= 32) {
        const svbool_t p32 = svwhilelt_b8_s32(0, 32);
        const svint8_t codes = svsplice_s8(p16, lo, hi); /* lo[0..15] then hi[0..15] */
        const svint32_t s = svdot_s32(svdup_n_s32(0), svsel_s8(p32, codes, svdup_n_s8(0)), svld1_s8(p32, a));
        return (int32_t)svaddv_s32(svptrue_b32(), s);
    }
    svint32_t s = svdot_s32(svdup_n_s32(0), lo, svld1_s8(p16, a));
    s = svdot_s32(s, hi, svld1_s8(p16, a + 16));
    return (int32_t)svaddv_s32(svptrue_b32(), s);
}

/* A block of 16 nibble bytes (Q4_0's order) as codes minus `zero`; with `qh` (Q5_0/Q5_1) bit 4 of element j
 * is bit j of qh, set by an add of 16 under a predicate: lane j of a half reads qh's byte j/8 (byte 2 + j/8
 * for the high half) and tests bit j%8. */
static inline int32_t block_dot_codes(const uint8_t *q16, int five, uint32_t qh, int8_t zero, const int8_t *a) {
    const svbool_t p16 = svwhilelt_b8_s32(0, 16);
    const svuint8_t raw = svld1_u8(p16, q16);
    svuint8_t lo = svand_n_u8_x(p16, raw, 0x0f), hi = svlsr_n_u8_x(p16, raw, 4);
    if (five) {
        const svuint8_t j = svindex_u8(0, 1);
        const svuint8_t byte = svlsr_n_u8_x(p16, j, 3);
        const svuint8_t bit = svlsl_u8_x(p16, svdup_n_u8(1), svand_n_u8_x(p16, j, 7));
        const svuint8_t qhb = svreinterpret_u8_u32(svdup_n_u32(qh)); /* qh's 4 bytes, repeated */
        const svbool_t set_lo = svcmpne_n_u8(p16, svand_u8_x(p16, svtbl_u8(qhb, byte), bit), 0);
        const svbool_t set_hi = svcmpne_n_u8(p16, svand_u8_x(p16, svtbl_u8(qhb, svadd_n_u8_x(p16, byte, 2)), bit), 0);
        lo = svadd_n_u8_m(set_lo, lo, 16);
        hi = svadd_n_u8_m(set_hi, hi, 16);
    }
    return block_dot(svsub_n_s8_x(p16, svreinterpret_s8_u8(lo), zero), svsub_n_s8_x(p16, svreinterpret_s8_u8(hi), zero), a);
}

static inline int32_t block_dot_nibbles(const uint8_t *q16, int8_t zero, const int8_t *a) {
    return block_dot_codes(q16, 0, 0, zero, a);
}

static float dot_q4_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q4_0_BYTES, a += QK8)
        acc += (qk_h2f_at(w) * ad[b]) * (float)block_dot_nibbles(w + 2, 8, a);
    return acc;
}

static float dot_q8_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    const int vl = (int)svcntb();
    for (int b = 0; b < nb; b++, w += Q8_0_BYTES, a += QK8) {
        const int8_t *q = (const int8_t *)(w + 2);
        svint32_t s = svdup_n_s32(0);
        for (int i = 0; i < QK8; i += vl) {
            const svbool_t pg = svwhilelt_b8_s32(i, QK8);
            s = svdot_s32(s, svld1_s8(pg, q + i), svld1_s8(pg, a + i)); /* inactive lanes load as 0 */
        }
        acc += (qk_h2f_at(w) * ad[b]) * (float)svaddv_s32(svptrue_b32(), s);
    }
    return acc;
}

static float dot_int4g(const uint8_t *codes, const float *sc, const uint8_t *zp, int group, const int8_t *a,
                       const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    const int per_group = group / QK8;
    for (int b = 0; b < nb; b++, codes += 16, a += QK8) {
        const int g = b / per_group;
        acc += (sc[g] * ad[b]) * (float)block_dot_nibbles(codes, (int8_t)zp[g], a);
    }
    return acc;
}

/* Q5_0: da * d * sum((q - 16) * a). */
static float dot_q5_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q5_0_BYTES, a += QK8)
        acc += (qk_h2f_at(w) * ad[b]) * (float)block_dot_codes(w + 6, 1, qk_rd32(w + 2), 16, a);
    return acc;
}

/* Q4_1 / Q5_1: da * (d * sum(q * a) + m * sum(a)), the scalar reference's term. */
static float dot_q4_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q4_1_BYTES, a += QK8)
        acc += ad[b] * (qk_h2f_at(w) * (float)block_dot_codes(w + 4, 0, 0, 0, a) + qk_h2f_at(w + 2) * (float)as[b]);
    return acc;
}

static float dot_q5_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q5_1_BYTES, a += QK8)
        acc += ad[b] * (qk_h2f_at(w) * (float)block_dot_codes(w + 8, 1, qk_rd32(w + 4), 0, a) +
                        qk_h2f_at(w + 2) * (float)as[b]);
    return acc;
}

#define QK_DOT_Q4_0
#define QK_DOT_Q8_0
#define QK_DOT_Q5_0
#define QK_DOT_Q4_1
#define QK_DOT_Q5_1
#define QK_DOT_INT4G
#include "rows.h"

void qk_fill_sve(qk_kernels *k) { qk_rows_fill(k); }
