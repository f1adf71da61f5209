/* Armv8.6 int8 matrix multiply (smmla; Neoverse V1/V2 = Graviton3/4): a 2x8 by 8x2 int8 tile per instruction.
 * Reads Q4_0X2 (two weight rows interleaved in 8-byte runs, see qk_repack_q4_0x2) against two activation
 * rows at a time, so one smmla yields all four (activation, weight) pairs. An odd last activation row is
 * paired with itself and the duplicate lanes dropped.
 * Q8_0 (plain blocks, no repack): two weight rows against two activation rows per smmla as well, the 8-byte runs
 * of both pairs interleaved in registers (vzip), as llama.cpp's Q8_0 i8mm product does; from two activation
 * rows on (a prompt, an evaluation window). A single row (decode) and an odd last row run the path's per-row
 * kernel (dotprod's), kept when this file's rows are entered. */
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

static qk_rows_fn g_rows_q8_0_one; /* the per-row Q8_0 loop this path had before (dotprod's) */

/* Rows [n0, n1) for activation row m alone, through the per-row loop. */
static void q8_0_one_row(const qk_job *j, int m, int n0, int n1) {
    const int nb = j->K / QK8;
    qk_job one = *j;
    one.M = 1;
    one.qs = j->qs + (size_t)m * j->K;
    one.d = j->d + (size_t)m * nb;
    one.sums = j->sums + (size_t)m * nb;
    one.y = j->y + (size_t)m * j->N;
    g_rows_q8_0_one(&one, n0, n1);
}

static void rows_q8_0(const qk_job *j, int n0, int n1) {
    if (j->M < 2) {
        g_rows_q8_0_one(j, n0, n1);
        return;
    }
    const int nb = j->K / QK8;
    const size_t stride = (size_t)nb * Q8_0_BYTES;
    for (int n = n0; n < n1; n += 2) {
        const int n1w = n + 1 < n1 ? n + 1 : n; /* an odd last weight row is paired with itself */
        const uint8_t *r0 = j->w + (size_t)n * stride, *r1 = j->w + (size_t)n1w * stride;
        for (int m = 0; m + 1 < j->M; m += 2) {
            const int8_t *a0 = j->qs + (size_t)m * j->K, *a1 = a0 + j->K;
            const float *d0 = j->d + (size_t)m * nb, *d1 = d0 + nb;
            float32x4_t acc = vdupq_n_f32(0.0f); /* lanes: (m, n), (m, n+1), (m+1, n), (m+1, n+1) */
            for (int b = 0; b < nb; b++) {
                const uint8_t *w0 = r0 + (size_t)b * Q8_0_BYTES, *w1 = r1 + (size_t)b * Q8_0_BYTES;
                int32x4_t s = vdupq_n_s32(0);
                for (int h = 0; h < 2; h++) { /* elements 16h .. 16h+15: two 8-byte runs */
                    const int64x2_t x0 = vreinterpretq_s64_s8(vld1q_s8(a0 + b * QK8 + 16 * h));
                    const int64x2_t x1 = vreinterpretq_s64_s8(vld1q_s8(a1 + b * QK8 + 16 * h));
                    const int64x2_t y0 = vreinterpretq_s64_s8(vld1q_s8((const int8_t *)(w0 + 2 + 16 * h)));
                    const int64x2_t y1 = vreinterpretq_s64_s8(vld1q_s8((const int8_t *)(w1 + 2 + 16 * h)));
                    s = vmmlaq_s32(s, vreinterpretq_s8_s64(vzip1q_s64(x0, x1)), vreinterpretq_s8_s64(vzip1q_s64(y0, y1)));
                    s = vmmlaq_s32(s, vreinterpretq_s8_s64(vzip2q_s64(x0, x1)), vreinterpretq_s8_s64(vzip2q_s64(y0, y1)));
                }
                const float dw0 = qk_h2f_at(w0), dw1 = qk_h2f_at(w1);
                const float sc[4] = {dw0 * d0[b], dw1 * d0[b], dw0 * d1[b], dw1 * d1[b]};
                acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vld1q_f32(sc));
            }
            float r[4];
            vst1q_f32(r, acc);
            j->y[(size_t)m * j->N + n] = r[0];
            j->y[(size_t)(m + 1) * j->N + n] = r[2];
            if (n1w != n) {
                j->y[(size_t)m * j->N + n + 1] = r[1];
                j->y[(size_t)(m + 1) * j->N + n + 1] = r[3];
            }
        }
        if (j->M % 2) q8_0_one_row(j, j->M - 1, n, n1w + 1);
    }
}

void qk_fill_i8mm(qk_kernels *k) {
    if (k->rows[QK_L_Q8_0] != rows_q8_0) g_rows_q8_0_one = k->rows[QK_L_Q8_0];
    k->rows[QK_L_Q4_0X2] = rows_q4_0x2;
    k->rows[QK_L_Q8_0] = rows_q8_0;
}
