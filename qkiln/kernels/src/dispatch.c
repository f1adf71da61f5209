/* Run-time choice of the kernel path (cpuid + xgetbv on x86-64, getauxval HWCAP bits on aarch64), the
 * activation quantizer, repacking, and a small persistent thread pool that splits rows across cores.
 * Workers spin briefly between calls (decode issues hundreds of small products per token, so waking a
 * sleeping thread each time would cost more than the product) and then sleep on a condition variable. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#if defined(__x86_64__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP_SVE
#define HWCAP_SVE (1UL << 22)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#endif

static const char *const PATH_NAMES[QK_NPATHS] = {"scalar", "avx2", "avx512", "neon", "dotprod", "i8mm", "sve"};

int qk_abi_version(void) { return QK_ABI_VERSION; }

const char *qk_path_name_of(int path) { return (path >= 0 && path < QK_NPATHS) ? PATH_NAMES[path] : "?"; }

#if defined(__x86_64__)
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

static unsigned detect(void) {
    unsigned m = 1u << QK_PATH_SCALAR;
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return m;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(osxsave && avx)) return m;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return m; /* the OS does not save YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return m;
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    const int vnni = (c >> 11) & 1;
    if (avx2 && fma && f16c) m |= 1u << QK_PATH_AVX2;
#ifdef QK_WITH_AVX512
    if ((m >> QK_PATH_AVX2 & 1) && avx512f && avx512bw && avx512vl && vnni && (xcr0 & 0xe0) == 0xe0)
        m |= 1u << QK_PATH_AVX512;
#else
    (void)avx512f; (void)avx512bw; (void)avx512vl; (void)vnni;
#endif
#elif defined(__aarch64__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (hw & HWCAP_ASIMD) m |= 1u << QK_PATH_NEON;
    if ((hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP)) m |= 1u << QK_PATH_DOTPROD;
    if ((hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP) && (hw2 & HWCAP2_I8MM)) m |= 1u << QK_PATH_I8MM;
    if (hw & HWCAP_SVE) m |= 1u << QK_PATH_SVE;
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
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void load_path(int path) {
    qk_kernels k;
    memset(&k, 0, sizeof k);
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
    qk_kernels s;
    qk_fill_scalar(&s);
    if (!k.q4_0) k.q4_0 = s.q4_0;
    if (!k.q8_0) k.q8_0 = s.q8_0;
    if (!k.q4_k) k.q4_k = s.q4_k;
    if (!k.q6_k) k.q6_k = s.q6_k;
    if (!k.q4_0x2) k.q4_0x2 = s.q4_0x2;
    if (!k.int4g) k.int4g = s.int4g;
    if (!k.q4_0x8) k.q4_0x8 = s.q4_0x8;
    if (!k.q8_0x8) k.q8_0x8 = s.q8_0x8;
    if (!k.int4gx8) k.int4gx8 = s.int4gx8;
    g_k = k;
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

/* ---- activations ---------------------------------------------------------------------------------- */

void qk_quantize_q8(const float *x, int M, int K, int8_t *qs, float *d, int32_t *sums) {
    const int nb = K / QK8;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)m * K + b * QK8;
            int8_t *qb = qs + (size_t)m * K + b * QK8;
            float amax = 0.0f;
            for (int j = 0; j < QK8; j++) {
                const float v = xb[j] < 0 ? -xb[j] : xb[j];
                amax = v > amax ? v : amax;
            }
            const float db = amax / 127.0f;
            const float id = db != 0.0f ? 1.0f / db : 0.0f;
            int s = 0;
            for (int j = 0; j < QK8; j++) {
                /* round half to even (adding 1.5 * 2^23 and subtracting it), the same as NumPy's rint */
                float r = (xb[j] * id + 12582912.0f) - 12582912.0f;
                r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
                qb[j] = (int8_t)(int)r;
                s += (int)r;
            }
            d[(size_t)m * nb + b] = db;
            sums[(size_t)m * nb + b] = s;
        }
    }
}

/* ---- repacking ------------------------------------------------------------------------------------ */

size_t qk_q4_0x2_bytes(int N, int K) { return (size_t)((N + 1) / 2) * (K / QK8) * Q4_0X2_BYTES; }

void qk_repack_q4_0x2(const void *src, int N, int K, void *dst) {
    const int nb = K / QK8;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    static const uint8_t zero_block[Q4_0_BYTES] = {0};
    for (int p = 0; p < (N + 1) / 2; p++)
        for (int b = 0; b < nb; b++, o += Q4_0X2_BYTES) {
            const uint8_t *r0 = s + ((size_t)(2 * p) * nb + b) * Q4_0_BYTES;
            const uint8_t *r1 = 2 * p + 1 < N ? s + ((size_t)(2 * p + 1) * nb + b) * Q4_0_BYTES : zero_block;
            memcpy(o, r0, 2);
            memcpy(o + 2, r1, 2);
            memcpy(o + 4, r0 + 2, 8);
            memcpy(o + 12, r1 + 2, 8);
            memcpy(o + 20, r0 + 10, 8);
            memcpy(o + 28, r1 + 10, 8);
        }
}

size_t qk_q4_0x8_bytes(int N, int K) { return (size_t)((N + 7) / 8) * (K / QK8) * Q4_0X8_BYTES; }

void qk_repack_q4_0x8(const void *src, int N, int K, void *dst) {
    const int nb = K / QK8;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    memset(o, 0, qk_q4_0x8_bytes(N, K));
    for (int g = 0; g < (N + 7) / 8; g++)
        for (int b = 0; b < nb; b++, o += Q4_0X8_BYTES)
            for (int r = 0; r < 8 && 8 * g + r < N; r++) {
                const uint8_t *blk = s + ((size_t)(8 * g + r) * nb + b) * Q4_0_BYTES;
                memcpy(o + 2 * r, blk, 2);
                for (int k = 0; k < 32; k++) {
                    const int q = k < 16 ? (blk[2 + k] & 0x0f) : (blk[2 + k - 16] >> 4);
                    int shift;
                    const int pos = qk_x8_pos(r, k, &shift);
                    o[pos] |= (uint8_t)(q << shift);
                }
            }
}

size_t qk_q8_0x8_bytes(int N, int K) { return (size_t)((N + 7) / 8) * (K / QK8) * Q8_0X8_BYTES; }

void qk_repack_q8_0x8(const void *src, int N, int K, void *dst) {
    const int nb = K / QK8;
    const uint8_t *s = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    memset(o, 0, qk_q8_0x8_bytes(N, K));
    for (int g = 0; g < (N + 7) / 8; g++)
        for (int b = 0; b < nb; b++, o += Q8_0X8_BYTES)
            for (int r = 0; r < 8 && 8 * g + r < N; r++) {
                const uint8_t *blk = s + ((size_t)(8 * g + r) * nb + b) * Q8_0_BYTES;
                memcpy(o + 2 * r, blk, 2);
                for (int k = 0; k < 32; k++) o[qk_x8q8_pos(r, k)] = blk[2 + k];
            }
}

size_t qk_int4gx8_bytes(int N, int K, int group) {
    if (group <= 0 || group % QK8 != 0 || K % group != 0) return 0;
    return (size_t)((N + 7) / 8) * (K / group) * qk_int4gx8_group_bytes(group);
}

void qk_repack_int4gx8(const uint8_t *codes, const float *scales, const uint8_t *zeros, int group, int N, int K,
                       void *dst) {
    const int nb = K / QK8, ng = K / group, per = group / QK8;
    uint8_t *o = (uint8_t *)dst;
    memset(o, 0, qk_int4gx8_bytes(N, K, group));
    for (int g8 = 0; g8 < (N + 7) / 8; g8++)
        for (int g = 0; g < ng; g++, o += qk_int4gx8_group_bytes(group))
            for (int r = 0; r < 8 && 8 * g8 + r < N; r++) {
                const int n = 8 * g8 + r;
                memcpy(o + 4 * r, scales + (size_t)n * ng + g, 4);
                o[32 + r] = zeros[(size_t)n * ng + g];
                for (int i = 0; i < per; i++) {
                    const uint8_t *blk = codes + ((size_t)n * nb + g * per + i) * 16;
                    uint8_t *ob = o + INT4GX8_HEAD + i * INT4GX8_BLOCK - 16; /* qk_x8_pos counts Q4_0X8's scales */
                    for (int k = 0; k < 32; k++) {
                        const int q = k < 16 ? (blk[k] & 0x0f) : (blk[k - 16] >> 4);
                        int shift;
                        const int pos = qk_x8_pos(r, k, &shift);
                        ob[pos] |= (uint8_t)(q << shift);
                    }
                }
            }
}

/* ---- thread pool ---------------------------------------------------------------------------------- */

#define MAX_WORKERS 63
#define SPIN_ROUNDS 20000 /* ~0.5 ms of pause: covers the gap between a token's products */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nworkers;
    atomic_uint generation;
    atomic_int sleeping;
    /* the current job */
    qk_rows_fn fn;
    const qk_job *job;
    int participants, nchunks, chunk_rows, align;
    atomic_int next_chunk, done_chunks;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static pthread_mutex_t g_pool_create = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void run_chunks(void) {
    for (;;) {
        const int c = atomic_fetch_add(&pool.next_chunk, 1);
        if (c >= pool.nchunks) return;
        const int n0 = c * pool.chunk_rows;
        int n1 = n0 + pool.chunk_rows;
        if (n1 > pool.job->N) n1 = pool.job->N;
        pool.fn(pool.job, n0, n1);
        atomic_fetch_add_explicit(&pool.done_chunks, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&pool.generation);
    for (;;) {
        int spins = 0;
        unsigned g;
        while ((g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                if (spins % 1024 == 0) sched_yield(); /* an oversubscribed machine: let the holder run */
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (index < pool.participants - 1) run_chunks();
    }
    return NULL;
}

int qk_default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > MAX_WORKERS + 1 ? MAX_WORKERS + 1 : (int)n);
}

static void ensure_pool(int want_workers) {
    if (pool.nworkers >= want_workers) return;
    pthread_mutex_lock(&g_pool_create);
    while (pool.nworkers < want_workers && pool.nworkers < MAX_WORKERS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker, (void *)(intptr_t)pool.nworkers) != 0) break;
        pthread_attr_destroy(&attr);
        pool.nworkers++;
    }
    pthread_mutex_unlock(&g_pool_create);
}

static pthread_mutex_t g_call = PTHREAD_MUTEX_INITIALIZER; /* one product at a time uses the pool */

static void run(qk_rows_fn fn, const qk_job *job, int nthreads) {
    if (nthreads <= 0) nthreads = qk_default_threads();
    const double work = (double)job->N * job->K * job->M;
    const int align = 8; /* keeps row pairs (Q4_0X2) and SIMD row groups inside one chunk */
    if (nthreads == 1 || work < 65536.0 || job->N < 2 * align) {
        fn(job, 0, job->N);
        return;
    }
    pthread_mutex_lock(&g_call);
    ensure_pool(nthreads - 1);
    if (pool.nworkers + 1 < nthreads) nthreads = pool.nworkers + 1;
    int nchunks = nthreads * 4;
    int rows = (job->N + nchunks - 1) / nchunks;
    rows = (rows + align - 1) / align * align;
    nchunks = (job->N + rows - 1) / rows;
    pool.fn = fn;
    pool.job = job;
    pool.participants = nthreads;
    pool.nchunks = nchunks;
    pool.chunk_rows = rows;
    atomic_store(&pool.next_chunk, 0);
    atomic_store(&pool.done_chunks, 0);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_chunks();
    for (int spins = 1; atomic_load_explicit(&pool.done_chunks, memory_order_acquire) < nchunks; spins++) {
        if (spins % 1024 == 0) sched_yield(); /* a descheduled worker holds the last chunk */
        cpu_relax();
    }
    pthread_mutex_unlock(&g_call);
}

/* ---- products ------------------------------------------------------------------------------------- */

static int valid(int N, int K, int M, int block) { return N > 0 && M > 0 && K > 0 && K % block == 0; }

int qk_gemm(int wtype, const void *w, int N, int K, const int8_t *qs, const float *d, const int32_t *sums,
            int M, float *y, int nthreads) {
    pthread_once(&g_once, init_once);
    qk_job job = {wtype, N, K, M, (const uint8_t *)w, NULL, NULL, 0, qs, d, sums, y};
    qk_rows_fn fn;
    switch (wtype) {
    case QK_Q4_0: fn = g_k.q4_0; break;
    case QK_Q8_0: fn = g_k.q8_0; break;
    case QK_Q4_0X2: fn = g_k.q4_0x2; break;
    case QK_Q4_0X8: fn = g_k.q4_0x8; break;
    case QK_Q8_0X8: fn = g_k.q8_0x8; break;
    case QK_Q4_K: fn = g_k.q4_k; break;
    case QK_Q6_K: fn = g_k.q6_k; break;
    default: return -1;
    }
    const int block = (wtype == QK_Q4_K || wtype == QK_Q6_K) ? QKK : QK8;
    if (!valid(N, K, M, block)) return -1;
    run(fn, &job, nthreads);
    return 0;
}

int qk_gemm_int4g(const uint8_t *codes, const float *scales, const uint8_t *zeros, int group, int N, int K,
                  const int8_t *qs, const float *d, const int32_t *sums, int M, float *y, int nthreads) {
    pthread_once(&g_once, init_once);
    if (group <= 0 || group % QK8 != 0 || K % group != 0 || !valid(N, K, M, QK8)) return -1;
    qk_job job = {QK_INT4G, N, K, M, codes, scales, zeros, group, qs, d, sums, y};
    run(g_k.int4g, &job, nthreads);
    return 0;
}

int qk_gemm_int4gx8(const void *w, int group, int N, int K, const int8_t *qs, const float *d, const int32_t *sums,
                    int M, float *y, int nthreads) {
    pthread_once(&g_once, init_once);
    if (group <= 0 || group % QK8 != 0 || K % group != 0 || !valid(N, K, M, QK8)) return -1;
    qk_job job = {QK_INT4GX8, N, K, M, (const uint8_t *)w, NULL, NULL, group, qs, d, sums, y};
    run(g_k.int4gx8, &job, nthreads);
    return 0;
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

/* ---- bandwidth probes ----------------------------------------------------------------------------- */

#define PROBE_CHUNK (1 << 20)

static void copy_rows(const qk_job *j, int n0, int n1) {
    const size_t total = (size_t)j->group, off0 = (size_t)n0 * PROBE_CHUNK;
    size_t off1 = (size_t)n1 * PROBE_CHUNK;
    if (off1 > total) off1 = total;
    if (off1 > off0) memcpy((uint8_t *)j->y + off0, j->w + off0, off1 - off0);
}

static _Atomic uint64_t g_read_sink;

static void read_rows(const qk_job *j, int n0, int n1) {
    const size_t total = (size_t)j->group, off0 = (size_t)n0 * PROBE_CHUNK;
    size_t off1 = (size_t)n1 * PROBE_CHUNK;
    if (off1 > total) off1 = total;
    const uint64_t *p = (const uint64_t *)(j->w + off0);
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i + 4 <= (off1 - off0) / 8; i += 4) {
        a0 ^= p[i]; a1 ^= p[i + 1]; a2 ^= p[i + 2]; a3 ^= p[i + 3];
    }
    atomic_fetch_xor(&g_read_sink, a0 ^ a1 ^ a2 ^ a3);
}

static void probe(qk_rows_fn fn, void *dst, const void *src, size_t bytes, int nthreads) {
    /* group carries the byte count; K = chunk size so run() sees enough work to split */
    qk_job job = {0, (int)((bytes + PROBE_CHUNK - 1) / PROBE_CHUNK), PROBE_CHUNK, 1, (const uint8_t *)src,
                  NULL, NULL, (int)0, NULL, NULL, NULL, (float *)dst};
    job.group = (int)(bytes > 0x7fffffff ? 0x7fffffff : bytes);
    run(fn, &job, nthreads);
}

void qk_copy_mt(void *dst, const void *src, size_t bytes, int nthreads) { probe(copy_rows, dst, src, bytes, nthreads); }

uint64_t qk_read_mt(const void *src, size_t bytes, int nthreads) {
    probe(read_rows, NULL, src, bytes, nthreads);
    return atomic_load(&g_read_sink);
}
