/* threads.h — the library's one thread pool. Every multithreaded kernel (the quantized products, the
 * bandwidth probes, attention, the element-wise and GPTQ loops, the AMX bf16 products) hands it numbered
 * tasks; each task runs on exactly one thread, so a kernel whose tasks write disjoint outputs gives the same
 * bytes for every thread count. */
#ifndef QKILN_THREADS_H
#define QKILN_THREADS_H

#define QK_MAX_THREADS 64 /* the caller and up to 63 pool workers */

/* Task `task` of a job; ctx is the job's own state. */
typedef void (*qk_task_fn)(void *ctx, long task);

/* Threads meant by a caller's `nthreads`: <= 0 is one per online CPU; at most QK_MAX_THREADS. */
int qk_threads_resolve(int nthreads);

/* fn(ctx, i) for every i in [0, ntasks), claimed in order by the caller and up to nthreads - 1 pool workers;
 * returns when all have run. One job uses the pool at a time (another caller waits); a call from inside a
 * task, or with nthreads == 1, runs every task on the calling thread. */
void qk_parallel(qk_task_fn fn, void *ctx, long ntasks, int nthreads);

/* Rows [r0, r1) of a job whose rows are independent. */
typedef void (*qk_range_fn)(const void *args, long r0, long r1);

/* fn over rows [0, rows) as contiguous ranges, one per thread (`threads` as in qk_threads_resolve), each a
 * multiple of `align` rows (but the last) and at least `min_rows` long, so small calls stay on the caller. */
void qk_run_rows(qk_range_fn fn, const void *args, long rows, long align, long min_rows, int threads);

#endif
