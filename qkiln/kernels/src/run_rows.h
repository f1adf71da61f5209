/* run_rows.h — rows [0, rows) split into contiguous ranges, one per thread, for kernels whose rows are
 * independent (so the result never depends on the split). */
#ifndef QKILN_RUN_ROWS_H
#define QKILN_RUN_ROWS_H

#include <pthread.h>
#include <unistd.h>

#define QK_MAX_THREADS 64

typedef void (*qk_rows_fn)(const void *args, long r0, long r1);

typedef struct {
    qk_rows_fn fn;
    const void *args;
    long r0, r1;
} qk_row_slice;

static void *qk_run_slice(void *p) {
    const qk_row_slice *sl = p;
    if (sl->r0 < sl->r1) sl->fn(sl->args, sl->r0, sl->r1);
    return NULL;
}

/* fn over rows [0, rows) on `threads` threads (1: the caller alone; <= 0: one per online CPU), each range
 * a multiple of `align` rows (but the last) and at least `min_rows` long, so small calls stay on the
 * caller. A thread that fails to start leaves its rows to the caller. */
static void qk_run_rows(qk_rows_fn fn, const void *args, long rows, long align, long min_rows, int threads) {
    if (threads <= 0) {
        const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        threads = cpus > 0 ? (int)(cpus < QK_MAX_THREADS ? cpus : QK_MAX_THREADS) : 1;
    }
    if (threads > QK_MAX_THREADS) threads = QK_MAX_THREADS;
    const long units = (rows + align - 1) / align, per = min_rows > align ? (min_rows + align - 1) / align : 1;
    if (threads > units / per) threads = (int)(units / per > 1 ? units / per : 1);
    if (threads <= 1) {
        if (rows > 0) fn(args, 0, rows);
        return;
    }
    qk_row_slice sl[QK_MAX_THREADS];
    pthread_t tid[QK_MAX_THREADS];
    int started[QK_MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        const long r0 = units * i / threads * align, r1 = units * (i + 1) / threads * align;
        sl[i] = (qk_row_slice){fn, args, r0, r1 < rows ? r1 : rows};
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&tid[i], NULL, qk_run_slice, &sl[i]) == 0;
    qk_run_slice(&sl[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            qk_run_slice(&sl[i]);
    }
}

#endif
