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

/* Q4_K / Q5_K: unsigned codes per 32-element sub-block j (Q5_K: bit 4 of element l is bit j of qh[l]); the
 * min term dmin*m*sum(a) from the activation sums. */
static inline float dot_q45_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb,
                              int five) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    const uint8x16_t m4 = vdupq_n_u8(0x0f), bit4 = vdupq_n_u8(0x10);
    for (int s = 0; s < nsb; s++, w += five ? Q5_K_BYTES : Q4_K_BYTES) {
        const float d = qk_h2f_at(w), dmin = qk_h2f_at(w + 2);
        const uint8_t *scales = w + 4, *qs = w + (five ? 48 : 16);
        const uint8x16_t qh0 = five ? vld1q_u8(w + 16) : m4, qh1 = five ? vld1q_u8(w + 32) : m4;
        for (int j2 = 0; j2 < 4; j2++) {
            const uint8x16_t r0 = vld1q_u8(qs + j2 * 32), r1 = vld1q_u8(qs + j2 * 32 + 16);
            for (int h = 0; h < 2; h++) {
                const int jj = 2 * j2 + h, b = s * 8 + jj;
                int sc, m;
                qk_q4k_scale_min(jj, scales, &sc, &m);
                uint8x16_t u0 = h ? vshrq_n_u8(r0, 4) : vandq_u8(r0, m4), u1 = h ? vshrq_n_u8(r1, 4) : vandq_u8(r1, m4);
                if (five) {
                    const uint8x16_t sel = vdupq_n_u8((uint8_t)(1 << jj));
                    u0 = vorrq_u8(u0, vandq_u8(vtstq_u8(qh0, sel), bit4));
                    u1 = vorrq_u8(u1, vandq_u8(vtstq_u8(qh1, sel), bit4));
                }
                const int8_t *ab = a + (size_t)b * QK8;
                const int32x4_t p = DOT16(DOT16(vdupq_n_s32(0), vreinterpretq_s8_u8(u0), vld1q_s8(ab)),
                                          vreinterpretq_s8_u8(u1), vld1q_s8(ab + 16));
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), ad[b] * (d * (float)sc));
                corr += ad[b] * ((dmin * (float)m) * (float)as[b]);
            }
        }
    }
    return vaddvq_f32(acc) - corr;
}

static float dot_q4_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    return dot_q45_k(w, a, ad, as, nsb, 0);
}

static float dot_q5_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    return dot_q45_k(w, a, ad, as, nsb, 1);
}

/* One 32-element block of codes as two 16-code halves against its activations, the halves scaled by sc0 and
 * sc1 (the K-quants' per-16 sub-block scales) -> int32 lanes summing to sc0*dot0 + sc1*dot1. */
static inline int32x4_t dot32_sc16(int8x16_t q0, int8x16_t q1, const int8_t *a, int sc0, int sc1) {
    const int32x4_t p = vmulq_n_s32(DOT16(vdupq_n_s32(0), q0, vld1q_s8(a)), sc0);
    return vmlaq_n_s32(p, DOT16(vdupq_n_s32(0), q1, vld1q_s8(a + 16)), sc1);
}

/* Bits 2t..2t+1 of each byte (Q2_K/Q3_K's codes of chunk t, Q6_K's high bits). */
static inline uint8x16_t bits2(uint8x16_t v, int t) {
    return vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * t))), vdupq_n_u8(3));
}

/* Q2_K: chunk c = 4h + t of a super-block is bits 2t of qs bytes 32h..32h+31; per 16-element half
 * d*sc*sum(q*a) - dmin*m*sum(a), the half's activation sum from an add across the vector. */
static float dot_q2_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    float corr = 0.0f;
    for (int s = 0; s < nsb; s++, w += Q2_K_BYTES) {
        const uint8_t *scales = w;
        const float d = qk_h2f_at(w + 80), dmin = qk_h2f_at(w + 82);
        for (int h = 0; h < 2; h++) {
            const uint8x16_t r0 = vld1q_u8(w + 16 + 32 * h), r1 = vld1q_u8(w + 32 + 32 * h);
            for (int t = 0; t < 4; t++) {
                const int c = 4 * h + t, b = s * 8 + c;
                const int8_t *ab = a + (size_t)b * QK8;
                const int s0 = scales[2 * c], s1 = scales[2 * c + 1];
                const int32x4_t isum = dot32_sc16(vreinterpretq_s8_u8(bits2(r0, t)), vreinterpretq_s8_u8(bits2(r1, t)),
                                                  ab, s0 & 15, s1 & 15);
                const int msum = (s0 >> 4) * vaddlvq_s8(vld1q_s8(ab)) + (s1 >> 4) * vaddlvq_s8(vld1q_s8(ab + 16));
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * ad[b]);
                corr += (dmin * ad[b]) * (float)msum;
            }
        }
    }
    return vaddvq_f32(acc) - corr;
}

/* Q3_K: Q2_K's low bits, bit 2 of chunk c's element l in bit c of hmask[l]; codes q - 4 (4 subtracted where
 * that bit is clear), signed per-16 scales. */
static float dot_q3_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t four = vdupq_n_u8(4);
    for (int s = 0; s < nsb; s++, w += Q3_K_BYTES) {
        const uint8x16_t hm0 = vld1q_u8(w), hm1 = vld1q_u8(w + 16);
        int8_t sc[16];
        qk_q3k_scales(w + 96, sc);
        const float d = qk_h2f_at(w + 108);
        for (int h = 0; h < 2; h++) {
            const uint8x16_t r0 = vld1q_u8(w + 32 + 32 * h), r1 = vld1q_u8(w + 48 + 32 * h);
            for (int t = 0; t < 4; t++) {
                const int c = 4 * h + t, b = s * 8 + c;
                const uint8x16_t sel = vdupq_n_u8((uint8_t)(1 << c));
                const int8x16_t q0 = vsubq_s8(vreinterpretq_s8_u8(bits2(r0, t)), vreinterpretq_s8_u8(vbicq_u8(four, vtstq_u8(hm0, sel))));
                const int8x16_t q1 = vsubq_s8(vreinterpretq_s8_u8(bits2(r1, t)), vreinterpretq_s8_u8(vbicq_u8(four, vtstq_u8(hm1, sel))));
                const int32x4_t isum = dot32_sc16(q0, q1, a + (size_t)b * QK8, sc[2 * c], sc[2 * c + 1]);
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), d * ad[b]);
            }
        }
    }
    return vaddvq_f32(acc);
}

/* Q6_K: code = low nibble (ql) | two high bits (qh) << 4, minus 32; signed per-16 scales. */
static float dot_q6_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
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
                int8x16_t q[2];
                for (int half = 0; half < 2; half++) {
                    const uint8x16_t l = vld1q_u8(src + half * 16);
                    const uint8x16_t lo = (cc >> 1) ? vshrq_n_u8(l, 4) : vandq_u8(l, m4);
                    q[half] = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, vshlq_n_u8(bits2(hb[half], cc), 4))), off);
                }
                const int32x4_t isum = dot32_sc16(q[0], q[1], a + (size_t)b * QK8, sc[2 * c], sc[2 * c + 1]);
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
#define QK_DOT_Q2_K
#define QK_DOT_Q3_K
#define QK_DOT_Q4_K
#define QK_DOT_Q5_K
#define QK_DOT_Q6_K
#define QK_DOT_INT4G
#include "rows.h"

void FILL_NAME(qk_kernels *k) { qk_rows_fill(k); }
