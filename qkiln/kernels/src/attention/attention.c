/* attention.c — the entry point of the fused causal attention (argument checks, work split, threads, the
 * run-time choice of variant) and its portable unit: register tiles of 4-float vectors written with GCC/Clang
 * vector extensions (SSE2 on baseline x86-64, NEON on aarch64) and plain loops the compiler vectorizes.
 * qk_decode_attention, for a single query (a decode step), skips the units: a task per query head reads its
 * keys in place (head_portable here, qk_attn_head_avx512). The AVX-512 unit is in attention_avx512.c, the bf16
 * units (variants 3 AMX and 4 AVX512_BF16, only on request: they round the inputs to bf16) in attention_bf16.c, the
 * AVX2 unit (variant 5, what variant 0 runs on x86-64 without AVX-512) in attention_avx2.c.
 * Layout and algorithm: attention.h.
 *
 *   int qk_causal_attention(q, k, v, out, b, s, t, n_heads, kv_heads, d, q_strides, k_strides, v_strides,
 *                           nthreads)              best variant; qk_causal_attention_ex(variant, ...) picks one
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "qkiln_kernels.h"
#include "attention/attention.h"
#include "cpu.h"
#include "threads.h"


#define PR 8 /* query rows per row group in the portable unit */

/* Pack the unit's keys transposed in panels of NB keys, Kt (tpad / NB, d, NB), so one key block's panel is
 * contiguous (a (d, tpad) matrix would put its rows a power of two apart: L1 set conflicts), and values,
 * Vp (tpad, dp); both zero-padded. */
void qk_attn_pack_kv(const qk_attn_args *a, int bi, int g, int nkeys, int npad, float *kt, float *vp) {
    const float *k = a->k + (long)bi * a->ks_b + (long)g * a->ks_h;
    const float *v = a->v + (long)bi * a->vs_b + (long)g * a->vs_h;
    const int d = a->d, dp = a->dp;
    for (int j = 0; j < nkeys; j++) {
        const float *kr = k + (long)j * a->ks_t;
        float *panel = kt + (long)(j / QK_ATTN_NB) * d * QK_ATTN_NB + j % QK_ATTN_NB;
        for (int c = 0; c < d; c++) panel[c * QK_ATTN_NB] = kr[c];
        memcpy(vp + (long)j * dp, v + (long)j * a->vs_t, sizeof(float) * d);
        for (int c = d; c < dp; c++) vp[(long)j * dp + c] = 0.0f;
    }
    for (int j = nkeys; j < npad; j++)
        for (int c = 0; c < d; c++) kt[(long)(j / QK_ATTN_NB) * d * QK_ATTN_NB + c * QK_ATTN_NB + j % QK_ATTN_NB] = 0.0f;
    memset(vp + (long)nkeys * dp, 0, sizeof(float) * (size_t)(npad - nkeys) * dp);
}

void qk_attn_pack_q(const qk_attn_args *a, int bi, int g, int q0, int q1, float *qp) {
    const int d = a->d, n_rep = a->n_heads / a->kv_heads, nq = q1 - q0;
    const float scale = (float)(QK_LOG2E / sqrt((double)d));
    for (int i = 0; i < nq; i++)
        for (int r = 0; r < n_rep; r++) {
            if (i + 8 < nq) /* positions are a stride apart, often a page: the hardware prefetcher stops there */
                for (int c = 0; c < d; c += 16)
                    __builtin_prefetch(a->q + (long)bi * a->qs_b + (long)(q0 + i + 8) * a->qs_s +
                                       (long)(g * n_rep + r) * a->qs_h + c);
            const float *src = a->q + (long)bi * a->qs_b + (long)(q0 + i) * a->qs_s + (long)(g * n_rep + r) * a->qs_h;
            float *dst = qp + qk_attn_qidx(a, i * n_rep + r, 0);
            for (int c = 0; c < d; c++) dst[c * QK_ATTN_QG] = src[c] * scale;
        }
    for (int row = nq * n_rep; row < a->qrows; row++)
        for (int c = 0; c < d; c++) qp[qk_attn_qidx(a, row, c)] = 0.0f;
}

/* Register tiles of 4-float vectors (GCC/Clang vector extensions: SSE2 on baseline x86-64, NEON on
 * aarch64, no intrinsics): PQ rows x 16 keys (scores) or x 16 value columns (output). NEON has 32 vector
 * registers, SSE2 16. */
#if defined(__aarch64__)
#define PQ 4
#else
#define PQ 2
#endif
#define PK 16
#define QK_VEC_LANES 4
#include "vec.h"

void qk_attn_unit_portable(const qk_attn_args *a, int u, float *scratch) {
    int bi, g, qb;
    qk_attn_unit_coords(a, u, &bi, &g, &qb);
    const int d = a->d, dp = a->dp, tp = a->tpad, n_rep = a->n_heads / a->kv_heads, offset = a->t - a->s;
    const int q0 = qb * a->qblock, q1 = q0 + a->qblock < a->s ? q0 + a->qblock : a->s;
    const int nkeys = offset + q1, npad = (nkeys + QK_ATTN_NB - 1) / QK_ATTN_NB * QK_ATTN_NB;
    float *kt = scratch;                     /* (tpad / NB, d, NB) */
    float *vp = kt + (long)d * tp;           /* (tpad, dp) */
    float *qall = vp + (long)tp * dp;        /* (qrows, d) scaled queries, qk_attn_qidx layout */
    float *sc = qall + (long)a->qrows * d;   /* (PR, NB) scores, then probabilities */
    float *o = sc + PR * QK_ATTN_NB;         /* (PR, dp) unnormalized output */
    float m[PR], l[PR], alpha[PR];           /* running max (base 2) and sum, this block's rescale */
    qk_attn_pack_kv(a, bi, g, nkeys, npad, kt, vp);
    qk_attn_pack_q(a, bi, g, q0, q1, qall);
    const int nrows = (q1 - q0) * n_rep;
    for (int row0 = 0; row0 < nrows; row0 += PR) {
        const int rows = nrows - row0 < PR ? nrows - row0 : PR;
        int pos[PR];
        qk_attn_row_positions(a, q0, row0, rows, PR, pos);
        for (int rr = 0; rr < PR; rr++) {
            m[rr] = -INFINITY;
            l[rr] = 0.0f;
        }
        memset(o, 0, sizeof(float) * PR * dp);
        const int last = pos[rows - 1];
        for (int j0 = 0; j0 <= last; j0 += QK_ATTN_NB) {
            const int nk = last + 1 - j0 < QK_ATTN_NB ? last + 1 - j0 : QK_ATTN_NB;
            const int nk16 = (nk + PK - 1) / PK * PK;
            const float *panel = kt + (long)j0 * d;
            for (int rb = 0; rb < PR; rb += PQ) { /* scores: PQ rows x PK keys */
                const float *qr[PQ];
                for (int x = 0; x < PQ; x++) qr[x] = qall + qk_attn_qidx(a, row0 + rb + x, 0);
                for (int jb = 0; jb < nk16; jb += PK) {
                    vf acc[PQ][PK / 4];
                    for (int x = 0; x < PQ; x++)
                        for (int j = 0; j < PK / 4; j++) acc[x][j] = splat(0.0f);
                    for (int c = 0; c < d; c++) {
                        const float *kr = panel + c * QK_ATTN_NB + jb;
                        const vf k0 = ldv(kr), k1 = ldv(kr + 4), k2 = ldv(kr + 8), k3 = ldv(kr + 12);
                        for (int x = 0; x < PQ; x++) {
                            const float qs = qr[x][c * QK_ATTN_QG];
                            const vf qv = splat(qs);
                            acc[x][0] += qv * k0;
                            acc[x][1] += qv * k1;
                            acc[x][2] += qv * k2;
                            acc[x][3] += qv * k3;
                        }
                    }
                    for (int x = 0; x < PQ; x++)
                        for (int j = 0; j < PK / 4; j++) stv(sc + (rb + x) * QK_ATTN_NB + jb + 4 * j, acc[x][j]);
                }
            }
            for (int rr = 0; rr < PR; rr++) { /* online softmax over keys [0, nk16) of the block */
                float *sr = sc + rr * QK_ATTN_NB;
                const int lim = pos[rr] - j0; /* last visible key of this row, relative to j0 */
                float mx = m[rr];
                for (int j = 0; j < nk16; j++) {
                    sr[j] = j > lim ? -INFINITY : sr[j];
                    mx = sr[j] > mx ? sr[j] : mx;
                }
                alpha[rr] = qk_attn_exp2f(m[rr] - mx); /* first block: 2^-inf = 0 */
                m[rr] = mx;
                float lane[PK] = {0};
                for (int jb = 0; jb < nk16; jb += PK)
                    for (int j = 0; j < PK; j++) {
                        sr[jb + j] = qk_attn_exp2f(sr[jb + j] - mx);
                        lane[j] += sr[jb + j];
                    }
                float sum = 0.0f;
                for (int j = 0; j < PK; j++) sum += lane[j];
                l[rr] = l[rr] * alpha[rr] + sum;
            }
            for (int rb = 0; rb < PR; rb += PQ) /* output: PQ rows x PK columns, rescaled as loaded */
                for (int cb = 0; cb < dp; cb += PK) { /* dp is a multiple of 16 */
                    vf acc[PQ][PK / 4];
                    for (int x = 0; x < PQ; x++) {
                        const vf al = splat(alpha[rb + x]);
                        for (int c = 0; c < PK / 4; c++) acc[x][c] = ldv(o + (rb + x) * dp + cb + 4 * c) * al;
                    }
                    for (int j = 0; j < nk; j++) {
                        const float *vr = vp + (long)(j0 + j) * dp + cb;
                        const vf v0 = ldv(vr), v1 = ldv(vr + 4), v2 = ldv(vr + 8), v3 = ldv(vr + 12);
                        for (int x = 0; x < PQ; x++) {
                            const float ps = sc[(rb + x) * QK_ATTN_NB + j];
                            const vf pv = splat(ps);
                            acc[x][0] += pv * v0;
                            acc[x][1] += pv * v1;
                            acc[x][2] += pv * v2;
                            acc[x][3] += pv * v3;
                        }
                    }
                    for (int x = 0; x < PQ; x++)
                        for (int c = 0; c < PK / 4; c++) stv(o + (rb + x) * dp + cb + 4 * c, acc[x][c]);
                }
        }
        for (int rr = 0; rr < rows; rr++) {
            const int i = q0 + (row0 + rr) / n_rep, h = g * n_rep + (row0 + rr) % n_rep;
            float *dst = a->out + ((long)bi * a->s + i) * ((long)a->n_heads * d) + (long)h * d;
            for (int c = 0; c < d; c++) dst[c] = o[rr * dp + c] / l[rr];
        }
    }
}

/* ---- a single query: one head per task ---- */

/* Sixteen partial sums (lane l: elements l, l + 16, ... in order), added as a fixed tree (lane l += lane l + w
 * for w = 8, 4, 2, 1): the compiler vectorizes it at any width without reassociating (no fast-math). */
static inline __attribute__((always_inline)) float dot16(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * b[i + l];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    float s = acc[0];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* o[c] = sum over j of p[j] * v[j * vs + c], j ascending, then / l, for `width` (a constant where inlined)
 * columns c: the sums stay in registers over the whole pass. */
static inline __attribute__((always_inline)) void weigh_values(const float *p, const float *v, long vs, int n,
                                                                int width, float l, float *o) {
    float r[64];
    for (int c = 0; c < width; c++) r[c] = 0.0f;
    for (int j = 0; j < n; j++)
        for (int c = 0; c < width; c++) r[c] += p[j] * v[(long)j * vs + c];
    for (int c = 0; c < width; c++) o[c] = r[c] / l;
}

/* The portable qk_attn_head_fn, in plain C, for any d. Built as GCC target clones on x86-64 (AVX2 where the CPU
 * has it, chosen at load; -ffp-contract=off and the fixed summation order give every clone the same bits). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void head_portable(const float *q, const float *k, long ks, const float *v, long vs, int n, int d, float *out,
                          float *sc) {
    const float scale = (float)(QK_LOG2E / sqrt((double)d));
    float qs[d];
    for (int c = 0; c < d; c++) qs[c] = q[c] * scale;
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
        sc[j] = dot16(qs, k + (long)j * ks, d);
        mx = sc[j] > mx ? sc[j] : mx;
    }
    float lane[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int x = 0; x < 16; x++) {
            sc[j + x] = qk_attn_exp2f(sc[j + x] - mx);
            lane[x] += sc[j + x];
        }
    for (; j < n; j++) {
        sc[j] = qk_attn_exp2f(sc[j] - mx);
        lane[0] += sc[j];
    }
    for (int w = 8; w > 0; w /= 2)
        for (int x = 0; x < w; x++) lane[x] += lane[x + w];
    int c = 0;
    for (; c + 64 <= d; c += 64) weigh_values(sc, v + c, vs, n, 64, lane[0], out + c);
    for (; c + 16 <= d; c += 16) weigh_values(sc, v + c, vs, n, 16, lane[0], out + c);
    for (; c < d; c++) weigh_values(sc, v + c, vs, n, 1, lane[0], out + c);
}

/* ---- driver ---- */

typedef void (*unit_fn)(const qk_attn_args *, int, float *);

typedef struct {
    const qk_attn_args *a;
    unit_fn fn;
    long scratch_floats; /* per thread */
    int nunits;
    atomic_int next;
    atomic_int failed;
} job_t;

/* Each thread keeps its scratch between calls (decode steps would otherwise pay an mmap and a page fault
 * per 4 KiB of packed keys every layer): the caller's, and the pool workers' (threads.c), which persist. */
static __thread float *tls_scratch;
static __thread size_t tls_bytes;

static float *thread_scratch(size_t bytes) {
    if (bytes > tls_bytes) {
        free(tls_scratch);
        tls_scratch = aligned_alloc(64, bytes);
        tls_bytes = tls_scratch ? bytes : 0;
    }
    return tls_scratch;
}

typedef struct {
    const qk_attn_args *a;
    qk_attn_head_fn fn;
    atomic_int failed;
} heads_job;

/* Task (batch bi, query head h): the query's keys are 0 .. t - 1 of its kv head. */
static void head_task(void *ctx, long task) {
    heads_job *job = ctx;
    const qk_attn_args *a = job->a;
    const int bi = (int)(task / a->n_heads), h = (int)(task % a->n_heads), g = h / (a->n_heads / a->kv_heads);
    float *sc = thread_scratch(((size_t)a->t + 16) * sizeof(float) / 64 * 64 + 64);
    if (!sc) {
        atomic_store(&job->failed, 1);
        return;
    }
    job->fn(a->q + (long)bi * a->qs_b + (long)h * a->qs_h, a->k + (long)bi * a->ks_b + (long)g * a->ks_h, a->ks_t,
            a->v + (long)bi * a->vs_b + (long)g * a->vs_h, a->vs_t, a->t, a->d,
            a->out + ((long)bi * a->n_heads + h) * a->d, sc);
}

/* One participant: units claimed in order until none are left. */
static void work(void *ctx, long participant) {
    job_t *job = ctx;
    const long n = job->scratch_floats;
    const size_t bytes = (size_t)((n * sizeof(float) + 63) / 64 * 64);
    float *scratch = thread_scratch(bytes);
    if (!scratch) {
        atomic_store(&job->failed, 1);
        return;
    }
    for (;;) {
        const int u = atomic_fetch_add(&job->next, 1);
        if (u >= job->nunits) break;
        job->fn(job->a, u, scratch);
    }
}

/* Variant: 0 = best float32 variant this CPU runs, 1 = portable, 2 = AVX-512, 3 = bf16 AMX, 4 = bf16 AVX512_BF16,
 * 5 = AVX2 (3 and 4 are never chosen by 0: their inputs are rounded to bf16). Which one `0` means here: */
int qk_attention_variant(void) { return qk_have_avx512() ? 2 : qk_have_avx2() ? 5 : 1; }

/* The fastest bf16 variant that can run here: 3 (AVX-512, AMX-BF16, and the OS granted the tile state), else 4
 * (AVX512_BF16), else 0. */
int qk_attention_bf16_variant(void) {
#if defined(__x86_64__)
    if (qk_have_avx512() && qk_bf16_amx_available()) return 3;
    if (qk_cpu_features() & QK_CPU_AVX512_BF16) return 4;
#endif
    return 0;
}

/* y = 2^x with the variant's softmax exp2 (for the error test). Returns 0, or -2 if the variant cannot run. */
int qk_attention_exp2(int variant, const float *x, float *y, long n) {
    if (variant == 0) variant = qk_attention_variant();
    if (variant == 1) {
        for (long i = 0; i < n; i++) y[i] = qk_attn_exp2f(x[i]);
        return 0;
    }
#if defined(__x86_64__)
    if (variant == 2 && qk_have_avx512()) { /* (the AMX unit's degree-4 2^x is not offered here) */
        qk_attn_exp2_avx512(x, y, n);
        return 0;
    }
    if (variant == 5 && qk_have_avx2()) {
        qk_attn_exp2_avx2(x, y, n);
        return 0;
    }
#endif
    return -2;
}

/* The call's qk_attn_args (sizes and strides; the units' blocking is the caller's), or -1 for bad sizes.
 * Strides (floats) of q {batch, position, head} and of k, v {batch, kv head, position}; NULL = contiguous. */
static int call_args(qk_attn_args *a, const float *q, const float *k, const float *v, float *out, int b, int s, int t,
                     int n_heads, int kv_heads, int d, const long *q_strides, const long *k_strides,
                     const long *v_strides) {
    if (b < 0 || s < 0 || t < s || d <= 0 || kv_heads <= 0 || n_heads <= 0 || n_heads % kv_heads) return -1;
    *a = (qk_attn_args){.q = q, .k = k, .v = v, .out = out, .b = b, .s = s, .t = t, .n_heads = n_heads,
                        .kv_heads = kv_heads, .d = d};
    a->qs_b = q_strides ? q_strides[0] : (long)s * n_heads * d;
    a->qs_s = q_strides ? q_strides[1] : (long)n_heads * d;
    a->qs_h = q_strides ? q_strides[2] : d;
    a->ks_b = k_strides ? k_strides[0] : (long)kv_heads * t * d;
    a->ks_h = k_strides ? k_strides[1] : (long)t * d;
    a->ks_t = k_strides ? k_strides[2] : d;
    a->vs_b = v_strides ? v_strides[0] : (long)kv_heads * t * d;
    a->vs_h = v_strides ? v_strides[1] : (long)t * d;
    a->vs_t = v_strides ? v_strides[2] : d;
    return 0;
}

/* One query per batch row against its t keys (a decode step), a task per query head reading the keys in place:
 * no packing, so it costs what reading the cache costs. Its sums run in another order than the units', so it
 * is a separate entry point: qk_causal_attention keeps a prompt's rows equal to the same tokens run one at a
 * time. Variant 2 runs the AVX-512 head where d % 16 == 0 and d <= QK_ATTN_HEAD_AVX512_MAX_D, else the
 * portable one; variant 3 is not offered. Arguments and returns as qk_causal_attention_ex's with s = 1. */
int qk_decode_attention(int variant, const float *q, const float *k, const float *v, float *out, int b, int t,
                        int n_heads, int kv_heads, int d, const long *q_strides, const long *k_strides,
                        const long *v_strides, int nthreads) {
    qk_attn_args a;
    if (call_args(&a, q, k, v, out, b, 1, t, n_heads, kv_heads, d, q_strides, k_strides, v_strides) != 0) return -1;
    if (variant == 0) variant = qk_attention_variant();
    qk_attn_head_fn head = NULL;
    if (variant == 1 || (variant == 5 && qk_have_avx2())) head = head_portable; /* its AVX2 clone on AVX2 CPUs */
#if defined(__x86_64__)
    if (variant == 2 && qk_have_avx512())
        head = d % 16 == 0 && d <= QK_ATTN_HEAD_AVX512_MAX_D ? qk_attn_head_avx512 : head_portable;
#endif
    if (!head) return -2;
    heads_job hj = {.a = &a, .fn = head};
    atomic_init(&hj.failed, 0);
    const long tasks = (long)b * n_heads;
    qk_parallel(head_task, &hj, tasks, (double)tasks * t * d < (double)(1 << 15) ? 1 : nthreads);
    return atomic_load(&hj.failed) ? -3 : 0;
}

/* nthreads <= 0: one thread per online CPU, at most the pool's QK_MAX_THREADS (qk_threads_resolve). Returns 0;
 * -1 bad sizes; -2 variant unavailable; -3 no memory. */
int qk_causal_attention_ex(int variant, const float *q, const float *k, const float *v, float *out, int b, int s,
                           int t, int n_heads, int kv_heads, int d, const long *q_strides, const long *k_strides,
                           const long *v_strides, int nthreads) {
    qk_attn_args a;
    if (call_args(&a, q, k, v, out, b, s, t, n_heads, kv_heads, d, q_strides, k_strides, v_strides) != 0) return -1;
    if (variant == 0) variant = qk_attention_variant();
    unit_fn fn = NULL;
    if (variant == 1) fn = qk_attn_unit_portable;
#if defined(__x86_64__)
    if (variant == 2 && qk_have_avx512()) fn = qk_attn_unit_avx512;
    if (variant == 3 && qk_attention_bf16_variant() == 3) fn = qk_attn_unit_amx;
    if (variant == 4 && (qk_cpu_features() & QK_CPU_AVX512_BF16)) fn = qk_attn_unit_avx512bf16;
    if (variant == 5 && qk_have_avx2()) fn = qk_attn_unit_avx2;
#endif
    if (!fn) return -2;
    if (b == 0 || s == 0) return 0;
    nthreads = qk_threads_resolve(nthreads);
    /* Small calls run on the caller alone: a unit packs its keys, too little work to share. */
    const double macs = (double)b * n_heads * s * ((double)(t - s) + (s + 1) / 2.0) * d;
    if (macs < (double)(1 << 22)) nthreads = 1;
    /* One query block per (batch, kv head) packs its keys once; with threads, split the queries so there
     * are about 4 units per thread (largest first balances the causal triangle). */
    const int pairs = b * kv_heads;
    int nqb = 1;
    if (nthreads > 1 && pairs < 4 * nthreads) nqb = (4 * nthreads + pairs - 1) / pairs;
    int qblock = (s + nqb - 1) / nqb;
    if (qblock > 512) qblock = 512; /* bounds the packed queries; re-packing keys per block costs little */
    qblock = (qblock + QK_ATTN_QALIGN - 1) / QK_ATTN_QALIGN * QK_ATTN_QALIGN; /* whole row groups */
    if (qblock > s) qblock = s;
    a.qblock = qblock;
    a.qrows = (qblock * (n_heads / kv_heads) + QK_ATTN_QALIGN - 1) / QK_ATTN_QALIGN * QK_ATTN_QALIGN;
    a.nqb = (s + qblock - 1) / qblock;
    a.dp = (d + 15) / 16 * 16;
    a.tpad = (t + QK_ATTN_NB - 1) / QK_ATTN_NB * QK_ATTN_NB;
    job_t job = {.a = &a, .fn = fn, .nunits = pairs * a.nqb,
                 .scratch_floats = variant == 3 || variant == 4 ? qk_attn_scratch_floats_bf16(&a) : qk_attn_scratch_floats(&a)};
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, 0);
    if (nthreads > job.nunits) nthreads = job.nunits;
    qk_parallel(work, &job, nthreads, nthreads);
    /* A thread without scratch left its units to the others; only all failing leaves work undone. */
    if (atomic_load(&job.failed) && atomic_load(&job.next) < job.nunits) return -3;
    return 0;
}

int qk_causal_attention(const float *q, const float *k, const float *v, float *out, int b, int s, int t, int n_heads,
                        int kv_heads, int d, const long *q_strides, const long *k_strides, const long *v_strides,
                        int nthreads) {
    return qk_causal_attention_ex(0, q, k, v, out, b, s, t, n_heads, kv_heads, d, q_strides, k_strides, v_strides,
                                  nthreads);
}
