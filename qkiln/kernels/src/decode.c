/* One decode step (a single token) through every decoder layer of a Llama model whose linears are packed:
 * RMSNorm, int8 activation quantization, the packed products (through qk_gemm and its thread pool), RoPE,
 * the key/value cache write, single-query grouped attention over the cache (a query head per task on the same
 * pool), SwiGLU and the residuals — in C,
 * so a token costs one call instead of a few hundred NumPy operations and ctypes calls.
 *
 * It is the scalar definition of the step and follows runtime/llama.py's float32 math operation by operation
 * (rms_norm, apply_rope, causal_attention, silu_mul); only sums run in a different order (RMSNorm's sum of
 * squares in double, dot products in eight interleaved partial sums), so results agree with the NumPy runtime
 * within float32 rounding — and after that, within the int8 rounding of the activations that follow. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "threads.h"

/* x (n) -> out = x * (1 / sqrt(mean(x^2) + eps)) * w, as runtime.llama.rms_norm (float32 ops). */
static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float ms = (float)ss / (float)n;
    const float r = 1.0f / sqrtf(ms + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
}

/* Eight independent partial sums, so the compiler can vectorize without reassociating (no fast-math); inlined,
 * so each attend_head clone vectorizes it for its own target. */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Rotate one head in place: out1 = x1 c - x2 s, out2 = x2 c + x1 s (rotate_half order). */
static void rope(float *x, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
    }
}

/* Products sharing one input x (K): quantize once, run each, outputs concatenated into y. */
static int products(const qk_linear_desc *lin, int count, const float *x, int8_t *qs, float *d, int32_t *sums,
                    float *y, int nthreads) {
    const int K = lin[0].K;
    qk_quantize_q8(x, 1, K, qs, d, sums);
    for (int i = 0; i < count; i++) {
        if (lin[i].K != K) return -1;
        const int rc = lin[i].wtype == QK_INT4GX8
                           ? qk_gemm_int4gx8(lin[i].w, lin[i].group, lin[i].N, K, qs, d, sums, 1, y, nthreads)
                           : qk_gemm(lin[i].wtype, lin[i].w, lin[i].N, K, qs, d, sums, 1, y, nthreads);
        if (rc != 0) return rc;
        y += lin[i].N;
    }
    return 0;
}

/* One layer's single-query attention, a query head per task (each head's arithmetic is the same on any
 * thread, so the split never changes a result). */
typedef struct {
    const qk_decoder_desc *m;
    const qk_layer_desc *L;
    const float *q; /* rotated queries (n_heads * head_dim) */
    float *att;     /* out (n_heads * head_dim) */
    float *sc;      /* scores: (n_heads, pos + 1) */
    int pos;
    float scale;
} attn_job;

/* Query head i over cache positions 0..pos: softmax(scale * q.k) . v. Compiled for AVX-512 and AVX2 as well
 * where GCC can (target_clones, chosen at load): with -ffp-contract=off and the loops' fixed summation order
 * (dot's eight partial sums; the value sum one position at a time per element) every variant gives the same
 * bits, only wider. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void attend_head(void *ctx, long head) {
    const attn_job *a = ctx;
    const qk_decoder_desc *m = a->m;
    const int i = (int)head, hd = m->head_dim, pos = a->pos, g = i / (m->n_heads / m->kv_heads);
    const float *keys = a->L->k_cache + (size_t)g * m->max_len * hd;
    const float *vals = a->L->v_cache + (size_t)g * m->max_len * hd;
    float *sc = a->sc + (size_t)i * (pos + 1);
    float qc[hd];
    for (int j = 0; j < hd; j++) qc[j] = a->q[i * hd + j] * a->scale;
    float mx = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        sc[t] = dot(qc, keys + (size_t)t * hd, hd);
        mx = sc[t] > mx ? sc[t] : mx;
    }
    float denom = 0.0f;
    for (int t = 0; t <= pos; t++) {
        sc[t] = expf(sc[t] - mx);
        denom += sc[t];
    }
    float *o = a->att + i * hd;
    for (int j = 0; j < hd; j++) o[j] = 0.0f;
    for (int t = 0; t <= pos; t++)
        for (int j = 0; j < hd; j++) o[j] += sc[t] * vals[(size_t)t * hd + j];
    for (int j = 0; j < hd; j++) o[j] /= denom;
}

static int total_out(const qk_linear_desc *lin, int count) {
    int n = 0;
    for (int i = 0; i < count; i++) n += lin[i].N;
    return n;
}

int qk_decode_token(const qk_decoder_desc *m, float *h, int pos, const float *cos, const float *sin, float *logits) {
    const int H = m->hidden, nh = m->n_heads, kvh = m->kv_heads, hd = m->head_dim, half = hd / 2;
    const int q_out = nh * hd, kv_out = kvh * hd;
    if (pos < 0 || pos >= m->max_len || nh % kvh != 0 || hd % 2 != 0) return -1;
    int widest = H > m->inter ? H : m->inter;
    if (q_out > widest) widest = q_out;
    widest = (widest + QK8 - 1) / QK8 * QK8;
    const int qkv_n = q_out + 2 * kv_out, gu_n = 2 * m->inter;
    int big = qkv_n > gu_n ? qkv_n : gu_n; /* the head writes straight into logits */
    if (H > big) big = H;
    float *x = malloc(sizeof(float) * widest), *y = malloc(sizeof(float) * (size_t)big);
    float *att = malloc(sizeof(float) * q_out), *sc = malloc(sizeof(float) * (size_t)nh * (pos + 1));
    int8_t *qs = malloc((size_t)widest);
    float *d = malloc(sizeof(float) * (widest / QK8));
    int32_t *sums = malloc(sizeof(int32_t) * (widest / QK8));
    int rc = (x && y && att && sc && qs && d && sums) ? 0 : -1;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int l = 0; l < m->n_layers && rc == 0; l++) {
        const qk_layer_desc *L = &m->layers[l];
        if (total_out(L->attn_in, L->n_attn_in) != qkv_n || total_out(L->mlp_in, L->n_mlp_in) != gu_n) {
            rc = -1;
            break;
        }
        /* attention */
        rms_norm(h, L->attn_norm, H, m->eps, x);
        if ((rc = products(L->attn_in, L->n_attn_in, x, qs, d, sums, y, m->nthreads)) != 0) break;
        float *q = y, *k = y + q_out, *v = y + q_out + kv_out;
        for (int i = 0; i < nh; i++) rope(q + i * hd, cos, sin, half);
        for (int i = 0; i < kvh; i++) {
            rope(k + i * hd, cos, sin, half);
            memcpy(L->k_cache + ((size_t)i * m->max_len + pos) * hd, k + i * hd, sizeof(float) * hd);
            memcpy(L->v_cache + ((size_t)i * m->max_len + pos) * hd, v + i * hd, sizeof(float) * hd);
        }
        const attn_job aj = {m, L, q, att, sc, pos, scale};
        qk_parallel(attend_head, (void *)&aj, nh, m->nthreads);
        if ((rc = products(&L->o, 1, att, qs, d, sums, y, m->nthreads)) != 0) break;
        for (int i = 0; i < H; i++) h[i] += y[i];
        /* MLP */
        rms_norm(h, L->mlp_norm, H, m->eps, x);
        if ((rc = products(L->mlp_in, L->n_mlp_in, x, qs, d, sums, y, m->nthreads)) != 0) break;
        for (int i = 0; i < m->inter; i++) {
            const float g = y[i];
            x[i] = g / (1.0f + expf(-g)) * y[m->inter + i]; /* silu(gate) * up */
        }
        if ((rc = products(&L->down, 1, x, qs, d, sums, y, m->nthreads)) != 0) break;
        for (int i = 0; i < H; i++) h[i] += y[i];
    }
    if (rc == 0 && logits && m->head.w) { /* final norm and the head */
        rms_norm(h, m->final_norm, H, m->eps, x);
        rc = products(&m->head, 1, x, qs, d, sums, logits, m->nthreads);
    }
    free(x); free(y); free(att); free(sc); free(qs); free(d); free(sums);
    return rc;
}
