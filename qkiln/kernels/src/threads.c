/* threads.c — a small persistent thread pool (see threads.h). Workers spin briefly between jobs (decode
 * issues hundreds of small products per token, so waking a sleeping thread each time would cost more than the
 * product) and then sleep on a condition variable. A worker joins a job only while it is open (one atomic
 * word: an open bit and the count of workers inside), so it reads a whole job description or none; the caller
 * closes the job once every task is claimed and waits only for the workers inside, never for one that has not
 * woken up yet (on a loaded machine that could take a scheduler quantum). */
#define _GNU_SOURCE
#include "threads.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#include "qkiln_kernels.h"

#define MAX_WORKERS (QK_MAX_THREADS - 1)
#define JOB_OPEN 0x80000000u
#define SPIN_ROUNDS 20000 /* ~0.5 ms of pause: covers the gap between a token's products */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nworkers;
    atomic_ulong published; /* (job sequence << 8) | participants */
    atomic_int sleeping;
    /* the current job, written only while no worker takes part in one */
    qk_task_fn fn;
    void *ctx;
    long ntasks;
    atomic_long next;
    atomic_uint state; /* JOB_OPEN | workers inside the job */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t g_job = PTHREAD_MUTEX_INITIALIZER; /* one job at a time uses the pool */
static _Thread_local int tls_in_pool;                     /* set on workers, and on a caller during its job */

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static void run_tasks(void) {
    for (;;) {
        const long t = atomic_fetch_add(&pool.next, 1);
        if (t >= pool.ntasks) return;
        pool.fn(pool.ctx, t);
    }
}

/* arg: (the job word when the worker was created << 8) | its index; the word is passed, not read here, so a
 * job published before the new thread first runs is not mistaken for one it has seen. */
static void *worker(void *arg) {
    const int index = (int)((uintptr_t)arg & 0xff);
    unsigned long seen = (unsigned long)((uintptr_t)arg >> 8);
    tls_in_pool = 1;
    for (;;) {
        int spins = 0;
        unsigned long p;
        while ((p = atomic_load_explicit(&pool.published, memory_order_acquire)) == seen) {
            if (++spins < SPIN_ROUNDS) {
                if (spins % 1024 == 0) sched_yield(); /* an oversubscribed machine: let the holder run */
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.published) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = p;
        if (index >= (int)(p & 0xff) - 1) continue; /* not asked to take part */
        unsigned st = atomic_load(&pool.state);
        while ((st & JOB_OPEN) && !atomic_compare_exchange_weak(&pool.state, &st, st + 1)) {
        }
        if (!(st & JOB_OPEN)) continue; /* the caller finished without us */
        run_tasks();
        atomic_fetch_sub_explicit(&pool.state, 1, memory_order_release);
    }
    return NULL;
}

int qk_default_threads(void) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > QK_MAX_THREADS ? QK_MAX_THREADS : (int)n);
}

int qk_threads_resolve(int nthreads) {
    if (nthreads <= 0) return qk_default_threads();
    return nthreads > QK_MAX_THREADS ? QK_MAX_THREADS : nthreads;
}

/* A forked child has none of the parent's workers: start the pool afresh there. */
static void after_fork_in_child(void) {
    pool.nworkers = 0;
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&g_job, NULL);
}

static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

static void ensure_pool(int want_workers) { /* with g_job held */
    pthread_once(&g_atfork_once, register_atfork);
    while (pool.nworkers < want_workers && pool.nworkers < MAX_WORKERS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int err = pthread_create(&t, &attr, worker,
                                       (void *)(atomic_load(&pool.published) << 8 | (uintptr_t)pool.nworkers));
        pthread_attr_destroy(&attr);
        if (err != 0) break;
        pool.nworkers++;
    }
}

void qk_parallel(qk_task_fn fn, void *ctx, long ntasks, int nthreads) {
    if (ntasks <= 0) return;
    int n = qk_threads_resolve(nthreads);
    if (n > ntasks) n = (int)ntasks;
    if (n > 1 && !tls_in_pool) {
        pthread_mutex_lock(&g_job);
        ensure_pool(n - 1);
        if (pool.nworkers + 1 < n) n = pool.nworkers + 1;
        if (n > 1) {
            pool.fn = fn;
            pool.ctx = ctx;
            pool.ntasks = ntasks;
            atomic_store(&pool.next, 0);
            atomic_store(&pool.state, JOB_OPEN);
            const unsigned long seq = (atomic_load(&pool.published) >> 8) + 1;
            atomic_store_explicit(&pool.published, seq << 8 | (unsigned long)n, memory_order_release);
            if (atomic_load(&pool.sleeping) > 0) {
                pthread_mutex_lock(&pool.mu);
                pthread_cond_broadcast(&pool.cv);
                pthread_mutex_unlock(&pool.mu);
            }
            tls_in_pool = 1;
            run_tasks();
            tls_in_pool = 0;
            atomic_fetch_and(&pool.state, ~JOB_OPEN);
            for (int spins = 1; atomic_load_explicit(&pool.state, memory_order_acquire) != 0; spins++) {
                if (spins % 1024 == 0) sched_yield(); /* a descheduled worker holds the last task */
                cpu_relax();
            }
            pthread_mutex_unlock(&g_job);
            return;
        }
        pthread_mutex_unlock(&g_job);
    }
    for (long t = 0; t < ntasks; t++) fn(ctx, t);
}

typedef struct {
    qk_range_fn fn;
    const void *args;
    long rows, units, align;
    int parts;
} rows_job;

static void rows_task(void *ctx, long i) {
    const rows_job *j = ctx;
    const long r0 = j->units * i / j->parts * j->align, r1 = j->units * (i + 1) / j->parts * j->align;
    if (r0 < (r1 < j->rows ? r1 : j->rows)) j->fn(j->args, r0, r1 < j->rows ? r1 : j->rows);
}

void qk_run_rows(qk_range_fn fn, const void *args, long rows, long align, long min_rows, int threads) {
    int n = qk_threads_resolve(threads);
    const long units = (rows + align - 1) / align, per = min_rows > align ? (min_rows + align - 1) / align : 1;
    if (n > units / per) n = (int)(units / per > 1 ? units / per : 1);
    if (n <= 1) {
        if (rows > 0) fn(args, 0, rows);
        return;
    }
    rows_job j = {fn, args, rows, units, align, n};
    qk_parallel(rows_task, &j, n, n);
}
