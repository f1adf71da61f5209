/* One decode step (a single token) through every decoder layer of a Llama model whose linears are packed:
 * RMSNorm, int8 activation quantization, the packed products (through qk_gemm and its thread pool), RoPE,
 * the key/value cache write, single-query grouped attention over the cache (qk_decode_attention: a query head per
 * task on the same pool), SwiGLU and the residuals — in C,
 * so a token costs one call instead of a few hundred NumPy operations and ctypes calls.
 *
 * It is runtime/llama.py's forward for one token, operation by operation, with the same element-wise kernels
 * (qk_rms_norm, qk_apply_rope, qk_silu_mul: the best variant, on the caller); only attention sums in another
 * order (qk_decode_attention's, not the prefill units'), so results agree with the NumPy runtime within float32
 * rounding — and after that, within the int8 rounding of the activations that follow. */
#include <stdlib.h>
#include <string.h>

#include "common.h"

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
    const int H = m->hidden, nh = m->n_heads, kvh = m->kv_heads, hd = m->head_dim;
    const int q_out = nh * hd, kv_out = kvh * hd;
    if (pos < 0 || pos >= m->max_len || nh % kvh != 0 || hd % 2 != 0) return -1;
    int widest = H > m->inter ? H : m->inter;
    if (q_out > widest) widest = q_out;
    widest = (widest + QK8 - 1) / QK8 * QK8;
    const int qkv_n = q_out + 2 * kv_out, gu_n = 2 * m->inter;
    int big = qkv_n > gu_n ? qkv_n : gu_n; /* the head writes straight into logits */
    if (H > big) big = H;
    float *x = malloc(sizeof(float) * widest), *y = malloc(sizeof(float) * (size_t)big);
    float *att = malloc(sizeof(float) * q_out), *rot = malloc(sizeof(float) * (q_out + kv_out));
    int8_t *qs = malloc((size_t)widest);
    float *d = malloc(sizeof(float) * (widest / QK8));
    int32_t *sums = malloc(sizeof(int32_t) * (widest / QK8));
    int rc = (x && y && att && rot && qs && d && sums) ? 0 : -1;
    const long head_strides[3] = {0, 0, hd}; /* q and k: one position, heads hd apart */
    const long kv_strides[3] = {(long)kvh * m->max_len * hd, (long)m->max_len * hd, hd};
    for (int l = 0; l < m->n_layers && rc == 0; l++) {
        const qk_layer_desc *L = &m->layers[l];
        if (total_out(L->attn_in, L->n_attn_in) != qkv_n || total_out(L->mlp_in, L->n_mlp_in) != gu_n) {
            rc = -1;
            break;
        }
        /* attention */
        if ((rc = qk_rms_norm(0, h, H, L->attn_norm, x, 1, H, m->eps, 1, 0)) != 0) break;
        if ((rc = products(L->attn_in, L->n_attn_in, x, qs, d, sums, y, m->nthreads)) != 0) break;
        /* q and k (adjacent in y) rotated into rot, k and v then stored at pos of each kv head's cache */
        if ((rc = qk_apply_rope(0, y, head_strides, cos, 0, sin, 0, rot, 1, 1, nh + kvh, hd, 1)) != 0) break;
        const float *q = rot, *k = rot + q_out, *v = y + q_out + kv_out;
        for (int i = 0; i < kvh; i++) {
            memcpy(L->k_cache + ((size_t)i * m->max_len + pos) * hd, k + i * hd, sizeof(float) * hd);
            memcpy(L->v_cache + ((size_t)i * m->max_len + pos) * hd, v + i * hd, sizeof(float) * hd);
        }
        if ((rc = qk_decode_attention(0, q, L->k_cache, L->v_cache, att, 1, pos + 1, nh, kvh, hd, NULL, kv_strides,
                                      kv_strides, m->nthreads)) != 0)
            break;
        if ((rc = products(&L->o, 1, att, qs, d, sums, y, m->nthreads)) != 0) break;
        for (int i = 0; i < H; i++) h[i] += y[i];
        /* MLP */
        if ((rc = qk_rms_norm(0, h, H, L->mlp_norm, x, 1, H, m->eps, 1, 0)) != 0) break;
        if ((rc = products(L->mlp_in, L->n_mlp_in, x, qs, d, sums, y, m->nthreads)) != 0) break;
        if ((rc = qk_silu_mul(0, y, m->inter, y + m->inter, m->inter, x, 1, m->inter, 1, 0)) != 0) break;
        if ((rc = products(&L->down, 1, x, qs, d, sums, y, m->nthreads)) != 0) break;
        for (int i = 0; i < H; i++) h[i] += y[i];
    }
    if (rc == 0 && logits && m->head.w) { /* final norm and the head */
        rc = qk_rms_norm(0, h, H, m->final_norm, x, 1, H, m->eps, 1, 0);
        if (rc == 0) rc = products(&m->head, 1, x, qs, d, sums, logits, m->nthreads);
    }
    free(x); free(y); free(att); free(rot); free(qs); free(d); free(sums);
    return rc;
}
