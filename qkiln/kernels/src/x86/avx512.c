/* x86-64 AVX-512 VNNI kernels (Ice Lake, Zen 4/5): vpdpbusd multiplies unsigned by signed bytes and sums
 * four products per int32 lane in one instruction, two 32-element blocks per 512-bit vector.
 *   Q4_0: codes 0..15 are already unsigned: sum(q*a) - sum(8*a); Q5_0 likewise with 0..31 and 16; Q4_1/Q5_1
 *   take sum(q*a) as is and add m*sum(a) apart.
 *   Q8_0: weights may be -128, so they are offset to unsigned (w ^ 0x80 = w + 128): sum((w+128)*a) - sum(128*a).
 * Both corrections are a second vpdpbusd against a constant, so every integer block sum stays exact. */
#include <immintrin.h>

#include "../common.h"

/* Software prefetch distance in bytes for the streamed X8 weights (decode reads them from L3 or DRAM). */
#define QK_PREFETCH 1024

/* [s0 x4, s1 x4, s0 x4, s1 x4] or [s0 x8, s1 x8] as 512-bit float vectors. */
static inline __m512 scales_interleaved(float s0, float s1) {
    const __m256 t = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
    const __m512d d = _mm512_castps_pd(_mm512_castps256_ps512(t));
    return _mm512_castpd_ps(_mm512_insertf64x4(d, _mm256_castps_pd(t), 1));
}

static inline __m512 scales_halves(float s0, float s1) {
    const __m512d d = _mm512_castps_pd(_mm512_castps256_ps512(_mm256_set1_ps(s0)));
    return _mm512_castpd_ps(_mm512_insertf64x4(d, _mm256_castps_pd(_mm256_set1_ps(s1)), 1));
}

static float dot_q4_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    __m512 acc = _mm512_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m512i eight = _mm512_set1_epi8(8);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + (size_t)b * Q4_0_BYTES, *w1 = w0 + Q4_0_BYTES;
        const __m256i raw = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(w1 + 2)),
                                             _mm_loadu_si128((const __m128i *)(w0 + 2)));
        const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); /* lo0 lo1 hi0 hi1 */
        __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));   /* a0lo a0hi a1lo a1hi */
        av = _mm512_shuffle_i64x2(av, av, _MM_SHUFFLE(3, 1, 2, 0));             /* a0lo a1lo a0hi a1hi */
        const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, av),
                                           _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, av));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales_interleaved(qk_h2f_at(w0) * ad[b], qk_h2f_at(w1) * ad[b + 1]), acc);
    }
    float tail = 0.0f;
    if (b < nb) {
        const uint8_t *w0 = w + (size_t)b * Q4_0_BYTES;
        const __m128i raw = _mm_loadu_si128((const __m128i *)(w0 + 2));
        const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
        const __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8));
        const __m256i s = _mm256_sub_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), q, av),
                                           _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(8), av));
        const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
        const int si = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, _MM_SHUFFLE(2, 3, 0, 1))));
        tail = (qk_h2f_at(w0) * ad[b]) * (float)si;
    }
    return _mm512_reduce_add_ps(acc) + tail;
}

static float dot_q8_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + (size_t)b * Q8_0_BYTES, *w1 = w0 + Q8_0_BYTES;
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + 2))),
                                             _mm256_loadu_si256((const __m256i *)(w1 + 2)), 1);
        const __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));
        const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(q, bias), av),
                                           _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, av));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales_halves(qk_h2f_at(w0) * ad[b], qk_h2f_at(w1) * ad[b + 1]), acc);
    }
    float tail = 0.0f;
    if (b < nb) {
        const uint8_t *w0 = w + (size_t)b * Q8_0_BYTES;
        const int8_t *q = (const int8_t *)(w0 + 2), *ab = a + (size_t)b * QK8;
        int si = 0;
        for (int j = 0; j < QK8; j++) si += q[j] * ab[j];
        tail = (qk_h2f_at(w0) * ad[b]) * (float)si;
    }
    return _mm512_reduce_add_ps(acc) + tail;
}

/* The 5-bit and min types. Codes stay unsigned for vpdpbusd: bit 4 of each Q5_0/Q5_1 code is added from qh
 * under a byte mask (AVX-512BW); Q5_0's offset comes back as 16 * sum(a) by a second vpdpbusd, Q4_1/Q5_1's min
 * as m * sum(a) summed apart (as the AVX2 and Q4_K code do). Two blocks per vector in Q4_0's order lo0 lo1 hi0
 * hi1, so the mask takes qh bits 0-15 (the low-nibble elements) and 16-31 (the high ones) of each block. */

/* Codes of two blocks (16 nibble bytes at q0 and q1) as lo0 lo1 hi0 hi1; with `five`, bit 4 from qh0/qh1. */
static inline __m512i codes_pair(const uint8_t *q0, const uint8_t *q1, int five, uint64_t h0, uint64_t h1) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i raw = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)q1), _mm_loadu_si128((const __m128i *)q0));
    const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if (!five) return q;
    const __mmask64 high = (h0 & 0xffff) | (h1 & 0xffff) << 16 | (h0 >> 16) << 32 | (h1 >> 16) << 48;
    return _mm512_mask_add_epi8(q, high, q, _mm512_set1_epi8(16));
}

static inline __m512i q5_0_pair(const uint8_t *w0, const uint8_t *w1) {
    return codes_pair(w0 + 6, w1 + 6, 1, qk_rd32(w0 + 2), qk_rd32(w1 + 2));
}

/* One block alone (an odd block count's last): sum(q * a) - offset * sum(a), exact. */
static inline int block_sum(const uint8_t *q16, int five, uint32_t qh, int offset, const int8_t *a) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)q16);
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
    if (five) q = _mm256_mask_add_epi8(q, (__mmask32)qh, q, _mm256_set1_epi8(16));
    const __m256i av = _mm256_loadu_si256((const __m256i *)a);
    const __m256i s = _mm256_sub_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), q, av),
                                       _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)offset), av));
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, _MM_SHUFFLE(2, 3, 0, 1))));
}

static float dot_q5_0(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i sixteen = _mm512_set1_epi8(16);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + (size_t)b * Q5_0_BYTES, *w1 = w0 + Q5_0_BYTES;
        const __m512i q = q5_0_pair(w0, w1);
        __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));
        av = _mm512_shuffle_i64x2(av, av, _MM_SHUFFLE(3, 1, 2, 0));
        const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, av),
                                           _mm512_dpbusd_epi32(_mm512_setzero_si512(), sixteen, av));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales_interleaved(qk_h2f_at(w0) * ad[b], qk_h2f_at(w1) * ad[b + 1]), acc);
    }
    float tail = 0.0f;
    if (b < nb) {
        const uint8_t *w0 = w + (size_t)b * Q5_0_BYTES;
        tail = (qk_h2f_at(w0) * ad[b]) * (float)block_sum(w0 + 6, 1, qk_rd32(w0 + 2), 16, a + (size_t)b * QK8);
    }
    return _mm512_reduce_add_ps(acc) + tail;
}

/* Q4_1 (five = 0) / Q5_1 (five = 1): block bytes d, m, [qh], nibbles. */
static inline __attribute__((always_inline)) float dot_min_blocks(const uint8_t *w, const int8_t *a, const float *ad,
                                                                  const int32_t *as, int nb, int bytes, int five) {
    __m512 acc = _mm512_setzero_ps();
    float corr = 0.0f;
    const int qoff = five ? 8 : 4;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + (size_t)b * bytes, *w1 = w0 + bytes;
        const __m512i q = codes_pair(w0 + qoff, w1 + qoff, five, five ? qk_rd32(w0 + 4) : 0, five ? qk_rd32(w1 + 4) : 0);
        __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));
        av = _mm512_shuffle_i64x2(av, av, _MM_SHUFFLE(3, 1, 2, 0));
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, av);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales_interleaved(ad[b] * qk_h2f_at(w0), ad[b + 1] * qk_h2f_at(w1)), acc);
        corr += ad[b] * (qk_h2f_at(w0 + 2) * (float)as[b]);
        corr += ad[b + 1] * (qk_h2f_at(w1 + 2) * (float)as[b + 1]);
    }
    if (b < nb) {
        const uint8_t *w0 = w + (size_t)b * bytes;
        const int si = block_sum(w0 + qoff, five, five ? qk_rd32(w0 + 4) : 0, 0, a + (size_t)b * QK8);
        corr += ad[b] * (qk_h2f_at(w0) * (float)si + qk_h2f_at(w0 + 2) * (float)as[b]);
    }
    return _mm512_reduce_add_ps(acc) + corr;
}

static float dot_q4_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    return dot_min_blocks(w, a, ad, as, nb, Q4_1_BYTES, 0);
}

static float dot_q5_1(const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as, int nb) {
    return dot_min_blocks(w, a, ad, as, nb, Q5_1_BYTES, 1);
}

/* Four rows against one activation row: the activation shuffle, its 8*sum correction and its scales are
 * computed once per block pair and shared by the four weight rows (decode GEMV is dominated by this loop). */
static void dot4_q4_0(const uint8_t *w, size_t stride, const int8_t *a, const float *ad, const int32_t *as, int nb,
                      float out[4]) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m512i eight = _mm512_set1_epi8(8);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));
        av = _mm512_shuffle_i64x2(av, av, _MM_SHUFFLE(3, 1, 2, 0));
        const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, av);
        const float a0 = ad[b], a1 = ad[b + 1];
        for (int r = 0; r < 4; r++) {
            const uint8_t *w0 = w + r * stride + (size_t)b * Q4_0_BYTES, *w1 = w0 + Q4_0_BYTES;
            const __m256i raw = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(w1 + 2)),
                                                 _mm_loadu_si128((const __m128i *)(w0 + 2)));
            const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            const __m512i sres = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, av), corr);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sres), scales_interleaved(qk_h2f_at(w0) * a0, qk_h2f_at(w1) * a1), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        out[r] = _mm512_reduce_add_ps(acc[r]);
        if (b < nb) out[r] += dot_q4_0(w + r * stride + (size_t)b * Q4_0_BYTES, a + (size_t)b * QK8, ad + b, as + b, 1);
    }
}

/* Four Q5_0 rows against one activation row, sharing the activation shuffle and its 16*sum correction. */
static void dot4_q5_0(const uint8_t *w, size_t stride, const int8_t *a, const float *ad, const int32_t *as, int nb,
                      float out[4]) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i sixteen = _mm512_set1_epi8(16);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));
        av = _mm512_shuffle_i64x2(av, av, _MM_SHUFFLE(3, 1, 2, 0));
        const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), sixteen, av);
        const float a0 = ad[b], a1 = ad[b + 1];
        for (int r = 0; r < 4; r++) {
            const uint8_t *w0 = w + r * stride + (size_t)b * Q5_0_BYTES, *w1 = w0 + Q5_0_BYTES;
            const __m512i sres = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q5_0_pair(w0, w1), av), corr);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sres), scales_interleaved(qk_h2f_at(w0) * a0, qk_h2f_at(w1) * a1), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        out[r] = _mm512_reduce_add_ps(acc[r]);
        if (b < nb) out[r] += dot_q5_0(w + r * stride + (size_t)b * Q5_0_BYTES, a + (size_t)b * QK8, ad + b, as + b, 1);
    }
}

/* Four Q8_0 rows against one activation row, sharing the activation load and its 128*sum correction. */
static void dot4_q8_0(const uint8_t *w, size_t stride, const int8_t *a, const float *ad, const int32_t *as, int nb,
                      float out[4]) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const __m512i av = _mm512_loadu_si512((const void *)(a + (size_t)b * QK8));
        const __m512i corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, av);
        const float a0 = ad[b], a1 = ad[b + 1];
        for (int r = 0; r < 4; r++) {
            const uint8_t *w0 = w + r * stride + (size_t)b * Q8_0_BYTES, *w1 = w0 + Q8_0_BYTES;
            const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + 2))),
                                                 _mm256_loadu_si256((const __m256i *)(w1 + 2)), 1);
            const __m512i sres = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(q, bias), av), corr);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sres), scales_halves(qk_h2f_at(w0) * a0, qk_h2f_at(w1) * a1), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        out[r] = _mm512_reduce_add_ps(acc[r]);
        if (b < nb) out[r] += dot_q8_0(w + r * stride + (size_t)b * Q8_0_BYTES, a + (size_t)b * QK8, ad + b, as + b, 1);
    }
}

/* The X8 repacks: eight rows per vpdpbusd lane group. prep broadcasts one activation row's words once, four
 * vectors per block: for Q4_0X8 and INT4GX8 [word 2c+h for lanes of half h] for the low nibbles and
 * [word 2c+h+4] for the high ones, for Q8_0X8 [word 2c+h] for chunk c. */
#define QK_PREP8_BYTES(nb) ((size_t)(nb) * 4 * sizeof(__m512i))

static void prep_nibbles(const int8_t *a, int nb, void *buf) {
    __m512i *ab = buf;
    const __m512i idx_lo[2] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                               _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2)};
    const __m512i four = _mm512_set1_epi32(4);
    for (int b = 0; b < nb; b++) {
        const __m512i words = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8)));
        for (int c = 0; c < 2; c++) {
            ab[b * 4 + 2 * c] = _mm512_permutexvar_epi32(idx_lo[c], words);
            ab[b * 4 + 2 * c + 1] = _mm512_permutexvar_epi32(_mm512_add_epi32(idx_lo[c], four), words);
        }
    }
}

static void prep_bytes(const int8_t *a, int nb, void *buf) {
    __m512i *ab = buf;
    for (int b = 0; b < nb; b++) {
        const __m512i words = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK8)));
        for (int c = 0; c < 4; c++) {
            const __m512i idx = _mm512_set_epi32(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                                                 2 * c + 1, 2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c,
                                                 2 * c, 2 * c);
            ab[b * 4 + c] = _mm512_permutexvar_epi32(idx, words);
        }
    }
}

/* One block of 8 rows' nibble codes (128 bytes at q) against the prepared block: 8 int32 sums of q * a. With
 * `masks` (Q5_0X8's four u64 at the block's byte 144), 16 is added to the codes whose bit 4 is set. */
static inline __attribute__((always_inline)) __m256i nibble_block8(const uint8_t *q, const uint8_t *masks,
                                                                   const __m512i *ab) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i v0 = _mm512_loadu_si512((const void *)q);
    const __m512i v1 = _mm512_loadu_si512((const void *)(q + 64));
    __m512i x[4] = {_mm512_and_si512(v0, m4), _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4),
                    _mm512_and_si512(v1, m4), _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4)};
    __m512i s = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) {
        if (masks) {
            __mmask64 hi;
            memcpy(&hi, masks + 8 * i, 8);
            x[i] = _mm512_mask_add_epi8(x[i], hi, x[i], _mm512_set1_epi8(16));
        }
        s = _mm512_dpbusd_epi32(s, x[i], ab[i]);
    }
    return _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
}

/* Q4_0X8 (five = 0) and Q5_0X8 (five = 1): per block sum(q * a) - offset * sum(a), exact, times d * da. */
static inline __attribute__((always_inline)) void dot8_nibbles(const qk_job *j, const uint8_t *w, const float *ad,
                                                               const int32_t *as, const void *prep, float out[8],
                                                               int five) {
    const int nb = j->K / QK8, offset = five ? 16 : 8;
    const size_t bytes = five ? Q5_0X8_BYTES : Q4_0X8_BYTES;
    const __m512i *ab = prep;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, w += bytes) {
        _mm_prefetch((const char *)(w + QK_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + QK_PREFETCH + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + QK_PREFETCH + 128), _MM_HINT_T0);
        const __m256i s8 = _mm256_sub_epi32(nibble_block8(w + 16, five ? w + Q4_0X8_BYTES : NULL, ab + b * 4),
                                            _mm256_set1_epi32(offset * as[b]));
        const __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)), _mm256_set1_ps(ad[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), sc, acc);
    }
    _mm256_storeu_ps(out, acc);
}

static void dot8_q4_0x8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                        const void *prep, float out[8]) {
    dot8_nibbles(j, w, ad, as, prep, out, 0);
}

static void dot8_q5_0x8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                        const void *prep, float out[8]) {
    dot8_nibbles(j, w, ad, as, prep, out, 1);
}

/* Q8_0X8: as Q4_0X8 with int8 codes offset to unsigned (w ^ 0x80) and 128 * sum(a) taken back per block. */
static void dot8_q8_0x8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                        const void *prep, float out[8]) {
    const int nb = j->K / QK8;
    const __m512i *ab = prep;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, w += Q8_0X8_BYTES) {
        for (int c = 0; c < 5; c++) _mm_prefetch((const char *)(w + QK_PREFETCH + 64 * c), _MM_HINT_T0);
        __m512i s = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++)
            s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + 16 + 64 * c)), bias),
                                    ab[b * 4 + c]);
        __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
        s8 = _mm256_sub_epi32(s8, _mm256_set1_epi32(128 * as[b]));
        const __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)), _mm256_set1_ps(ad[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), sc, acc);
    }
    _mm256_storeu_ps(out, acc);
}

/* INT4GX8: Q4_0X8's inner loop with per-row fp32 scales and zero points per weight group. The block's
 * integer sum is exact: sum(q * a) - z * sum(a) per lane; the activation scale multiplies it per block and
 * the weight scale once per weight group. */
static void dot8_int4gx8(const qk_job *j, const uint8_t *w, const int8_t *a, const float *ad, const int32_t *as,
                         const void *prep, float out[8]) {
    const int ng = j->K / j->group, per = j->group / QK8;
    const size_t gbytes = qk_int4gx8_group_bytes(j->group);
    const __m512i *ab = prep;
    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++, w += gbytes) {
        const __m256 sc = _mm256_loadu_ps((const float *)w);
        const __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 32)));
        const uint8_t *q = w + INT4GX8_HEAD;
        __m256 accg = _mm256_setzero_ps();
        for (int i = 0; i < per; i++, q += INT4GX8_BLOCK) {
            _mm_prefetch((const char *)(q + QK_PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + QK_PREFETCH + 64), _MM_HINT_T0);
            const int b = g * per + i;
            const __m256i s8 = _mm256_sub_epi32(nibble_block8(q, NULL, ab + b * 4), _mm256_mullo_epi32(z, _mm256_set1_epi32(as[b])));
            accg = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), _mm256_set1_ps(ad[b]), accg);
        }
        acc = _mm256_fmadd_ps(accg, sc, acc);
    }
    _mm256_storeu_ps(out, acc);
}

#define QK_DOT_Q4_0
#define QK_DOT4_Q4_0
#define QK_DOT_Q8_0
#define QK_DOT4_Q8_0
#define QK_DOT_Q5_0
#define QK_DOT4_Q5_0
#define QK_DOT_Q4_1
#define QK_DOT_Q5_1
#define QK_DOT8_Q4_0X8
#define QK_PREP8_Q4_0X8 prep_nibbles
#define QK_DOT8_Q8_0X8
#define QK_PREP8_Q8_0X8 prep_bytes
#define QK_DOT8_Q5_0X8
#define QK_PREP8_Q5_0X8 prep_nibbles
#define QK_DOT8_INT4GX8
#define QK_PREP8_INT4GX8 prep_nibbles
#include "rows.h"

void qk_fill_avx512(qk_kernels *k) { qk_rows_fill(k); }
