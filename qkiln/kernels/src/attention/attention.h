/* attention.h — fused causal grouped-query attention (prefill), shared by the portable, AVX2 and AVX-512 files.
 *
 * Layout (what runtime/llama.py has at hand; strides in floats, the head_dim axis contiguous):
 *   q    (b, s, n_heads, d)      rotated queries, strides q_strides = {batch, position, head}
 *   k, v (b, kv_heads, t, d)     t >= s; the queries are the last s of the t key positions
 *   out  (b * s, n_heads * d)    contiguous
 * Query head h reads kv head h / (n_heads / kv_heads). Scores are (q * 1/sqrt(d)) . k, query i sees keys
 * 0 .. t - s + i. Flash-attention style: a work unit is (batch, kv head, block of queries) for all n_rep
 * query heads sharing that kv head; it packs its queries (scaled, in base-2 score units), its keys
 * transposed in 64-key panels and (if d % 16) its values once, then streams key blocks per group of
 * query rows with an online softmax (running max and sum), so the s x t score matrix never exists and
 * keys after a query's position are skipped. Each row's arithmetic is the same whatever the thread count
 * or grouping, so results do not depend on them.
 */
#ifndef QKILN_ATTENTION_H
#define QKILN_ATTENTION_H

#include <stdint.h>
#include <string.h>

#include "pow2.h"

#define QK_ATTN_NB 64 /* keys per block (both variants) */
#define QK_ATTN_RMAX 12 /* most query rows per row group (AVX-512: 12, portable: 8) */

typedef struct {
    const float *q, *k, *v;
    float *out;
    int b, s, t, n_heads, kv_heads, d;
    long qs_b, qs_s, qs_h; /* q strides (floats) */
    long ks_b, ks_h, ks_t; /* k strides */
    long vs_b, vs_h, vs_t; /* v strides */
    int qblock;            /* queries per work unit */
    int nqb;               /* query blocks per (batch, kv head) */
    int qrows;             /* qblock * n_rep rounded up to QK_ATTN_QALIGN: rows of the packed queries */
    int dp;                /* d rounded up to 16 (padded value / output rows) */
    int tpad;              /* largest key count of a unit rounded up to QK_ATTN_NB */
} qk_attn_args;

#define QK_ATTN_QALIGN 24 /* a multiple of both variants' row-group sizes */

/* Floats of per-thread scratch a unit needs: packed keys and values (attention.h top), the unit's scaled
 * queries (qrows, d), and per row group scores (RMAX, NB), output (RMAX, dp), sums (RMAX, 16). */
static inline long qk_attn_scratch_floats(const qk_attn_args *a) {
    return (long)a->d * a->tpad + (long)a->tpad * a->dp + (long)a->qrows * a->d +
           (long)QK_ATTN_RMAX * (QK_ATTN_NB + a->dp + 16 + 2) + 16 * 8;
}

/* Floats of per-thread scratch the bf16 units need (attention_bf16.c): bf16 key tiles (tpad, d rounded
 * up to 32), value tiles (tpad, dp), scaled queries (qrows rounded up to 16, d rounded up to 32), then per
 * row group of 16 scores (16, NB), two blocks' probabilities 2 x (16, NB) bf16, output (16, dp) and sums (16, 16). Every piece starts 64-byte aligned (tpad is a multiple of 64). */
static inline long qk_attn_scratch_floats_bf16(const qk_attn_args *a) {
    const long d32 = (a->d + 31) / 32 * 32, r16 = (a->qrows + 15) / 16 * 16;
    return (long)a->tpad * d32 / 2 + (long)a->tpad * a->dp / 2 + r16 * d32 / 2 +
           16L * (QK_ATTN_NB + QK_ATTN_NB + a->dp + 16);
}

/* Unit u in [0, b * kv_heads * nqb): the last query blocks (most keys) come first so a thread that
 * picks a unit late gets a small one. */
static inline void qk_attn_unit_coords(const qk_attn_args *a, int u, int *bi, int *g, int *qb) {
    const int per = a->b * a->kv_heads;
    *qb = a->nqb - 1 - u / per;
    *bi = (u % per) / a->kv_heads;
    *g = (u % per) % a->kv_heads;
}

/* The key position of the query of each of a row group's n rows from row0 (row = (i - q0) * n_rep + r, below;
 * padding rows past `rows` take the last row's): a row sees keys 0 .. pos. */
static inline void qk_attn_row_positions(const qk_attn_args *a, int q0, int row0, int rows, int n, int *pos) {
    const int n_rep = a->n_heads / a->kv_heads, first = a->t - a->s + q0;
    for (int rr = 0; rr < n; rr++) pos[rr] = first + (row0 + (rr < rows ? rr : rows - 1)) / n_rep;
}

/* 2^x for the softmax, whose scores are in base 2 (log2 e is folded into the query scale, so a score
 * costs one multiply less than e^x would): n = round(x), r = x - n (exact) in [-1/2, 1/2], degree-7 Taylor
 * polynomial of e^(r ln 2) (truncation 5e-9 relative), times 2^(n >> 1) * 2^(n - (n >> 1)) so results
 * below FLT_MIN round once into subnormals and 2^(-inf) = 2^(x < -150) = 0. x is clamped to [-160, 127].
 * Max relative error ~1 ulp over [-126, 0] (tested); below -126 the result is subnormal and within one
 * subnormal step. Branch-free so compilers vectorize loops calling it. */
#define QK_EXP2_LO (-160.0f)
#define QK_EXP2_HI (127.0f)
#define QK_LOG2E 1.44269504088896341
#define QK_EXP2_C1 0.693147180559945309f /* ln2^k / k! */
#define QK_EXP2_C2 0.240226506959100712f
#define QK_EXP2_C3 0.0555041086648215800f
#define QK_EXP2_C4 0.00961812910762847716f
#define QK_EXP2_C5 0.00133335581464284434f
#define QK_EXP2_C6 0.000154035303933816099f
#define QK_EXP2_C7 1.52527338040598403e-5f
#define QK_ROUND_SHIFT 12582912.0f /* 1.5 * 2^23: x + shift - shift rounds x to nearest even integer */

static inline float qk_attn_exp2f(float x) {
    x = x < QK_EXP2_LO ? QK_EXP2_LO : x; /* NaN-free inputs only; -inf -> LO */
    x = x > QK_EXP2_HI ? QK_EXP2_HI : x;
    const float n = (x + QK_ROUND_SHIFT) - QK_ROUND_SHIFT;
    const float r = x - n;
    float p = QK_EXP2_C7;
    p = p * r + QK_EXP2_C6;
    p = p * r + QK_EXP2_C5;
    p = p * r + QK_EXP2_C4;
    p = p * r + QK_EXP2_C3;
    p = p * r + QK_EXP2_C2;
    p = p * r + QK_EXP2_C1;
    p = p * r + 1.0f;
    return qk_times_pow2(p, n);
}

/* Rows of a unit are (query, head) pairs, query-major: row = (i - q0) * n_rep + r, so a row group holds
 * every head of a few positions (a short chunk's rows fill a few groups instead of n_rep groups of one row
 * per position, and the causal triangle inside a group spans fewer positions). Packed queries: per group of
 * QK_ATTN_QG rows, the (d, QK_ATTN_QG) transpose, so a group's broadcasts for one element are adjacent.
 * Index of (row, element c): */
#define QK_ATTN_QG 12
static inline long qk_attn_qidx(const qk_attn_args *a, int row, int c) {
    return ((long)(row / QK_ATTN_QG) * a->d + c) * QK_ATTN_QG + row % QK_ATTN_QG;
}

/* Pack keys [0, nkeys) of (batch bi, kv head g): Kt panels (npad / NB, d, NB), Vp (npad, dp), zero-padded
 * up to npad (a multiple of NB). */
void qk_attn_pack_kv(const qk_attn_args *a, int bi, int g, int nkeys, int npad, float *kt, float *vp);

/* Pack the unit's queries times log2(e)/sqrt(d) (scores in base 2), reading q in memory order, in the
 * qk_attn_qidx layout; rows past the block zero. */
void qk_attn_pack_q(const qk_attn_args *a, int bi, int g, int q0, int q1, float *qp);

/* The head of qk_decode_attention (a single query, a decode step): no packing, each query head one task
 * reading its keys and values in place. q: the head's d values; k, v: key/value j at k + j * ks, v + j * vs,
 * for j in [0, n); out: d values; sc: n + 16 floats of scratch (the scores). Scores are in base 2 (q times
 * log2(e)/sqrt(d), as the units), the softmax exact over all n keys (one max, one sum), so a head's result
 * depends only on its inputs and the variant. The portable head is attention.c's own. */
typedef void (*qk_attn_head_fn)(const float *q, const float *k, long ks, const float *v, long vs, int n, int d,
                                float *out, float *sc);
#if defined(__x86_64__)
#define QK_ATTN_HEAD_AVX512_MAX_D 256 /* the AVX-512 head's scaled query is a stack buffer this long */
void qk_attn_head_avx512(const float *q, const float *k, long ks, const float *v, long vs, int n, int d, float *out,
                         float *sc);
#endif

/* One work unit; `scratch` holds qk_attn_scratch_floats(a) floats, 64-byte aligned. */
void qk_attn_unit_portable(const qk_attn_args *a, int u, float *scratch);
#if defined(__x86_64__)
void qk_attn_unit_avx512(const qk_attn_args *a, int u, float *scratch);
void qk_attn_exp2_avx512(const float *x, float *y, long n);
void qk_attn_unit_avx2(const qk_attn_args *a, int u, float *scratch); /* attention_avx2.c: AVX2 and FMA */
void qk_attn_exp2_avx2(const float *x, float *y, long n);
/* The bf16 units (attention_bf16.c); scratch: qk_attn_scratch_floats_bf16. The AMX one needs
 * qk_bf16_amx_available() (x86/bf16.c: cpuid, XCR0 and the Linux tile-data permission) and AVX-512, the
 * AVX512_BF16 one the cpu.h feature QK_CPU_AVX512_BF16. */
void qk_attn_unit_amx(const qk_attn_args *a, int u, float *scratch);
void qk_attn_unit_avx512bf16(const qk_attn_args *a, int u, float *scratch);
int qk_bf16_amx_available(void);
#endif

#endif
