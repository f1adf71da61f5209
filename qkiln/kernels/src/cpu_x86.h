/* cpu_x86.h — may this process run AVX-512 code? One answer for the files whose run-time choice is just
 * "portable or AVX-512" (attention, element-wise, GPTQ loops); dispatch.c keeps its own finer table.
 *
 * Yes when the CPU has AVX512F, BW, DQ, VL and FMA and the OS saves the opmask/ZMM state (XCR0), which
 * every AVX-512 CPU since Skylake-SP has. cpuid traps to the hypervisor on virtual machines, so the answer
 * is computed once per file (a benign race: every thread computes the same value). */
#ifndef QKILN_CPU_X86_H
#define QKILN_CPU_X86_H

#include <stdatomic.h>
#include <stdint.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

static int qk_detect_avx512(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!((c >> 27) & 1) || !((c >> 12) & 1)) return 0; /* OSXSAVE, FMA */
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 0xe6) != 0xe6) return 0; /* XMM, YMM, opmask, ZMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31); /* F, DQ, BW, VL */
    return (b & need) == need;
#else
    return 0;
#endif
}

static inline int qk_have_avx512(void) {
    static atomic_int known = -1;
    int v = atomic_load_explicit(&known, memory_order_relaxed);
    if (v < 0) {
        v = qk_detect_avx512();
        atomic_store_explicit(&known, v, memory_order_relaxed);
    }
    return v;
}

#endif
