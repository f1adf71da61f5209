/* repack.c — load-time repacks of Q4_0, Q8_0 and INT4 weights into the row-interleaved layouts the SIMD
 * kernels read (Q4_0X2 for smmla, Q4_0X8 / Q8_0X8 / INT4GX8 for AVX-512 VNNI); layouts in qkiln_kernels.h. */
#include <string.h>

#include "common.h"

size_t qk_q4_0x2_bytes(int N, int K) { return (size_t)((N + 1) / 2) * (K / QK8) * Q4_0X2_BYTES; }

void qk_repack_q4_0x2(const void *src, int N, int K, void *dst) {
    const int nb = K / QK8;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    static const uint8_t zero_block[Q4_0_BYTES] = {0};
    for (int p = 0; p < (N + 1) / 2; p++)
        for (int b = 0; b < nb; b++, o += Q4_0X2_BYTES) {
            const uint8_t *r0 = s + ((size_t)(2 * p) * nb + b) * Q4_0_BYTES;
            const uint8_t *r1 = 2 * p + 1 < N ? s + ((size_t)(2 * p + 1) * nb + b) * Q4_0_BYTES : zero_block;
            memcpy(o, r0, 2);
            memcpy(o + 2, r1, 2);
            memcpy(o + 4, r0 + 2, 8);
            memcpy(o + 12, r1 + 2, 8);
            memcpy(o + 20, r0 + 10, 8);
            memcpy(o + 28, r1 + 10, 8);
        }
}

size_t qk_q4_0x8_bytes(int N, int K) { return (size_t)((N + 7) / 8) * (K / QK8) * Q4_0X8_BYTES; }

/* Q4_0 (five = 0) or Q5_0 (five = 1) into its X8 layout: the nibbles at qk_x8_pos; for Q5_0 bit 4 of each code
 * into the u64 masks after them (qk_x8_mask_bit). */
static void repack_nibbles_x8(const uint8_t *s, int N, int K, uint8_t *o, int five) {
    const int nb = K / QK8;
    const int src_bytes = five ? Q5_0_BYTES : Q4_0_BYTES, nib = five ? 6 : 2;
    const size_t bytes = five ? Q5_0X8_BYTES : Q4_0X8_BYTES;
    memset(o, 0, (size_t)((N + 7) / 8) * nb * bytes);
    for (int g = 0; g < (N + 7) / 8; g++)
        for (int b = 0; b < nb; b++, o += bytes) {
            uint64_t masks[4] = {0, 0, 0, 0};
            for (int r = 0; r < 8 && 8 * g + r < N; r++) {
                const uint8_t *blk = s + ((size_t)(8 * g + r) * nb + b) * src_bytes;
                const uint32_t qh = five ? qk_rd32(blk + 2) : 0;
                memcpy(o + 2 * r, blk, 2);
                for (int k = 0; k < 32; k++) {
                    const int q = k < 16 ? (blk[nib + k] & 0x0f) : (blk[nib + k - 16] >> 4);
                    int shift, m;
                    o[qk_x8_pos(r, k, &shift)] |= (uint8_t)(q << shift);
                    const int bit = qk_x8_mask_bit(r, k, &m);
                    masks[m] |= (uint64_t)(qh >> k & 1) << bit;
                }
            }
            if (five)
                for (int m = 0; m < 4; m++)
                    for (int i = 0; i < 8; i++) o[Q4_0X8_BYTES + 8 * m + i] = (uint8_t)(masks[m] >> 8 * i);
        }
}

void qk_repack_q4_0x8(const void *src, int N, int K, void *dst) { repack_nibbles_x8(src, N, K, dst, 0); }

size_t qk_q8_0x8_bytes(int N, int K) { return (size_t)((N + 7) / 8) * (K / QK8) * Q8_0X8_BYTES; }

void qk_repack_q8_0x8(const void *src, int N, int K, void *dst) {
    const int nb = K / QK8;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    memset(o, 0, qk_q8_0x8_bytes(N, K));
    for (int g = 0; g < (N + 7) / 8; g++)
        for (int b = 0; b < nb; b++, o += Q8_0X8_BYTES)
            for (int r = 0; r < 8 && 8 * g + r < N; r++) {
                const uint8_t *blk = s + ((size_t)(8 * g + r) * nb + b) * Q8_0_BYTES;
                memcpy(o + 2 * r, blk, 2);
                for (int k = 0; k < 32; k++) o[qk_x8q8_pos(r, k)] = blk[2 + k];
            }
}

size_t qk_q5_0x8_bytes(int N, int K) { return (size_t)((N + 7) / 8) * (K / QK8) * Q5_0X8_BYTES; }

void qk_repack_q5_0x8(const void *src, int N, int K, void *dst) { repack_nibbles_x8(src, N, K, dst, 1); }

size_t qk_int4gx8_bytes(int N, int K, int group) {
    if (group <= 0 || group % QK8 != 0 || K % group != 0) return 0;
    return (size_t)((N + 7) / 8) * (K / group) * qk_int4gx8_group_bytes(group);
}

void qk_repack_int4gx8(const uint8_t *codes, const float *scales, const uint8_t *zeros, int group, int N, int K,
                       void *dst) {
    const int nb = K / QK8, ng = K / group, per = group / QK8;
    uint8_t *o = (uint8_t *)dst;
    memset(o, 0, qk_int4gx8_bytes(N, K, group));
    for (int g8 = 0; g8 < (N + 7) / 8; g8++)
        for (int g = 0; g < ng; g++, o += qk_int4gx8_group_bytes(group))
            for (int r = 0; r < 8 && 8 * g8 + r < N; r++) {
                const int n = 8 * g8 + r;
                memcpy(o + 4 * r, scales + (size_t)n * ng + g, 4);
                o[32 + r] = zeros[(size_t)n * ng + g];
                for (int i = 0; i < per; i++) {
                    const uint8_t *blk = codes + ((size_t)n * nb + g * per + i) * 16;
                    uint8_t *ob = o + INT4GX8_HEAD + i * INT4GX8_BLOCK - 16; /* qk_x8_pos counts Q4_0X8's scales */
                    for (int k = 0; k < 32; k++) {
                        const int q = k < 16 ? (blk[k] & 0x0f) : (blk[k - 16] >> 4);
                        int shift;
                        const int pos = qk_x8_pos(r, k, &shift);
                        ob[pos] |= (uint8_t)(q << shift);
                    }
                }
            }
}
