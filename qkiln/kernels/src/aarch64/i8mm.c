/* Armv8.6 int8 matrix multiply (smmla; Neoverse V1/V2 = Graviton3/4): a 2x8 by 8x2 int8 tile per instruction.
 * Reads Q4_0X2 (two weight rows interleaved in 8-byte runs, see qk_repack_q4_0x2) against two activation
 * rows at a time, so one smmla yields all four (activation, weight) pairs. An odd last activation row is
 * paired with itself and the duplicate lanes dropped. */
#include <arm_neon.h>

#include "../common.h"

static void rows_q4_0x2(const qk_job *j, int n0, int n1) {
    const int nb = j->K / QK8;
    const uint8x16_t m4 = vdupq_n_u8(0x0f);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int n = n0 & ~1; n < n1; n += 2) {
        const uint8_t *wp = j->w + (size_t)(n / 2) * nb * Q4_0X2_BYTES;
        for (int m = 0; m < j->M; m += 2) {
            const int m1 = m + 1 < j->M ? m + 1 : m;
            const int8_t *a0 = j->qs + (size_t)m * j->K, *a1 = j->qs + (size_t)m1 * j->K;
            const float *d0 = j->d + (size_t)m * nb, *d1 = j->d + (size_t)m1 * nb;
            float32x4_t acc = vdupq_n_f32(0.0f); /* lanes: (m, n), (m, n+1), (m1, n), (m1, n+1) */
            const uint8_t *w = wp;
            for (int b = 0; b < nb; b++, w += Q4_0X2_BYTES) {
                const uint8x16_t v0 = vld1q_u8(w + 4), v1 = vld1q_u8(w + 20);
                const int8x16_t w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v0, m4)), eight); /* elems 0-7 */
                const int8x16_t w1 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v1, m4)), eight); /* 8-15 */
                const int8x16_t w2 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), eight); /* 16-23 */
                const int8x16_t w3 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), eight); /* 24-31 */
                const int64x2_t x0 = vreinterpretq_s64_s8(vld1q_s8(a0 + b * QK8));
                const int64x2_t x1 = vreinterpretq_s64_s8(vld1q_s8(a1 + b * QK8));
                const int64x2_t x2 = vreinterpretq_s64_s8(vld1q_s8(a0 + b * QK8 + 16));
                const int64x2_t x3 = vreinterpretq_s64_s8(vld1q_s8(a1 + b * QK8 + 16));
                int32x4_t s = vdupq_n_s32(0);
                s = vmmlaq_s32(s, vreinterpretq_s8_s64(vzip1q_s64(x0, x1)), w0);
                s = vmmlaq_s32(s, vreinterpretq_s8_s64(vzip2q_s64(x0, x1)), w1);
                s = vmmlaq_s32(s, vreinterpretq_s8_s64(vzip1q_s64(x2, x3)), w2);
                s = vmmlaq_s32(s, vreinterpretq_s8_s64(vzip2q_s64(x2, x3)), w3);
                const float dw0 = qk_h2f_at(w), dw1 = qk_h2f_at(w + 2);
                const float sc[4] = {dw0 * d0[b], dw1 * d0[b], dw0 * d1[b], dw1 * d1[b]};
                acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vld1q_f32(sc));
            }
            float r[4];
            vst1q_f32(r, acc);
            j->y[(size_t)m * j->N + n] = r[0];
            if (n + 1 < j->N) j->y[(size_t)m * j->N + n + 1] = r[1];
            if (m1 != m) {
                j->y[(size_t)m1 * j->N + n] = r[2];
                if (n + 1 < j->N) j->y[(size_t)m1 * j->N + n + 1] = r[3];
            }
        }
    }
}

void qk_fill_i8mm(qk_kernels *k) { k->rows[QK_L_Q4_0X2] = rows_q4_0x2; }
