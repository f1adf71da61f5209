/* x86-64 AVX2 (+FMA, F16C) kernels. Compiled with -mavx2 -mfma -mf16c; only called after cpuid/xgetbv.
 * Signed weight codes meet the int8 activations through vpmaddubsw(|w|, sign(a, w)); that trick is exact
 * because activations are clamped to [-127, 127] (negating -128 would overflow). */
#include <immintrin.h>

#include "../common.h"

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 signed weights x 32 activations -> 8 int32 partial sums. */
static inline __m256i dot32(__m256i w, __m256i a) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* 16 packed bytes -> 32 codes 0..15 in element order (low nibbles, then high nibbles). */
static inline __m256i unpack_nibbles(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

static float dot_q4_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi8(8);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w1 = w + Q4_0_BYTES;
        const __m256i q0 = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        const __m256i q1 = _mm256_sub_epi8(unpack_nibbles(w1 + 2), eight);
        const __m256i p0 = dot32(q0, _mm256_loadu_si256((const __m256i *)a));
        const __m256i p1 = dot32(q1, _mm256_loadu_si256((const __m256i *)(a + QK8)));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_h2f_at(w) * ad[b]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(qk_h2f_at(w1) * ad[b + 1]), acc1);
        w += 2 * Q4_0_BYTES;
        a += 2 * QK8;
    }
    if (b < nb) {
        const __m256i q0 = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        const __m256i p0 = dot32(q0, _mm256_loadu_si256((const __m256i *)a));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_h2f_at(w) * ad[b]), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

static float dot_q8_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w1 = w + Q8_0_BYTES;
        const __m256i p0 = dot32(_mm256_loadu_si256((const __m256i *)(w + 2)), _mm256_loadu_si256((const __m256i *)a));
        const __m256i p1 =
            dot32(_mm256_loadu_si256((const __m256i *)(w1 + 2)), _mm256_loadu_si256((const __m256i *)(a + QK8)));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_h2f_at(w) * ad[b]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(qk_h2f_at(w1) * ad[b + 1]), acc1);
        w += 2 * Q8_0_BYTES;
        a += 2 * QK8;
    }
    if (b < nb) {
        const __m256i p0 = dot32(_mm256_loadu_si256((const __m256i *)(w + 2)), _mm256_loadu_si256((const __m256i *)a));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_h2f_at(w) * ad[b]), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* Q5_0/Q5_1's qh (32 bits at p) -> 32 bytes, 0xff where bit j (element j) is set (llama.cpp's
 * bytes_from_bits_32): byte j takes qh's byte j/8, ORs in every bit but j % 8, and compares with 0xff. */
static inline __m256i bits_to_bytes(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    return _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1));
}

/* Q5_0 codes minus 16, as signed bytes: nibble | 0xf0 where the high bit is clear (nibble - 16), the nibble
 * where it is set (nibble + 16 - 16). */
static inline __m256i q5_0_codes(const uint8_t *w) {
    const __m256i hb = bits_to_bytes(w + 2);
    return _mm256_or_si256(unpack_nibbles(w + 6), _mm256_andnot_si256(hb, _mm256_set1_epi8((char)0xf0)));
}

static float dot_q5_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w1 = w + Q5_0_BYTES;
        const __m256i p0 = dot32(q5_0_codes(w), _mm256_loadu_si256((const __m256i *)a));
        const __m256i p1 = dot32(q5_0_codes(w1), _mm256_loadu_si256((const __m256i *)(a + QK8)));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_h2f_at(w) * ad[b]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(qk_h2f_at(w1) * ad[b + 1]), acc1);
        w += 2 * Q5_0_BYTES;
        a += 2 * QK8;
    }
    if (b < nb) {
        const __m256i p0 = dot32(q5_0_codes(w), _mm256_loadu_si256((const __m256i *)a));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qk_h2f_at(w) * ad[b]), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* Q4_1 / Q5_1: unsigned codes (0..15 / 0..31) meet the activations directly in vpmaddubsw (31*127*2 fits an
 * int16); the min term m*sum(a) is summed apart, as Q4_K's dmin term. */
static inline float dot_min_blocks(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb,
                                   int bytes, int five) {
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    const __m256i ones16 = _mm256_set1_epi16(1), bit4 = _mm256_set1_epi8(0x10);
    for (int b = 0; b < nb; b++, w += bytes, a += QK8) {
        __m256i q = unpack_nibbles(w + (five ? 8 : 4));
        if (five) q = _mm256_or_si256(q, _mm256_and_si256(bits_to_bytes(w + 4), bit4));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)a)), ones16);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ad[b] * qk_h2f_at(w)), acc);
        corr += ad[b] * (qk_h2f_at(w + 2) * (float)as[b]);
    }
    return hsum8(acc) + corr;
}

static float dot_q4_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    return dot_min_blocks(w, a, ad, as, nb, Q4_1_BYTES, 0);
}

static float dot_q5_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    return dot_min_blocks(w, a, ad, as, nb, Q5_1_BYTES, 1);
}

static float dot_int4g(const uint8_t *codes, const float *sc, const uint8_t *zp, int group, const int8_t *a,
                       const float *ad, const int32_t *as, int nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int per_group = group / QK8;
    for (int g = 0; g < nb / per_group; g++) {
        const __m256i z = _mm256_set1_epi8((char)zp[g]);
        const float s = sc[g];
        for (int i = 0; i < per_group; i++) {
            const int b = g * per_group + i;
            const __m256i q = _mm256_sub_epi8(unpack_nibbles(codes + (size_t)b * 16), z);
            const __m256i p = dot32(q, _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8)));
            if (i & 1)
                acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * ad[b]), acc1);
            else
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * ad[b]), acc0);
        }
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* Q4_K / Q5_K: unsigned codes per 32-element sub-block j (Q5_K: bit 4 of element l is bit j of qh[l], moved
 * there by a 16-bit shift that stays inside each byte); the min term dmin*m*sum(a) from the activation sums. */
static inline float dot_q45_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb,
                              int five) {
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    const __m256i ones16 = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    for (int s = 0; s < nsb; s++, w += five ? Q5_K_BYTES : Q4_K_BYTES) {
        const float d = qk_h2f_at(w), dmin = qk_h2f_at(w + 2);
        const uint8_t *scales = w + 4, *qs = w + (five ? 48 : 16);
        const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        for (int j2 = 0; j2 < 4; j2++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + j2 * 32));
            const __m256i q[2] = {_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low)};
            for (int h = 0; h < 2; h++) {
                const int j = j2 * 2 + h, b = s * 8 + j;
                int sc, m;
                qk_q4k_scale_min(j, scales, &sc, &m);
                __m256i qj = q[h];
                if (five)
                    qj = _mm256_or_si256(qj, _mm256_and_si256(j < 4 ? _mm256_slli_epi16(qh, 4 - j) : _mm256_srli_epi16(qh, j - 4), bit4));
                const __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8));
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(qj, av), ones16);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ad[b] * (d * (float)sc)), acc);
                corr += ad[b] * ((dmin * (float)m) * (float)as[b]);
            }
        }
    }
    return hsum8(acc) - corr;
}

static float dot_q4_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    return dot_q45_k(w, a, ad, as, nsb, 0);
}

static float dot_q5_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    return dot_q45_k(w, a, ad, as, nsb, 1);
}

/* The per-16 scales of chunk c as int16 multipliers of vpmaddwd: the 8 lanes of elements 0-15 get signed byte
 * 2c of `sc` (a super-block's 16 scale bytes in both 128-bit halves), those of 16-31 byte 2c + 1 (placed in the
 * high byte of each lane, then shifted down with its sign). */
static inline __m256i scales16(__m256i sc, int c) {
    const __m256i sel = _mm256_set_m128i(_mm_set1_epi16((short)((2 * c + 1) << 8 | 0x80)),
                                         _mm_set1_epi16((short)((2 * c) << 8 | 0x80)));
    return _mm256_srai_epi16(_mm256_shuffle_epi8(sc, sel), 8);
}

/* 16 scale bytes at p in both halves of a vector, for scales16. */
static inline __m256i scale_bytes(const void *p) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)); }

/* 32 signed codes x 32 activations with per-16 scales (scales16) -> 8 int32. */
static inline __m256i dot32_sc16(__m256i q, __m256i a, __m256i sc16) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q));
    return _mm256_madd_epi16(p16, sc16);
}

/* Q2_K: 32-element chunk c = 4h + t of a super-block holds bits 2t of qs bytes 32h..32h+31; per 16-element
 * half, d*sc*sum(q*a) - dmin*m*sum(a), both sums integer (unsigned codes meet the activations directly). */
static float dot_q2_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i three = _mm256_set1_epi8(3), ones8 = _mm256_set1_epi8(1), low = _mm256_set1_epi8(0x0f);
    for (int s = 0; s < nsb; s++, w += Q2_K_BYTES) {
        const __m256i sm = scale_bytes(w), sc = _mm256_and_si256(sm, low), mn = _mm256_and_si256(_mm256_srli_epi16(sm, 4), low);
        const float d = qk_h2f_at(w + 80), dmin = qk_h2f_at(w + 82);
        for (int h = 0; h < 2; h++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * h));
            for (int t = 0; t < 4; t++) {
                const int c = 4 * h + t, b = s * 8 + c;
                const __m256i q = _mm256_and_si256(_mm256_srli_epi16(raw, 2 * t), three);
                const __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8));
                const __m256i isum = _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), scales16(sc, c));
                const __m256i msum = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, av), scales16(mn, c));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * ad[b]), acc);
                acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin * ad[b]), acc);
            }
        }
    }
    return hsum8(acc);
}

/* Q3_K's 16 signed scales (common.h's qk_q3k_scales) as bytes of a vector: low nibbles from bytes 0-7 (scales
 * 0-7 low, 8-15 high nibbles), bits 4-5 of scale 4k + i at bits 2k of byte 8 + i. */
static inline __m128i q3k_scales(const uint8_t *p) {
    uint64_t lo8;
    uint32_t x;
    memcpy(&lo8, p, 8);
    memcpy(&x, p + 8, 4);
    const __m128i v = _mm_cvtsi64_si128((long long)lo8), m4 = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
    const __m128i hi = _mm_and_si128(_mm_set_epi32((int)(x >> 6), (int)(x >> 4), (int)(x >> 2), (int)x), _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
}

/* Q3_K: Q2_K's low bits, bit 2 of chunk c's element l in bit c of hmask[l]; codes q - 4 (4 subtracted where
 * that bit is clear), signed per-16 scales. */
static float dot_q3_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), zero = _mm256_setzero_si256();
    for (int s = 0; s < nsb; s++, w += Q3_K_BYTES) {
        const __m256i hmask = _mm256_loadu_si256((const __m256i *)w);
        const __m256i scv = _mm256_broadcastsi128_si256(q3k_scales(w + 96));
        const float d = qk_h2f_at(w + 108);
        for (int h = 0; h < 2; h++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 32 + 32 * h));
            for (int t = 0; t < 4; t++) {
                const int c = 4 * h + t, b = s * 8 + c;
                const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(raw, 2 * t), three);
                const __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(hmask, _mm256_set1_epi8((char)(1 << c))), zero);
                const __m256i q = _mm256_sub_epi8(lo, _mm256_and_si256(clear, four));
                const __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8));
                const __m256i p = dot32_sc16(q, av, scales16(scv, c));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ad[b]), acc);
            }
        }
    }
    return hsum8(acc);
}

static float dot_q6_k(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nsb) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
    for (int s = 0; s < nsb; s++, w += Q6_K_BYTES) {
        const uint8_t *ql = w, *qh = w + 128;
        const __m256i scv = scale_bytes(w + 192);
        const float d = qk_h2f_at(w + 208);
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + h * 64));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + h * 64 + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + h * 32));
            const __m256i lo4[4] = {_mm256_and_si256(l0, low), _mm256_and_si256(l1, low),
                                    _mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), low)};
            for (int cc = 0; cc < 4; cc++) {
                const int c = h * 4 + cc, b = s * 8 + c;
                const __m256i hi2 = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * cc), three);
                const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo4[cc], _mm256_slli_epi16(hi2, 4)), off);
                const __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8));
                const __m256i p = dot32_sc16(q, av, scales16(scv, c));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ad[b]), acc);
            }
        }
    }
    return hsum8(acc);
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

void qk_fill_avx2(qk_kernels *k) { qk_rows_fill(k); }
