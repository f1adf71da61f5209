/* bandwidth.c — memory bandwidth probes for `qkiln bench`: copy or read a buffer in 1 MiB tasks on the
 * kernels' thread pool, so the figures are what the products' threads can stream. */
#include <stdatomic.h>
#include <string.h>

#include "qkiln_kernels.h"
#include "threads.h"

#define PROBE_CHUNK ((size_t)1 << 20)

typedef struct {
    uint8_t *dst;
    const uint8_t *src;
    size_t bytes;
} probe_job;

static void copy_task(void *ctx, long c) {
    const probe_job *j = ctx;
    const size_t off0 = (size_t)c * PROBE_CHUNK, off1 = off0 + PROBE_CHUNK < j->bytes ? off0 + PROBE_CHUNK : j->bytes;
    memcpy(j->dst + off0, j->src + off0, off1 - off0);
}

static _Atomic uint64_t g_read_sink;

static void read_task(void *ctx, long c) {
    const probe_job *j = ctx;
    const size_t off0 = (size_t)c * PROBE_CHUNK, off1 = off0 + PROBE_CHUNK < j->bytes ? off0 + PROBE_CHUNK : j->bytes;
    const uint64_t *p = (const uint64_t *)(j->src + off0);
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i + 4 <= (off1 - off0) / 8; i += 4) {
        a0 ^= p[i]; a1 ^= p[i + 1]; a2 ^= p[i + 2]; a3 ^= p[i + 3];
    }
    atomic_fetch_xor(&g_read_sink, a0 ^ a1 ^ a2 ^ a3);
}

/* Below 16 MiB one thread: splitting costs more than it brings. */
static void probe(qk_task_fn fn, void *dst, const void *src, size_t bytes, int nthreads) {
    if (bytes > 0x7fffffff) bytes = 0x7fffffff;
    probe_job j = {(uint8_t *)dst, (const uint8_t *)src, bytes};
    const long chunks = (long)((bytes + PROBE_CHUNK - 1) / PROBE_CHUNK);
    qk_parallel(fn, &j, chunks, chunks < 16 ? 1 : nthreads);
}

void qk_copy_mt(void *dst, const void *src, size_t bytes, int nthreads) { probe(copy_task, dst, src, bytes, nthreads); }

uint64_t qk_read_mt(const void *src, size_t bytes, int nthreads) {
    probe(read_task, NULL, src, bytes, nthreads);
    return atomic_load(&g_read_sink);
}
