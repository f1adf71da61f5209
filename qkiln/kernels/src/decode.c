/* One decode step (a single token) through every decoder layer of a Llama model whose linears are packed:
 * RMSNorm, int8 activation quantization, the packed products (through qk_gemm and its thread pool), RoPE,
 * the key/value cache write, single-query grouped attention over the cache (qk_decode_attention: a query head per
 * task on the same pool), SwiGLU and the residuals — in C,
 * so a token costs one call instead of a few hundred NumPy operations and ctypes calls.
 *
 * It is the scalar definition of the step and follows runtime/llama.py's float32 math operation by operation
 * (rms_norm, apply_rope, causal_attention, silu_mul); only sums run in a different order (RMSNorm's sum of
 * squares in double, attention's as attention.c sums them), so results agree with the NumPy runtime
 * within float32 rounding — and after that, within the int8 rounding of the activations that follow. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* x (n) -> out = x * (1 / sqrt(mean(x^2) + eps)) * w, as runtime.llama.rms_norm (float32 ops). */
static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float ms = (float)ss / (float)n;
    const float r = 1.0f / sqrtf(ms + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * r) * w[i];
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
    float *att = malloc(sizeof(float) * q_out);
    int8_t *qs = malloc((size_t)widest);
    float *d = malloc(sizeof(float) * (widest / QK8));
    int32_t *sums = malloc(sizeof(int32_t) * (widest / QK8));
    int rc = (x && y && att && qs && d && sums) ? 0 : -1;
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
        const long kv_strides[3] = {(long)kvh * m->max_len * hd, (long)m->max_len * hd, hd};
        if ((rc = qk_decode_attention(0, q, L->k_cache, L->v_cache, att, 1, pos + 1, nh, kvh, hd, NULL, kv_strides,
                                      kv_strides, m->nthreads)) != 0)
            break;
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
    free(x); free(y); free(att); free(qs); free(d); free(sums);
    return rc;
}
