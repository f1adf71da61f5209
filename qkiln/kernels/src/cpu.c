/* cpu.c — the QK_CPU_* feature bits (cpu.h), from cpuid + xgetbv on x86-64 and getauxval on aarch64. */
#define _GNU_SOURCE
#include "cpu.h"

#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
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

#if defined(__x86_64__)
static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static unsigned detect_x86(void) {
    unsigned a, b, c, d, m = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave) return 0; /* xgetbv unusable */
    const uint64_t xcr0 = xgetbv0();
    const int ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6; /* XMM+YMM; and opmask, ZMM halves */
    const int tiles = (xcr0 & (3ull << 17)) == (3ull << 17);         /* XTILECFG + XTILEDATA */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int avx2 = (b >> 5) & 1, f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    const int vnni = (c >> 11) & 1, amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    unsigned a1 = 0, b1, c1, d1;
    const int avx512_bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && ((a1 >> 5) & 1);
    if (avx && ymm && avx2 && fma && f16c) m |= QK_CPU_AVX2;
    if ((m & QK_CPU_AVX2) && f && bw && vl && vnni && zmm) m |= QK_CPU_AVX512_VNNI;
    if (fma && zmm && f && dq && bw && vl) m |= QK_CPU_AVX512;
    if (f && bw && vl && amx_bf16 && amx_tile && avx512_bf16 && zmm && tiles) m |= QK_CPU_AMX_BF16;
    if (f && bw && vl && avx512_bf16 && zmm) m |= QK_CPU_AVX512_BF16;
    return m;
}
#endif

static unsigned g_features;
static pthread_once_t g_features_once = PTHREAD_ONCE_INIT;

static void detect(void) {
#if defined(__x86_64__)
    g_features = detect_x86();
#elif defined(__aarch64__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    unsigned m = 0;
    if (hw & HWCAP_ASIMD) m |= QK_CPU_NEON;
    if ((hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP)) m |= QK_CPU_DOTPROD;
    if ((hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP) && (hw2 & HWCAP2_I8MM)) m |= QK_CPU_I8MM;
    if (hw & HWCAP_SVE) m |= QK_CPU_SVE;
    g_features = m;
#endif
}

unsigned qk_cpu_features(void) {
    pthread_once(&g_features_once, detect);
    return g_features;
}

static int g_amx_permitted;
static pthread_once_t g_amx_once = PTHREAD_ONCE_INIT;

static void ask_amx(void) {
#if defined(__x86_64__)
    if (qk_cpu_features() & QK_CPU_AMX_BF16)
        g_amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#endif
}

int qk_cpu_amx_permitted(void) {
    pthread_once(&g_amx_once, ask_amx);
    return g_amx_permitted;
}
