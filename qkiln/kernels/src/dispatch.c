/* dispatch.c — the run-time choice of the kernel path (from cpu.c's feature bits; QKILN_KERNEL forces one
 * through qk_set_path) and the product entry points, which pick the chosen path's row function for the
 * weight layout and split its rows over the thread pool (threads.c). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu.h"
#include "threads.h"

static const char *const PATH_NAMES[QK_NPATHS] = {"scalar", "avx2", "avx512", "neon", "dotprod", "i8mm", "sve"};

int qk_abi_version(void) { return QK_ABI_VERSION; }

const char *qk_path_name_of(int path) { return (path >= 0 && path < QK_NPATHS) ? PATH_NAMES[path] : "?"; }

static unsigned detect(void) {
    const unsigned f = qk_cpu_features();
    unsigned m = 1u << QK_PATH_SCALAR;
#if defined(__x86_64__)
    if (f & QK_CPU_AVX2) m |= 1u << QK_PATH_AVX2;
#ifdef QK_WITH_AVX512
    if (f & QK_CPU_AVX512_VNNI) m |= 1u << QK_PATH_AVX512;
#endif
#elif defined(__aarch64__)
    if (f & QK_CPU_NEON) m |= 1u << QK_PATH_NEON;
    if (f & QK_CPU_DOTPROD) m |= 1u << QK_PATH_DOTPROD;
    if (f & QK_CPU_I8MM) m |= 1u << QK_PATH_I8MM;
    if (f & QK_CPU_SVE) m |= 1u << QK_PATH_SVE;
#endif
    return m;
}

/* Best first. On aarch64 i8mm beats SVE here because its smmla GEMM serves prompts and its GEMV is dotprod;
 * SVE serves CPUs with SVE but no i8mm (A64FX) and can always be forced. */
static const int PREFERENCE[] = {QK_PATH_AVX512, QK_PATH_AVX2, QK_PATH_I8MM, QK_PATH_SVE, QK_PATH_DOTPROD,
                                 QK_PATH_NEON, QK_PATH_SCALAR};

static unsigned g_avail;
static int g_path = -1;
static qk_kernels g_k;
static qk_kernels g_gemm; /* the path's batched row functions (NULL: the layout runs g_k's row loop) */
/* From this many activation rows on, a layout with a batched row function runs it: unpacking a weight strip once
 * costs about two rows through the per-row kernels on AVX-512 (Zen 4, 3072 x 576 Q4_0X8: 3 rows 86 us per row,
 * about 70 us batched; Q5_0 254 / ~155 us) and about five on AVX2, whose strips are half as wide. */
static int g_gemm_min_m;
static void (*g_quant)(const float *, int, int, int8_t *, float *, int32_t *) = qk_quantize_q8_ref;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void load_path(int path) {
    qk_kernels k;
    memset(&k, 0, sizeof k);
    qk_fill_scalar(&k);
    switch (path) {
#if defined(__x86_64__)
#ifdef QK_WITH_AVX512
    case QK_PATH_AVX512: qk_fill_avx2(&k); qk_fill_avx512(&k); break;
#endif
    case QK_PATH_AVX2: qk_fill_avx2(&k); break;
#elif defined(__aarch64__)
    case QK_PATH_NEON: qk_fill_neon(&k); break;
    case QK_PATH_DOTPROD: qk_fill_neon(&k); qk_fill_dotprod(&k); break;
    case QK_PATH_I8MM: qk_fill_neon(&k); qk_fill_dotprod(&k); qk_fill_i8mm(&k); break;
    case QK_PATH_SVE: qk_fill_neon(&k); qk_fill_sve(&k); break;
#endif
    default: break;
    }
    qk_kernels gemm;
    memset(&gemm, 0, sizeof gemm);
#if defined(__x86_64__)
    if (path == QK_PATH_AVX2) qk_fill_gemm_avx2(&gemm);
#endif
#if defined(__x86_64__) && defined(QK_WITH_AVX512)
    if (path == QK_PATH_AVX512) qk_fill_gemm_avx512(&gemm);
    g_quant = path == QK_PATH_AVX512 ? qk_quantize_q8_avx512 : qk_quantize_q8_ref;
#endif
    g_k = k;
    g_gemm = gemm;
    g_gemm_min_m = path == QK_PATH_AVX2 ? 6 : 3;
    g_path = path;
}

static void init_once(void) {
    g_avail = detect();
    for (size_t i = 0; i < sizeof PREFERENCE / sizeof PREFERENCE[0]; i++)
        if (g_avail >> PREFERENCE[i] & 1) {
            load_path(PREFERENCE[i]);
            return;
        }
}

unsigned qk_available_paths(void) {
    pthread_once(&g_once, init_once);
    return g_avail;
}

const char *qk_path_name(void) {
    pthread_once(&g_once, init_once);
    return PATH_NAMES[g_path];
}

int qk_set_path(const char *name) {
    pthread_once(&g_once, init_once);
    for (int p = 0; p < QK_NPATHS; p++)
        if (strcmp(name, PATH_NAMES[p]) == 0) {
            if (!(g_avail >> p & 1)) return -2;
            load_path(p);
            return 0;
        }
    return -1;
}

int qk_sve_bytes(void) {
#if defined(__aarch64__)
    if (qk_available_paths() >> QK_PATH_SVE & 1) return qk_sve_vector_bytes();
#endif
    return 0;
}

/* ---- products: rows in chunks of a multiple of `align` (row pairs of Q4_0X2, SIMD row groups and the batched
 * kernels' 16-row strips stay in one chunk). Batched products take about four chunks per thread, so a slow
 * thread does not hold the others up; a decode step's (fewer than g_gemm_min_m rows) one per thread: per
 * token (demo model, 2 threads, ~240 products) 1 chunk per thread decoded 8-14 % faster than 4 (Q4_0, Q4_K_M,
 * Q8_0, alternated within one process; not isolated: a chunk is one more claim on the pool's shared counter
 * and one more weight stream to start). A worker that has not joined yet leaves its chunk to the caller, so a
 * late thread still costs no more than running alone. ---- */

typedef struct {
    qk_rows_fn fn;
    const qk_job *job;
    int rows;
} gemm_chunks;

static void gemm_task(void *ctx, long c) {
    const gemm_chunks *g = ctx;
    const int n0 = (int)c * g->rows, n1 = n0 + g->rows < g->job->N ? n0 + g->rows : g->job->N;
    g->fn(g->job, n0, n1);
}

static void run(qk_rows_fn fn, const qk_job *job, int nthreads, int align) {
    nthreads = qk_threads_resolve(nthreads);
    const double work = (double)job->N * job->K * job->M;
    if (nthreads == 1 || work < 65536.0 || job->N < 2 * align) {
        fn(job, 0, job->N);
        return;
    }
    int nchunks = job->M < g_gemm_min_m ? nthreads : nthreads * 4;
    int rows = (job->N + nchunks - 1) / nchunks;
    rows = (rows + align - 1) / align * align;
    nchunks = (job->N + rows - 1) / rows;
    gemm_chunks g = {fn, job, rows};
    qk_parallel(gemm_task, &g, nchunks, nthreads);
}

/* ---- products ------------------------------------------------------------------------------------- */


static int valid(int N, int K, int M, int block) { return N > 0 && M > 0 && K > 0 && K % block == 0; }

int qk_gemm(int wtype, const void *w, int N, int K, const int8_t *qs, const float *d, const int32_t *sums,
            int M, float *y, int nthreads) {
    pthread_once(&g_once, init_once);
    qk_job job = {wtype, N, K, M, (const uint8_t *)w, NULL, NULL, 0, qs, d, sums, y};
    int layout;
    switch (wtype) {
    case QK_Q4_0: layout = QK_L_Q4_0; break;
    case QK_Q8_0: layout = QK_L_Q8_0; break;
    case QK_Q5_0: layout = QK_L_Q5_0; break;
    case QK_Q4_1: layout = QK_L_Q4_1; break;
    case QK_Q5_1: layout = QK_L_Q5_1; break;
    case QK_Q4_0X2: layout = QK_L_Q4_0X2; break;
    case QK_Q4_0X8: layout = QK_L_Q4_0X8; break;
    case QK_Q8_0X8: layout = QK_L_Q8_0X8; break;
    case QK_Q5_0X8: layout = QK_L_Q5_0X8; break;
    case QK_Q2_K: layout = QK_L_Q2_K; break;
    case QK_Q3_K: layout = QK_L_Q3_K; break;
    case QK_Q4_K: layout = QK_L_Q4_K; break;
    case QK_Q5_K: layout = QK_L_Q5_K; break;
    case QK_Q6_K: layout = QK_L_Q6_K; break;
    default: return -1;
    }
    const int block = wtype >= QK_Q2_K && wtype <= QK_Q6_K ? QKK : QK8; /* ggml's ids 10..14: the K-quants */
    if (!valid(N, K, M, block)) return -1;
    if (M >= g_gemm_min_m && g_gemm.rows[layout])
        run(g_gemm.rows[layout], &job, nthreads, 16);
    else
        run(g_k.rows[layout], &job, nthreads, 8);
    return 0;
}

int qk_gemm_int4g(const uint8_t *codes, const float *scales, const uint8_t *zeros, int group, int N, int K,
                  const int8_t *qs, const float *d, const int32_t *sums, int M, float *y, int nthreads) {
    pthread_once(&g_once, init_once);
    if (group <= 0 || group % QK8 != 0 || K % group != 0 || !valid(N, K, M, QK8)) return -1;
    qk_job job = {QK_INT4G, N, K, M, codes, scales, zeros, group, qs, d, sums, y};
    run(g_k.rows[QK_L_INT4G], &job, nthreads, 8);
    return 0;
}

int qk_gemm_int4gx8(const void *w, int group, int N, int K, const int8_t *qs, const float *d, const int32_t *sums,
                    int M, float *y, int nthreads) {
    pthread_once(&g_once, init_once);
    if (group <= 0 || group % QK8 != 0 || K % group != 0 || !valid(N, K, M, QK8)) return -1;
    qk_job job = {QK_INT4GX8, N, K, M, (const uint8_t *)w, NULL, NULL, group, qs, d, sums, y};
    run(g_k.rows[QK_L_INT4GX8], &job, nthreads, 8);
    return 0;
}

void qk_quantize_q8(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums) {
    pthread_once(&g_once, init_once);
    g_quant(x, M, K, qs, d, sums);
}

static _Thread_local struct {
    int8_t *qs;
    float *d;
    int32_t *sums;
    size_t cap;
} scratch;

int qk_linear_f32(int wtype, const void *w, int N, int K, const float *x, int M, float *y, int nthreads) {
    if (K <= 0 || K % QK8 != 0 || M <= 0) return -1;
    const size_t n = (size_t)M * K;
    if (n > scratch.cap) {
        free(scratch.qs);
        free(scratch.d);
        free(scratch.sums);
        scratch.qs = malloc(n);
        scratch.d = malloc(n / QK8 * sizeof(float));
        scratch.sums = malloc(n / QK8 * sizeof(int32_t));
        if (!scratch.qs || !scratch.d || !scratch.sums) {
            scratch.cap = 0;
            return -1;
        }
        scratch.cap = n;
    }
    qk_quantize_q8(x, M, K, scratch.qs, scratch.d, scratch.sums);
    return qk_gemm(wtype, w, N, K, scratch.qs, scratch.d, scratch.sums, M, y, nthreads);
}
