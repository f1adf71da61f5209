/* Scalar reference kernels: the definition every SIMD path must reproduce (integer block sums exactly,
 * fp32 combination within the tolerance stated in qkiln/kernels/numpy_ref.py). Plain loops, no intrinsics. */
#define QK_PLAIN_C 1 /* the reference: plain integer half -> float (common.h) */
#include "../common.h"

static float dot_q4_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q4_0_BYTES, a += QK8) {
        const uint8_t *q = w + 2;
        int s = 0;
        for (int j = 0; j < 16; j++) s += (q[j] & 0x0f) * a[j] + (q[j] >> 4) * a[j + 16];
        s -= 8 * as[b];
        acc += (qk_h2f_at((w)) * ad[b]) * (float)s;
    }
    return acc;
}

static float dot_q8_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q8_0_BYTES, a += QK8) {
        const int8_t *q = (const int8_t *)(w + 2);
        int s = 0;
        for (int j = 0; j < 32; j++) s += q[j] * a[j];
        acc += (qk_h2f_at((w)) * ad[b]) * (float)s;
    }
    return acc;
}

/* Q5_0 / Q5_1 code j (0..31) of a block: low nibble from qs (Q4_0's order), bit 4 from qh. */
static inline int q5_code(const uint8_t *qs, uint32_t qh, int j) {
    const int nib = j < 16 ? (qs[j] & 0x0f) : (qs[j - 16] >> 4);
    return nib | (int)((qh >> j & 1u) << 4);
}

/* Q5_0: da * d * (sum(q*a) - 16*sum(a)), q in 0..31. */
static float dot_q5_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q5_0_BYTES, a += QK8) {
        const uint32_t qh = qk_rd32(w + 2);
        int s = 0;
        for (int j = 0; j < 32; j++) s += q5_code(w + 6, qh, j) * a[j];
        s -= 16 * as[b];
        acc += (qk_h2f_at(w) * ad[b]) * (float)s;
    }
    return acc;
}

/* Q4_1: da * (d*sum(q*a) + m*sum(a)), q in 0..15 (the min term as Q4_K's). */
static float dot_q4_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q4_1_BYTES, a += QK8) {
        const uint8_t *q = w + 4;
        int s = 0;
        for (int j = 0; j < 16; j++) s += (q[j] & 0x0f) * a[j] + (q[j] >> 4) * a[j + 16];
        acc += ad[b] * (qk_h2f_at(w) * (float)s + qk_h2f_at(w + 2) * (float)as[b]);
    }
    return acc;
}

/* Q5_1: da * (d*sum(q*a) + m*sum(a)), q in 0..31. */
static float dot_q5_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++, w += Q5_1_BYTES, a += QK8) {
        const uint32_t qh = qk_rd32(w + 4);
        int s = 0;
        for (int j = 0; j < 32; j++) s += q5_code(w + 8, qh, j) * a[j];
        acc += ad[b] * (qk_h2f_at(w) * (float)s + qk_h2f_at(w + 2) * (float)as[b]);
    }
    return acc;
}

static float dot_int4g(const uint8_t *codes, const float *sc, const uint8_t *zp, int group,
                       const int8_t *a, const float *ad, const int32_t *as, int nb) {
    float acc = 0.0f;
    const int per_group = group / QK8;
    for (int b = 0; b < nb; b++, codes += 16, a += QK8) {
        int s = 0;
        for (int j = 0; j < 16; j++) s += (codes[j] & 0x0f) * a[j] + (codes[j] >> 4) * a[j + 16];
        const int g = b / per_group;
        s -= (int)zp[g] * as[b];
        acc += (sc[g] * ad[b]) * (float)s;
    }
    return acc;
}

/* Q4_K / Q5_K: w = d*sc*q - dmin*m per 32-element sub-block j = activation block s*8+j; Q5_K's bit 4 of
 * element l of sub-block j is bit j of qh[l]. */
static inline float dot_q45_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb,
                              int five) {
    float acc = 0.0f;
    for (int s = 0; s < nsb; s++, w += five ? Q5_K_BYTES : Q4_K_BYTES) {
        const float d = qk_h2f_at((w)), dmin = qk_h2f_at((w + 2));
        const uint8_t *scales = w + 4, *qh = w + 16, *qs = w + (five ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            qk_q4k_scale_min(j, scales, &sc, &m);
            const uint8_t *q = qs + (j / 2) * 32;
            const int shift = (j & 1) * 4;
            const int b = s * 8 + j;
            const int8_t *ab = a + b * QK8;
            int sum = 0;
            for (int l = 0; l < 32; l++)
                sum += (((q[l] >> shift) & 0x0f) | (five ? ((qh[l] >> j) & 1) << 4 : 0)) * ab[l];
            acc += ad[b] * ((d * (float)sc) * (float)sum - (dmin * (float)m) * (float)as[b]);
        }
    }
    return acc;
}

static float dot_q4_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    return dot_q45_k(w, a, ad, as, nsb, 0);
}

static float dot_q5_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    return dot_q45_k(w, a, ad, as, nsb, 1);
}

/* A 32-element block of codes q against activations a, elements 0-15 scaled by sc0 and 16-31 by sc1 (the
 * K-quants' per-16 sub-block scales): the block's exact integer sum. */
static inline int dot32_sc16(const int q[32], const int8_t *a, int sc0, int sc1) {
    int s0 = 0, s1 = 0;
    for (int e = 0; e < 16; e++) {
        s0 += q[e] * a[e];
        s1 += q[e + 16] * a[e + 16];
    }
    return sc0 * s0 + sc1 * s1;
}

/* Q2_K / Q3_K's low two bits of element e (0..255): element 128h + 32t + l sits at bits 2t of qs[32h + l]. */
static inline int q2_bits(const uint8_t *qs, int e) { return (qs[(e / 128) * 32 + e % 32] >> (2 * (e / 32 % 4))) & 3; }

/* Q2_K: w = d*sc*q - dmin*m per 16-element sub-block (sc, m 4-bit, q 0..3); the min term takes the sum of
 * that sub-block's 16 activations, so both halves of a 32-element activation block are summed apart. */
static float dot_q2_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float acc = 0.0f;
    for (int s = 0; s < nsb; s++, w += Q2_K_BYTES) {
        const uint8_t *scales = w, *qs = w + 16;
        const float d = qk_h2f_at(w + 80), dmin = qk_h2f_at(w + 82);
        for (int c = 0; c < 8; c++) { /* 32-element chunk c = activation block s*8+c */
            const int b = s * 8 + c, s0 = scales[2 * c], s1 = scales[2 * c + 1];
            const int8_t *ab = a + b * QK8;
            int q[32], one[32]; /* dot32_sc16(one, ...): the halves' activation sums, scaled by the mins */
            for (int e = 0; e < 32; e++) {
                q[e] = q2_bits(qs, c * 32 + e);
                one[e] = 1;
            }
            acc += ad[b] * (d * (float)dot32_sc16(q, ab, s0 & 15, s1 & 15) -
                            dmin * (float)dot32_sc16(one, ab, s0 >> 4, s1 >> 4));
        }
    }
    return acc;
}

/* Q3_K: w = d*sc*(q-4) per 16-element sub-block, q = two low bits | bit 2 from hmask (bit c of hmask[l] for
 * element 32c + l). */
static float dot_q3_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float acc = 0.0f;
    for (int s = 0; s < nsb; s++, w += Q3_K_BYTES) {
        const uint8_t *hmask = w, *qs = w + 32;
        int8_t sc[16];
        qk_q3k_scales(w + 96, sc);
        const float d = qk_h2f_at(w + 108);
        for (int c = 0; c < 8; c++) {
            const int b = s * 8 + c;
            int q[32];
            for (int e = 0; e < 32; e++) q[e] = (q2_bits(qs, c * 32 + e) | ((hmask[e] >> c) & 1) << 2) - 4;
            acc += (d * ad[b]) * (float)dot32_sc16(q, a + b * QK8, sc[2 * c], sc[2 * c + 1]);
        }
    }
    return acc;
}

/* Q6_K: w = d*sc*(q-32) per 16-element sub-block; chunk c = 4h + cc takes its low nibbles from ql bytes
 * 64h + 32(cc & 1) + l (high nibble for cc >= 2) and its high two bits from bits 2cc of qh[32h + l]. */
static float dot_q6_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    float acc = 0.0f;
    for (int s = 0; s < nsb; s++, w += Q6_K_BYTES) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        const float d = qk_h2f_at((w + 208));
        for (int c = 0; c < 8; c++) { /* 32-element chunk c = activation block s*8+c */
            const int h = c / 4, cc = c % 4;
            const uint8_t *l = ql + h * 64 + (cc & 1) * 32;
            const int lshift = (cc >> 1) * 4, hshift = cc * 2;
            const int b = s * 8 + c;
            int q[32];
            for (int e = 0; e < 32; e++)
                q[e] = (((l[e] >> lshift) & 0x0f) | (((qh[h * 32 + e] >> hshift) & 3) << 4)) - 32;
            acc += (d * ad[b]) * (float)dot32_sc16(q, a + b * QK8, sc[2 * c], sc[2 * c + 1]);
        }
    }
    return acc;
}

/* Q4_0X2: rows 2p and 2p+1 share 36-byte blocks; the padding row of an odd N is never written. */
static void rows_q4_0x2(const qk_job *j, int n0, int n1) {
    const int nb = j->K / QK8;
    for (int m = 0; m < j->M; m++) {
        const int8_t *a = j->qs + (size_t)m * j->K;
        const float *ad = j->d + (size_t)m * nb;
        const int32_t *as = j->sums + (size_t)m * nb;
        for (int n = n0; n < n1; n++) {
            const int p = n / 2, i = n % 2;
            const uint8_t *w = j->w + (size_t)p * nb * Q4_0X2_BYTES;
            float acc = 0.0f;
            for (int b = 0; b < nb; b++, w += Q4_0X2_BYTES) {
                const int8_t *ab = a + b * QK8;
                int s = 0;
                for (int k = 0; k < 16; k++) {
                    const uint8_t byte = w[4 + (k / 8) * 16 + i * 8 + (k % 8)];
                    s += (byte & 0x0f) * ab[k] + (byte >> 4) * ab[k + 16];
                }
                s -= 8 * as[b];
                acc += (qk_h2f_at((w + 2 * i)) * ad[b]) * (float)s;
            }
            j->y[(size_t)m * j->N + n] = acc;
        }
    }
}

/* The X8 repacks: each of the group's 8 rows on its own, as the plain layouts are summed. */
static void dot8_int4gx8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                         const void *prep, float out[8]) {
    const int ng = j->K / j->group, per = j->group / QK8;
    const size_t gbytes = qk_int4gx8_group_bytes(j->group);
    for (int r = 0; r < 8; r++) {
        const uint8_t *wg = w;
        float acc = 0.0f;
        for (int g = 0; g < ng; g++, wg += gbytes) {
            float sc;
            memcpy(&sc, wg + 4 * r, 4);
            const int z = wg[32 + r];
            for (int i = 0; i < per; i++) {
                const int b = g * per + i;
                const uint8_t *q = wg + INT4GX8_HEAD + i * INT4GX8_BLOCK - 16;
                const int8_t *ab = a + (size_t)b * QK8;
                int s = 0;
                for (int k = 0; k < 32; k++) {
                    int shift;
                    const int pos = qk_x8_pos(r, k, &shift);
                    s += ((q[pos] >> shift) & 0x0f) * ab[k];
                }
                s -= z * as[b];
                acc += (sc * ad[b]) * (float)s;
            }
        }
        out[r] = acc;
    }
}

/* Q4_0X8 (five = 0) and Q5_0X8 (five = 1, bit 4 of each code from the masks after the nibbles). */
static void dot8_nibbles(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                         float out[8], int five) {
    const int nb = j->K / QK8, offset = five ? 16 : 8;
    const size_t bytes = five ? Q5_0X8_BYTES : Q4_0X8_BYTES;
    for (int r = 0; r < 8; r++) {
        const uint8_t *wb = w;
        float acc = 0.0f;
        for (int b = 0; b < nb; b++, wb += bytes) {
            const int8_t *ab = a + b * QK8;
            int s = 0;
            for (int k = 0; k < 32; k++) {
                int shift, m;
                const int pos = qk_x8_pos(r, k, &shift), bit = qk_x8_mask_bit(r, k, &m);
                const int hi = five ? wb[Q4_0X8_BYTES + 8 * m + bit / 8] >> (bit % 8) & 1 : 0;
                s += (((wb[pos] >> shift) & 0x0f) | hi << 4) * ab[k];
            }
            s -= offset * as[b];
            acc += (qk_h2f_at(wb + 2 * r) * ad[b]) * (float)s;
        }
        out[r] = acc;
    }
}

static void dot8_q4_0x8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                        const void *prep, float out[8]) {
    dot8_nibbles(j, w, a, ad, as, out, 0);
}

static void dot8_q5_0x8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                        const void *prep, float out[8]) {
    dot8_nibbles(j, w, a, ad, as, out, 1);
}

static void dot8_q8_0x8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                        const void *prep, float out[8]) {
    const int nb = j->K / QK8;
    for (int r = 0; r < 8; r++) {
        const uint8_t *wb = w;
        float acc = 0.0f;
        for (int b = 0; b < nb; b++, wb += Q8_0X8_BYTES) {
            const int8_t *ab = a + b * QK8;
            int s = 0;
            for (int k = 0; k < 32; k++) s += (int8_t)wb[qk_x8q8_pos(r, k)] * ab[k];
            acc += (qk_h2f_at(wb + 2 * r) * ad[b]) * (float)s;
        }
        out[r] = acc;
    }
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
#define QK_DOT8_Q4_0X8
#define QK_DOT8_Q8_0X8
#define QK_DOT8_Q5_0X8
#define QK_DOT8_INT4GX8
#include "rows.h"

void qk_fill_scalar(qk_kernels *k) {
    qk_rows_fill(k);
    k->rows[QK_L_Q4_0X2] = rows_q4_0x2;
}
