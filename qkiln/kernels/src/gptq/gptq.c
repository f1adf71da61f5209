/* gptq.c — the two loops of GPTQ that NumPy cannot vectorize well, on uniform integer grids
 * (value = code - shift, codes clamped to [qmin, qmax]: INT4/INT8, Q4_0/Q5_0/Q8_0, the K-quants' codes):
 *
 *   qk_gptq_scan   the column-by-column scan inside one lazy block: code a column on its fixed
 *                  (scale, offset), turn the rounding error into e = (w - q) / U_kk and subtract
 *                  U_kj · e from every later column of the block;
 *   qk_int_fit_t   IntGrid's importance-weighted range search: per (row, group), 20 shrunk min/max
 *                  ranges, each coded and scored by Σ imp · (decoded - w)², the least error kept.
 *
 * Both are the NumPy definitions in quantize/gptq.py (`_scan_numpy`) and quantize/int_grid.py
 * (`IntGrid.fit`) done in one pass, with the same float32 operations in the same order and no FMA
 * contraction (the library is built with -ffp-contract=off), so they give the same bits; the tests check
 * it. Every output row (weight row) is independent of the others in both loops, so rows are split over
 * threads and the result does not depend on the thread count.
 *
 * The row loops (gptq_rows.h) are portable C on GCC/Clang vector extensions, compiled here for 4-float
 * vectors (SSE2 on baseline x86-64, NEON on aarch64), in gptq_avx2.c for 8 (AVX2) and in gptq_avx512.c for
 * 16 (AVX-512); the best the CPU has is chosen at run time (variant 1 forces the portable one): the same
 * operations, the same bits.
 * floor() is done on vectors as truncation toward zero minus one where that rounded up, after clamping to
 * ±2^22 (where every float is exact as an int32): the clamp cannot change a code, which is clamped to
 * [qmin, qmax] ⊂ [0, 255] afterwards. Float16 rounding of the fit's scales is integer arithmetic on the
 * float32 bits (gptq_rows.h), exactly NumPy's astype(float16).
 */
#define _GNU_SOURCE
#define QK_GPTQ_LANES 4
#define QK_GPTQ_SUFFIX portable
#include "qkiln_kernels.h"
#include "gptq/gptq_rows.h"

#include "cpu.h"
#include "threads.h"

/* Variant: 0 = best this CPU runs, 1 = portable, 2 = AVX-512, 3 = AVX2. The variant a request runs (1..3),
 * -2 when it cannot run here; `pick` and the exported `qk_gptq_variant` both answer from this one function. */
static int resolve(int variant) {
    if (variant == 0) variant = qk_have_avx512() ? 2 : qk_have_avx2() ? 3 : 1;
    if (variant == 1) return 1;
#if defined(__x86_64__)
    if (variant == 2 && qk_have_avx512()) return 2;
    if (variant == 3 && qk_have_avx2()) return 3;
#endif
    return -2;
}

int qk_gptq_variant(int variant) { return resolve(variant); }

static qk_range_fn pick(int variant, int fit) {
    switch (resolve(variant)) {
    case 1: return fit ? qk_gptq_fit_rows_portable : qk_gptq_scan_rows_portable;
#if defined(__x86_64__)
    case 2: return fit ? qk_gptq_fit_rows_avx512 : qk_gptq_scan_rows_avx512;
    case 3: return fit ? qk_gptq_fit_rows_avx2 : qk_gptq_scan_rows_avx2;
#endif
    default: return NULL;
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* entry points: 0 ok, -1 bad sizes, -2 variant unavailable, -3 out of memory                           */

int qk_gptq_scan(int variant, float *w1, float *err1, uint8_t *codes, long count, long out, const float *h1,
                 long ldh, long k0, long k1, const int32_t *gidx, const float *scale_t, const float *safe_t,
                 const float *offset_t, float shift, float qmin, float qmax, int nthreads) {
    if (count < 0 || out < 0 || k0 < 0 || k1 > count || k0 > k1 || ldh < count) return -1;
    if (!(qmin >= 0.0f && qmax <= 255.0f && qmin <= qmax)) return -1;
    scan_args_t a = {w1, err1, codes, h1, gidx, scale_t, safe_t, offset_t, count, out, ldh, k0, k1,
                     shift, qmin, qmax, 0};
    const qk_range_fn fn = pick(variant, 0);
    if (!fn) return -2;
    if (out > 0 && k1 > k0) qk_run_rows(fn, &a, out, 16, 64, nthreads);
    return a.oom ? -3 : 0;
}

/* Also 1 when some scale overflows float16 (the caller names the tensor). */
int qk_int_fit_t(int variant, const float *wt, long cols, long rows, long group, int bits, int symmetric,
                 const float *imp, const float *shrink, int nshrink, uint16_t *scale, uint8_t *zero, int nthreads) {
    if (cols <= 0 || rows < 0 || group <= 0 || cols % group || bits < 1 || bits > 8 || nshrink < 1) return -1;
    fit_args_t a = {wt, imp, shrink, scale, zero, cols, rows, group, cols / group, nshrink, symmetric != 0,
                    (float)((1 << bits) - 1), symmetric ? (float)(1 << (bits - 1)) : 0.0f, 0, 0};
    const qk_range_fn fn = pick(variant, 1);
    if (!fn) return -2;
    if (rows > 0) qk_run_rows(fn, &a, rows, 16, 64, nthreads);
    return a.oom ? -3 : a.overflow ? 1 : 0;
}
