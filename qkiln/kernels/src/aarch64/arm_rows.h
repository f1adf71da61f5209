/* Inner products shared by the NEON and dotprod files: each includes this after defining
 *   static inline int32x4_t DOT16(int32x4_t acc, int8x16_t w, int8x16_t a)   (16 products summed into acc)
 * and FILL_NAME (the qk_fill_* function to define). Only the 16-wide dot differs between the two ISAs; the
 * row loops are rows.h's. */
#include <arm_neon.h>

#include "../common.h"

static float dot_q4_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int b = 0; b < nb; b++, w += Q4_0_BYTES, a += QK8) {
        const uint8x16_t raw = vld1q_u8(w + 2);
        const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, m4)), eight);
        const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
        const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), lo, vld1q_s8(a)), hi, vld1q_s8(a + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), qk_h2f_at(w) * ad[b]);
    }
    return vaddvq_f32(acc);
}

static float dot_q8_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++, w += Q8_0_BYTES, a += QK8) {
        const int8_t *q = (const int8_t *)(w + 2);
        const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), vld1q_s8(q), vld1q_s8(a)), vld1q_s8(q + 16), vld1q_s8(a + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), qk_h2f_at(w) * ad[b]);
    }
    return vaddvq_f32(acc);
}

/* 16 bits of Q5_0/Q5_1's qh -> 16 bytes, 0x10 where bit j (element j of the half) is set. */
static inline uint8x16_t high_bits16(uint32_t bits) {
    static const uint8_t sel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bytes = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
    return vandq_u8(vtstq_u8(bytes, vld1q_u8(sel)), vdupq_n_u8(0x10));
}

/* One Q5_0/Q5_1 block's 32 codes 0..31 as two 16-byte halves (elements 0-15, 16-31). */
static inline void q5_codes(const uint8_t *qs, uint32_t qh, uint8x16_t *lo, uint8x16_t *hi) {
    const uint8x16_t raw = vld1q_u8(qs);
    *lo = vorrq_u8(vandq_u8(raw, vdupq_n_u8(0x0f)), high_bits16(qh));
    *hi = vorrq_u8(vshrq_n_u8(raw, 4), high_bits16(qh >> 16));
}

static float dot_q5_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const int8x16_t sixteen = vdupq_n_s8(16);
    for (int b = 0; b < nb; b++, w += Q5_0_BYTES, a += QK8) {
        uint8x16_t l, h;
        q5_codes(w + 6, qk_rd32(w + 2), &l, &h);
        const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(l), sixteen), hi = vsubq_s8(vreinterpretq_s8_u8(h), sixteen);
        const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), lo, vld1q_s8(a)), hi, vld1q_s8(a + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), qk_h2f_at(w) * ad[b]);
    }
    return vaddvq_f32(acc);
}

/* Q4_1 / Q5_1: codes 0..31 are valid signed bytes; the min term m*sum(a) is summed apart, as Q4_K's. */
static float dot_q4_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (int b = 0; b < nb; b++, w += Q4_1_BYTES, a += QK8) {
        const uint8x16_t raw = vld1q_u8(w + 4);
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, m4)), hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), lo, vld1q_s8(a)), hi, vld1q_s8(a + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), ad[b] * qk_h2f_at(w));
        corr += ad[b] * (qk_h2f_at(w + 2) * (float)as[b]);
    }
    return vaddvq_f32(acc) + corr;
}

static float dot_q5_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    for (int b = 0; b < nb; b++, w += Q5_1_BYTES, a += QK8) {
        uint8x16_t l, h;
        q5_codes(w + 8, qk_rd32(w + 4), &l, &h);
        const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), vreinterpretq_s8_u8(l), vld1q_s8(a)), vreinterpretq_s8_u8(h),
                                  vld1q_s8(a + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), ad[b] * qk_h2f_at(w));
        corr += ad[b] * (qk_h2f_at(w + 2) * (float)as[b]);
    }
    return vaddvq_f32(acc) + corr;
}

static float dot_int4g(const uint8_t *codes, const float *sc, const uint8_t *zp, int group, const int8_t *a,
                       const float *ad, const int32_t *as, int nb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    const int per_group = group / QK8;
    for (int b = 0; b < nb; b++, codes += 16, a += QK8) {
        const int g = b / per_group;
        const int8x16_t z = vdupq_n_s8((int8_t)zp[g]);
        const uint8x16_t raw = vld1q_u8(codes);
        const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, m4)), z);
        const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), z);
        const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), lo, vld1q_s8(a)), hi, vld1q_s8(a + 16));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), sc[g] * ad[b]);
    }
    return vaddvq_f32(acc);
}

static float dot_q4_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    for (int s = 0; s < nsb; s++, w += Q4_K_BYTES) {
        const float d = qk_h2f_at(w), dmin = qk_h2f_at(w + 2);
        const uint8_t *scales = w + 4, *qs = w + 16;
        for (int j2 = 0; j2 < 4; j2++) {
            const uint8x16_t r0 = vld1q_u8(qs + j2 * 32), r1 = vld1q_u8(qs + j2 * 32 + 16);
            for (int h = 0; h < 2; h++) {
                const int jj = 2 * j2 + h, b = s * 8 + jj;
                int sc, m;
                qk_q4k_scale_min(jj, scales, &sc, &m);
                const int8x16_t q0 = vreinterpretq_s8_u8(h ? vshrq_n_u8(r0, 4) : vandq_u8(r0, m4));
                const int8x16_t q1 = vreinterpretq_s8_u8(h ? vshrq_n_u8(r1, 4) : vandq_u8(r1, m4));
                const int8_t *ab = a + (size_t)b * QK8;
                const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), q0, vld1q_s8(ab)), q1, vld1q_s8(ab + 16));
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), ad[b] * (d * (float)sc));
                corr += ad[b] * ((dmin * (float)m) * (float)as[b]);
            }
        }
    }
    return vaddvq_f32(acc) - corr;
}

static float dot_q6_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t m4 = vdupq_n_u8(0x0f), three = vdupq_n_u8(3);
    const int8x16_t off = vdupq_n_s8(32);
    for (int s = 0; s < nsb; s++, w += Q6_K_BYTES) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        const float d = qk_h2f_at(w + 208);
        for (int h = 0; h < 2; h++) {
            const uint8x16_t hb[2] = {vld1q_u8(qh + h * 32), vld1q_u8(qh + h * 32 + 16)};
            for (int cc = 0; cc < 4; cc++) {
                const int c = h * 4 + cc, b = s * 8 + c;
                const uint8_t *src = ql + h * 64 + (cc & 1) * 32;
                const int8_t *ab = a + (size_t)b * QK8;
                int32x4_t isum = vdupq_n_s32(0);
                for (int half = 0; half < 2; half++) {
                    const uint8x16_t l = vld1q_u8(src + half * 16);
                    const uint8x16_t lo = (cc >> 1) ? vshrq_n_u8(l, 4) : vandq_u8(l, m4);
                    uint8x16_t hi = hb[half];
                    switch (cc) { /* shift counts must be immediates */
                    case 1: hi = vshrq_n_u8(hi, 2); break;
                    case 2: hi = vshrq_n_u8(hi, 4); break;
                    case 3: hi = vshrq_n_u8(hi, 6); break;
                    default: break;
                    }
                    const int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(vandq_u8(hi, three), 4))), off);
                    const int32x4_t p = DOT16(vdupq_n_s32(0), q, vld1q_s8(ab + half * 16));
                    isum = vmlaq_n_s32(isum, p, sc[2 * c + half]);
                }
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * ad[b]);
            }
        }
    }
    return vaddvq_f32(acc);
}

#define QK_DOT_Q4_0
#define QK_DOT_Q8_0
#define QK_DOT_Q5_0
#define QK_DOT_Q4_1
#define QK_DOT_Q5_1
#define QK_DOT_Q4_K
#define QK_DOT_Q6_K
#define QK_DOT_INT4G
#include "rows.h"

void FILL_NAME(qk_kernels *k) { qk_rows_fill(k); }
