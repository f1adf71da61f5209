/* Self-test of the kernel library, built natively or cross-compiled for qemu-aarch64 (scripts/arm/).
 * Prints the path chosen automatically and the available ones, then checks every available path against the
 * scalar reference on every weight type: bit-exact with unit scales (integer parts), within 1e-4 of the
 * largest output magnitude with random scales. Exit status 0 only when every check passes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qkiln_kernels.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}
static float rndf(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() & 0xffffff) / 16777216.0f; }

static uint16_t f2h(float f) { /* for test scales only: normal, in-range values, round toward zero */
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffff) == 0) return (uint16_t)(b >> 16);
    const uint32_t sign = (b >> 16) & 0x8000, exp = ((b >> 23) & 0xff) - 127 + 15, man = (b >> 13) & 0x3ff;
    return (uint16_t)(sign | (exp << 10) | man);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* Random blocks of a type; unit: every fp16 scale = 1.0. */
static uint8_t *make_weights(int wtype, int N, int K, int unit, size_t *nbytes) {
    int bsz, belems;
    switch (wtype) {
    case QK_Q4_0: bsz = 18; belems = 32; break;
    case QK_Q8_0: bsz = 34; belems = 32; break;
    case QK_Q5_0: bsz = 22; belems = 32; break;
    case QK_Q4_1: bsz = 20; belems = 32; break;
    case QK_Q5_1: bsz = 24; belems = 32; break;
    case QK_Q2_K: bsz = 84; belems = 256; break;
    case QK_Q3_K: bsz = 110; belems = 256; break;
    case QK_Q4_K: bsz = 144; belems = 256; break;
    case QK_Q5_K: bsz = 176; belems = 256; break;
    default: bsz = 210; belems = 256; break; /* Q6_K */
    }
    const size_t nblk = (size_t)N * K / belems;
    *nbytes = nblk * bsz;
    uint8_t *w = malloc(*nbytes);
    for (size_t i = 0; i < *nbytes; i++) w[i] = (uint8_t)rnd();
    for (size_t b = 0; b < nblk; b++) {
        uint8_t *p = w + b * bsz;
        if (wtype == QK_Q4_0 || wtype == QK_Q8_0 || wtype == QK_Q5_0) put16(p, f2h(unit ? 1.0f : rndf(-0.05f, 0.05f)));
        if (wtype == QK_Q4_1 || wtype == QK_Q5_1) { /* d, then m about the block minimum (or both 1.0) */
            put16(p, f2h(unit ? 1.0f : rndf(0, 0.01f)));
            put16(p + 2, f2h(unit ? 1.0f : rndf(wtype == QK_Q4_1 ? -0.08f : -0.16f, 0.01f)));
        }
        if (wtype == QK_Q2_K || wtype == QK_Q4_K || wtype == QK_Q5_K) { /* d, dmin: Q2_K's end its block */
            uint8_t *dm = p + (wtype == QK_Q2_K ? 80 : 0);
            put16(dm, f2h(unit ? 1.0f : rndf(0, 0.01f)));
            put16(dm + 2, f2h(unit ? 1.0f : rndf(0, 0.01f)));
        }
        if (wtype == QK_Q3_K || wtype == QK_Q6_K) put16(p + bsz - 2, f2h(unit ? 1.0f : rndf(-0.01f, 0.01f)));
    }
    return w;
}

static int checks, failures;

static void compare(const char *path, const char *what, const float *y, const float *ref, int n, int exact) {
    float big = 0.0f, worst = 0.0f;
    for (int i = 0; i < n; i++) big = fabsf(ref[i]) > big ? fabsf(ref[i]) : big;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        const float e = fabsf(y[i] - ref[i]);
        worst = e > worst ? e : worst;
        if (exact ? y[i] != ref[i] : e > 1e-4f * big + 1e-30f) bad = 1; /* fp32 order: cancellation room */
    }
    checks++;
    if (bad) {
        failures++;
        printf("FAIL %s %s worst=%g scale=%g\n", path, what, worst, big);
    }
}

static void run_case(const char *path, int wtype, int N, int K, int M, int unit, int nthreads) {
    size_t nbytes;
    const int kq = (wtype == QK_Q4_0X2 || wtype == QK_Q4_0X8) ? QK_Q4_0
                   : wtype == QK_Q8_0X8                         ? QK_Q8_0
                   : wtype == QK_Q5_0X8                         ? QK_Q5_0
                                                                : wtype;
    uint8_t *w = make_weights(kq, N, K, unit, &nbytes);
    int8_t *qs = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * M * K / 32), *x = malloc(sizeof(float) * M * K);
    int32_t *sums = malloc(sizeof(int32_t) * M * K / 32);
    float *y = malloc(sizeof(float) * M * N), *ref = malloc(sizeof(float) * M * N);
    if (unit) { /* unit activations: any int8 in [-127, 127], scale 1 */
        for (int i = 0; i < M * K; i++) qs[i] = (int8_t)((int)(rnd() % 255) - 127);
        for (int b = 0; b < M * K / 32; b++) {
            d[b] = 1.0f;
            int s = 0;
            for (int j = 0; j < 32; j++) s += qs[b * 32 + j];
            sums[b] = s;
        }
    } else {
        for (int i = 0; i < M * K; i++) x[i] = rndf(-1, 1) * (i % 97 == 0 ? 50.0f : 1.0f);
        qk_quantize_q8(x, M, K, qs, d, sums);
    }
    const void *wuse = w;
    uint8_t *packed = NULL;
    if (wtype == QK_Q4_0X2) {
        packed = malloc(qk_q4_0x2_bytes(N, K));
        qk_repack_q4_0x2(w, N, K, packed);
        wuse = packed;
    } else if (wtype == QK_Q8_0X8) {
        packed = malloc(qk_q8_0x8_bytes(N, K));
        qk_repack_q8_0x8(w, N, K, packed);
        wuse = packed;
    } else if (wtype == QK_Q4_0X8) {
        packed = malloc(qk_q4_0x8_bytes(N, K));
        qk_repack_q4_0x8(w, N, K, packed);
        wuse = packed;
    } else if (wtype == QK_Q5_0X8) {
        packed = malloc(qk_q5_0x8_bytes(N, K));
        qk_repack_q5_0x8(w, N, K, packed);
        wuse = packed;
    }
    qk_set_path("scalar");
    qk_gemm(kq, w, N, K, qs, d, sums, M, ref, 1); /* reference: plain layout, scalar */
    qk_set_path(path);
    if (qk_gemm(wtype, wuse, N, K, qs, d, sums, M, y, nthreads) != 0) {
        failures++;
        printf("FAIL %s qk_gemm rejected type %d\n", path, wtype);
    }
    char what[96];
    snprintf(what, sizeof what, "type=%d N=%d K=%d M=%d unit=%d threads=%d", wtype, N, K, M, unit, nthreads);
    compare(path, what, y, ref, M * N, unit);
    free(w); free(qs); free(d); free(x); free(sums); free(y); free(ref); free(packed);
}

static void run_int4(const char *path, int N, int K, int M, int group, int unit) {
    uint8_t *codes = malloc((size_t)N * K / 2), *zeros = malloc((size_t)N * K / group);
    float *scales = malloc(sizeof(float) * N * K / group), *x = malloc(sizeof(float) * M * K);
    for (int i = 0; i < N * K / 2; i++) codes[i] = (uint8_t)rnd();
    for (int i = 0; i < N * K / group; i++) { zeros[i] = rnd() % 16; scales[i] = unit ? 1.0f : rndf(0.001f, 0.1f); }
    for (int i = 0; i < M * K; i++) x[i] = rndf(-1, 1);
    int8_t *qs = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * M * K / 32), *y = malloc(sizeof(float) * M * N), *ref = malloc(sizeof(float) * M * N);
    int32_t *sums = malloc(sizeof(int32_t) * M * K / 32);
    qk_quantize_q8(x, M, K, qs, d, sums);
    if (unit) for (int b = 0; b < M * K / 32; b++) d[b] = 1.0f;
    qk_set_path("scalar");
    qk_gemm_int4g(codes, scales, zeros, group, N, K, qs, d, sums, M, ref, 1);
    qk_set_path(path);
    qk_gemm_int4g(codes, scales, zeros, group, N, K, qs, d, sums, M, y, 2);
    char what[96];
    snprintf(what, sizeof what, "int4 g%d N=%d K=%d M=%d unit=%d", group, N, K, M, unit);
    compare(path, what, y, ref, M * N, unit);
    /* the 8-row-group repack gives the same products (exact integer parts) on this path */
    uint8_t *packed = malloc(qk_int4gx8_bytes(N, K, group));
    qk_repack_int4gx8(codes, scales, zeros, group, N, K, packed);
    qk_gemm_int4gx8(packed, group, N, K, qs, d, sums, M, y, 2);
    snprintf(what, sizeof what, "int4gx8 g%d N=%d K=%d M=%d unit=%d", group, N, K, M, unit);
    compare(path, what, y, ref, M * N, unit);
    free(packed);
    free(codes); free(zeros); free(scales); free(x); free(qs); free(d); free(y); free(ref); free(sums);
}

int main(int argc, char **argv) {
    const char *auto_path = qk_path_name();
    const unsigned avail = qk_available_paths();
    printf("auto=%s sve_bytes=%d available=", auto_path, qk_sve_bytes());
    for (int p = 0; p < QK_NPATHS; p++)
        if (avail >> p & 1) printf("%s,", qk_path_name_of(p));
    printf("\n");
    for (int p = 0; p < QK_NPATHS; p++) {
        const char *name = qk_path_name_of(p);
        const int rc = qk_set_path(name);
        if ((avail >> p & 1) ? rc != 0 : rc != -2) {
            failures++;
            printf("FAIL qk_set_path(%s) = %d\n", name, rc);
        }
    }
    if (qk_set_path("bogus") != -1) { failures++; printf("FAIL unknown path accepted\n"); }
    const int wtypes[] = {QK_Q4_0, QK_Q8_0, QK_Q5_0, QK_Q4_1, QK_Q5_1, QK_Q2_K, QK_Q3_K, QK_Q4_K, QK_Q5_K, QK_Q6_K,
                          QK_Q4_0X2, QK_Q4_0X8, QK_Q8_0X8, QK_Q5_0X8};
    const int shapes[][3] = {{1, 256, 1}, {7, 512, 3}, {33, 256, 2}, {64, 768, 1}, {5, 1024, 4}, {300, 512, 3},
                             {9, 96, 2}, {13, 544, 3}}; /* odd block counts (3, 17): 32-blocks only */
    for (int p = 0; p < QK_NPATHS; p++) {
        if (!(avail >> p & 1)) continue;
        const char *name = qk_path_name_of(p);
        const int before = failures;
        for (size_t t = 0; t < sizeof wtypes / sizeof wtypes[0]; t++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
                for (int unit = 0; unit < 2; unit++)
                    if (shapes[s][1] % 256 == 0 || wtypes[t] < QK_Q2_K || wtypes[t] > QK_Q6_K) /* K-quants: K % 256 */
                        run_case(name, wtypes[t], shapes[s][0], shapes[s][1], shapes[s][2], unit, s == 5 ? 2 : 1);
        for (int g = 32; g <= 128; g *= 2)
            for (int unit = 0; unit < 2; unit++) run_int4(name, 9, 512, 3, g, unit);
        for (int unit = 0; unit < 2; unit++) run_int4(name, 6, 96, 2, 32, unit); /* odd block count */
        for (int unit = 0; unit < 2; unit++) run_int4(name, 37, 1024, 1, 128, unit); /* odd rows, GEMV */
        printf("path %s: %s\n", name, failures == before ? "ok" : "FAILED");
    }
    printf("checks=%d failures=%d\n", checks, failures);
    (void)argc; (void)argv;
    return failures ? 1 : 0;
}
