/* qkiln_kernels.h — the one C ABI of qkiln's quantized matrix kernels.
 *
 * y = W x for a quantized weight matrix W (N rows, K columns) and M activation rows x (M, K), fp32 out
 * y (M, N) row-major. Activations are first quantized per 32-element block to int8 in [-127, 127]
 * with an fp32 scale (llama.cpp's Q8_0 rule, rounding half to even) and the block's integer sum; every
 * kernel then computes exact per-block integer dot products and combines them in fp32.
 *
 * Weight layouts (one row = K/QK blocks, rows contiguous, row stride = blocks * block bytes):
 *   QK_Q4_0   llama.cpp block_q4_0: fp16 d, 16 bytes; byte j = elem j (low nibble) | elem j+16 (high); w = d*(q-8)
 *   QK_Q8_0   llama.cpp block_q8_0: fp16 d, 32 int8;   w = d*q
 *   QK_Q5_0   llama.cpp block_q5_0 (22 bytes): fp16 d, u32 qh (little-endian; bit j = bit 4 of elem j), 16 bytes
 *             of low nibbles in Q4_0's order; w = d*(q-16), q = nibble | bit<<4 in 0..31
 *   QK_Q4_1   llama.cpp block_q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes in Q4_0's nibble order; w = d*q + m
 *   QK_Q5_1   llama.cpp block_q5_1 (24 bytes): fp16 d, fp16 m, u32 qh, 16 bytes; w = d*q + m, q in 0..31
 *   QK_Q2_K   llama.cpp block_q2_K (256 elems, 84 bytes): scales[16] (4-bit sc low, 4-bit m high), qs[64] (elem
 *             128h + 32s + l at bits 2s of byte 32h + l), fp16 d, fp16 dmin; w = d*sc*q - dmin*m per 16-elem sub-block
 *   QK_Q3_K   llama.cpp block_q3_K (256 elems, 110 bytes): hmask[32] (bit t of byte l = bit 2 of elem 32t + l),
 *             qs[64] (low 2 bits, as Q2_K), scales[12] (16 six-bit sc + 32), fp16 d; w = d*sc*(q-4) per 16 elems
 *   QK_Q4_K   llama.cpp block_q4_K (256 elems, 144 bytes): w = d*sc*q - dmin*m per 32-elem sub-block
 *   QK_Q5_K   llama.cpp block_q5_K (256 elems, 176 bytes): Q4_K's d, dmin, scales, then qh[32] (bit j of byte l =
 *             bit 4 of elem 32j + l) before qs[128]; q in 0..31
 *   QK_Q6_K   llama.cpp block_q6_K (256 elems, 210 bytes): w = d*sc*(q-32) per 16-elem sub-block
 * Per 32-element block b with activation scale da, codes a and their sum sa (qk_quantize_q8's `sums`), the
 * exact integer isum = sum_j q_j*a_j enters the fp32 result as
 *   Q4_0, Q5_0, Q8_0:  da * d * (isum - o*sa)        (o = 8, 16, 0: the offset folded into the integer part)
 *   Q4_1, Q5_1:        da * (d*isum + m*sa)           (the min term: llama.cpp's Q8_1 `s`, as Q4_K's dmin*m)
 *   Q4_K, Q5_K:        da * (d*sc*isum - dmin*mn*sa)
 *   Q2_K:              da * (d*(sc0*isum0 + sc1*isum1) - dmin*(m0*sa0 + m1*sa1))   (per 16-elem half: its own sums)
 *   Q3_K, Q6_K:        da * d * (sc0*isum0 + sc1*isum1)  (isum over the signed codes q-4 / q-32)
 *   QK_Q4_0X2 Q4_0 repacked for smmla: row pairs interleaved per block (see qk_repack_q4_0x2); N padded to even
 *   QK_Q4_0X8 Q4_0 repacked for AVX-512 VNNI: 8-row groups (see qk_repack_q4_0x8); N padded to a multiple of 8
 *   QK_Q5_0X8 Q5_0 the same way, bit 4 of the codes as byte masks (see qk_repack_q5_0x8)
 *   INT4 with group size G (multiple of 32) and zero points: codes in Q4_0's nibble order per 32-elem block,
 *             (N, K/2) bytes; scales fp32 (N, K/G); zeros uint8 (N, K/G) in 0..15; w = (q - z) * s
 */
#ifndef QKILN_KERNELS_H
#define QKILN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QK_ABI_VERSION 1

/* What the shared library exports: exactly the functions declared here (it is built with
 * -fvisibility=hidden, so the kernels' internal helpers stay private; tests/kernels/test_exports.py checks). */
#ifndef QK_API
#define QK_API __attribute__((visibility("default")))
#endif

enum qk_wtype { QK_Q4_0 = 2, QK_Q4_1 = 3, QK_Q5_0 = 6, QK_Q5_1 = 7, QK_Q8_0 = 8, QK_Q2_K = 10, QK_Q3_K = 11,
                QK_Q4_K = 12, QK_Q5_K = 13, QK_Q6_K = 14,
                QK_Q4_0X2 = 100, QK_INT4G = 101, QK_Q4_0X8 = 102, QK_Q8_0X8 = 103, QK_INT4GX8 = 104,
                QK_Q5_0X8 = 105 };

/* Kernel paths; a process uses one, chosen at first use (best available) or by QKILN_KERNEL. */
enum qk_path { QK_PATH_SCALAR = 0, QK_PATH_AVX2 = 1, QK_PATH_AVX512 = 2, QK_PATH_NEON = 3,
               QK_PATH_DOTPROD = 4, QK_PATH_I8MM = 5, QK_PATH_SVE = 6, QK_NPATHS = 7 };

QK_API int qk_abi_version(void);
/* Name of the path in use ("scalar", "avx2", ...). Selects the default path on first call. */
QK_API const char *qk_path_name(void);
/* Bit mask (1 << qk_path) of the paths this CPU and build can run. */
QK_API unsigned qk_available_paths(void);
QK_API const char *qk_path_name_of(int path);
/* Force a path by name. Returns 0 on success, -1 for an unknown name, -2 if this CPU cannot run it. */
QK_API int qk_set_path(const char *name);
/* Bytes of one SVE vector (0 where there is no SVE); for reports. */
QK_API int qk_sve_bytes(void);

/* Quantize activations x (M, K), K % 32 == 0: qs (M, K) int8, d (M, K/32) fp32, sums (M, K/32) int32. */
QK_API void qk_quantize_q8(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums);

/* y (M, N) = W x. `w` points at the weight bytes in `wtype`'s layout; for QK_INT4G use qk_gemm_int4g.
 * nthreads <= 0 means one thread per core. Returns 0, or -1 for bad sizes/type. */
QK_API int qk_gemm(int wtype, const void *w, int N, int K, const int8_t *qs, const float *d, const int32_t *sums,
            int M, float *y, int nthreads);
QK_API int qk_gemm_int4g(const uint8_t *codes, const float *scales, const uint8_t *zeros, int group, int N, int K,
                  const int8_t *qs, const float *d, const int32_t *sums, int M, float *y, int nthreads);

/* Quantize x (M, K) and multiply in one call (scratch kept per thread); same return codes as qk_gemm. */
QK_API int qk_linear_f32(int wtype, const void *w, int N, int K, const float *x, int M, float *y, int nthreads);

/* Repack Q4_0 (N, K) into QK_Q4_0X2 (ceil(N/2) row pairs; per pair and block: fp16 d0, fp16 d1, then
 * 32 bytes = r0 bytes 0-7, r1 bytes 0-7, r0 bytes 8-15, r1 bytes 8-15). dst holds qk_q4_0x2_bytes(N, K). */
QK_API size_t qk_q4_0x2_bytes(int N, int K);
QK_API void qk_repack_q4_0x2(const void *src, int N, int K, void *dst);

/* Memory bandwidth probes for benchmarks, on the same thread pool: copy `bytes` from src to dst, or read
 * src (returns a checksum so the reads are not optimized away). */
QK_API void qk_copy_mt(void *dst, const void *src, size_t bytes, int nthreads);
QK_API uint64_t qk_read_mt(const void *src, size_t bytes, int nthreads);

/* Repack Q4_0 (N, K) into QK_Q4_0X8 for the AVX-512 VNNI GEMV: groups of 8 rows (N padded with zero rows),
 * per group and block 144 bytes: 8 fp16 scales (row order), then 2 chunks of 64 bytes; in chunk c, byte
 * 4*L + j (lane L = 8*h + r) holds q[r][4*(2c+h) + j] in the low nibble and q[r][4*(2c+h+4) + j] in the high
 * nibble, so one vpdpbusd against a broadcast activation word yields one row's partial sum per int32 lane. */
QK_API size_t qk_q4_0x8_bytes(int N, int K);
/* Q8_0 the same way (QK_Q8_0X8): per group and block 8 fp16 scales, then 4 chunks of 64 bytes; in chunk c,
 * byte 4*L + j (L = 8*h + r) holds q[r][4*(2c+h) + j]. */
QK_API size_t qk_q8_0x8_bytes(int N, int K);
QK_API void qk_repack_q8_0x8(const void *src, int N, int K, void *dst);
QK_API void qk_repack_q4_0x8(const void *src, int N, int K, void *dst);
/* Q5_0 the same way (QK_Q5_0X8), 176 bytes per group and block: Q4_0X8's 144 bytes (the codes' low 4 bits),
 * then 4 little-endian u64 masks, mask v = 2c + s (s = 0 for the low nibbles of chunk c, 1 for the high ones)
 * with bit 4*L + j set where the code held by nibble s of byte 4*L + j of chunk c has bit 4 set: the masks
 * of the four vpdpbusd operands, which add 16 to those bytes. */
QK_API size_t qk_q5_0x8_bytes(int N, int K);
QK_API void qk_repack_q5_0x8(const void *src, int N, int K, void *dst);

/* INT4 with zero points repacked for the AVX-512 VNNI GEMV (QK_INT4GX8): groups of 8 rows (N padded with
 * zero rows); per 8-row group, for each weight group of G columns: 8 fp32 scales and 8 uint8 zero points
 * (row order, 40 bytes), then G/32 blocks of 128 code bytes in Q4_0X8's chunk order (the Q4_0X8 block
 * without its 16 scale bytes). One 8-row group is K/G * (40 + G/32 * 128) bytes. */
QK_API size_t qk_int4gx8_bytes(int N, int K, int group);
QK_API void qk_repack_int4gx8(const uint8_t *codes, const float *scales, const uint8_t *zeros, int group, int N, int K,
                       void *dst);
QK_API int qk_gemm_int4gx8(const void *w, int group, int N, int K, const int8_t *qs, const float *d, const int32_t *sums,
                    int M, float *y, int nthreads);

/* ---- one decode step (src/decode.c) ----
 * A packed linear: y (N) = W x (K) in `wtype`'s layout (QK_INT4GX8 also reads `group`). */
typedef struct {
    int wtype;
    int N, K, group;
    const void *w;
} qk_linear_desc;

/* One decoder layer: the products reading the attention norm's output (q, k, v in that order, fused into one
 * or separate), o_proj, the products reading the MLP norm's output (gate, up), down_proj; RMSNorm weights
 * (hidden); the layer's key and value cache, each (kv_heads, max_len, head_dim) float32. */
typedef struct {
    const float *attn_norm, *mlp_norm;
    qk_linear_desc attn_in[3];
    int n_attn_in;
    qk_linear_desc o;
    qk_linear_desc mlp_in[2];
    int n_mlp_in;
    qk_linear_desc down;
    float *k_cache, *v_cache;
} qk_layer_desc;

typedef struct {
    int n_layers, hidden, n_heads, kv_heads, head_dim, inter, vocab, max_len;
    float eps;
    int nthreads;
    const qk_layer_desc *layers;
    const float *final_norm; /* (hidden) */
    qk_linear_desc head;     /* w == NULL: no head (the caller runs it) */
} qk_decoder_desc;

/* The token at position `pos` through every layer: h (hidden) is the embedding in, the last hidden state out;
 * cos/sin (head_dim/2) are RoPE's for `pos`; k/v are written at `pos` of each cache and attention reads
 * positions 0..pos. With a head and `logits` (vocab) non-NULL, also the final norm and the head. 0 or -1. */
QK_API int qk_decode_token(const qk_decoder_desc *m, float *h, int pos, const float *cos, const float *sin, float *logits);

/* Threads a call with nthreads <= 0 uses: one per online CPU, at most 64 (the caller and the pool's workers). */
QK_API int qk_default_threads(void);

/* ---- The entry points of the attention, element-wise, bf16 and GPTQ kernels (Python's ctypes tables in
 * qkiln/kernels/attention.py, elementwise.py, bf16.py and gptq.py bind these same signatures). --
 * `variant` selects an implementation: 0 = the best this CPU runs, then per module (elementwise/attention:
 * 1 portable, 2 AVX-512, attention also 3 AMX bf16, 4 AVX512_BF16, 5 AVX2; gptq: 1 portable, 2 AVX-512).
 * Return 0 on success, -1 bad arguments, -2 variant unavailable here, -3 out of memory, unless said otherwise. */

/* Element-wise (src/elementwise/): RMSNorm and silu(g)*u (out float32, or bfloat16 when obf16), rotate-half RoPE. */
QK_API int qk_rms_norm(int variant, const float *x, long xs, const float *w, void *out, long t, long n, float eps,
                int threads, int obf16);
QK_API int qk_silu_mul(int variant, const float *g, long gs, const float *u, long us, void *out, long t, long n,
                int threads, int obf16);
QK_API int qk_apply_rope(int variant, const float *x, const long *xstr, const float *cos, long cs, const float *sin,
                  long ss, float *out, long b, long s, long h, long d, int threads);
QK_API int qk_elementwise_exp(int variant, const float *x, float *y, long n);  /* the kernels' e^x, for its test */
QK_API int qk_elementwise_variant(void);                                        /* what variant 0 runs here */
/* float32 -> bfloat16 by the bf16 products' rule (bits, or with `wide` their float32 values), and back. */
QK_API int qk_round_bf16(const float *x, void *out, long n, int wide);
QK_API int qk_widen_bf16(const uint16_t *x, float *out, long n);

/* Causal grouped-query attention (src/attention/); strides in floats; qk_causal_attention is variant 0. */
QK_API int qk_causal_attention(const float *q, const float *k, const float *v, float *out, int b, int s, int t,
                               int n_heads, int kv_heads, int d, const long *q_strides, const long *k_strides,
                               const long *v_strides, int nthreads);
QK_API int qk_causal_attention_ex(int variant, const float *q, const float *k, const float *v, float *out, int b, int s,
                           int t, int n_heads, int kv_heads, int d, const long *q_strides, const long *k_strides,
                           const long *v_strides, int nthreads);
/* One query per batch row (s = 1) over t keys, for decode steps: a head per task, keys read in place; q strides
 * {batch, -, head}; sums in another order than qk_causal_attention's (src/attention/attention.c). */
QK_API int qk_decode_attention(int variant, const float *q, const float *k, const float *v, float *out, int b, int t,
                               int n_heads, int kv_heads, int d, const long *q_strides, const long *k_strides,
                               const long *v_strides, int nthreads);
QK_API int qk_attention_exp2(int variant, const float *x, float *y, long n);    /* the softmax's 2^x, for its test */
QK_API int qk_attention_variant(void);
QK_API int qk_attention_bf16_variant(void); /* 3 amx_bf16, 4 avx512_bf16, 0: neither runs here */

/* bfloat16 products on AMX tiles or AVX512_BF16 (src/x86/bf16.c; x86-64 builds only). engine: 1 AMX, 2 AVX512_BF16,
 * 0 the best available; qk_bf16_engines: the bits of those that can run here. */
QK_API int qk_bf16_amx_available(void);
QK_API int qk_bf16_engines(void);
QK_API size_t qk_bf16_packed_bytes(int64_t n, int64_t k);
QK_API void qk_bf16_pack_weight(const float *w, int64_t n, int64_t k, uint16_t *out);
QK_API void qk_bf16_round(const float *x, int64_t n, uint16_t *out);
QK_API int qk_bf16_linear(const float *x, int64_t m, int64_t k, const uint16_t *wpacked, int64_t n, float *y, int nthreads);
QK_API int qk_bf16_linear_ex(const void *x, int xbf16, int64_t m, int64_t k, const uint16_t *wpacked, int64_t n, void *y,
                      int mode, int ybf16, int nthreads, int engine);
QK_API int qk_bf16_gram(const float *x, int64_t m, int64_t k, float *out, int nthreads, int engine);
QK_API size_t qk_bf16_gram_acc_floats(int64_t k);
QK_API int qk_bf16_gram_acc(const void *x, int xbf16, int64_t m, int64_t k, float *acc, int first, int nthreads,
                            int engine);
QK_API int qk_bf16_gram_acc_write(const float *acc, int64_t k, float *out);

/* GPTQ's column scan and the INT grids' weighted range fit (src/gptq/); qk_int_fit_t also returns 1 when a
 * scale overflows float16. qk_gptq_variant: the variant a request runs (1 or 2), or -2. */
QK_API int qk_gptq_scan(int variant, float *w1, float *err1, uint8_t *codes, long count, long out, const float *h1, long ldh,
                 long k0, long k1, const int32_t *gidx, const float *scale_t, const float *safe_t,
                 const float *offset_t, float shift, float qmin, float qmax, int nthreads);
QK_API int qk_int_fit_t(int variant, const float *wt, long cols, long rows, long group, int bits, int symmetric,
                 const float *imp, const float *shrink, int nshrink, uint16_t *scale, uint8_t *zero, int nthreads);
QK_API int qk_gptq_variant(int variant);

#ifdef __cplusplus
}
#endif
#endif
