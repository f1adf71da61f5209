/* cpu.h — what this CPU and OS let the library run: the one place that reads cpuid/xgetbv (x86-64) or the
 * HWCAP bits (aarch64). Each QK_CPU_* bit is a whole predicate a kernel family needs, so callers test one bit.
 * cpuid traps to the hypervisor on virtual machines: the answer is computed once per process. */
#ifndef QKILN_CPU_H
#define QKILN_CPU_H

enum {
    /* x86-64 */
    QK_CPU_AVX2 = 1u << 0,        /* AVX2, FMA, F16C, and the OS saves YMM state: the "avx2" product path */
    QK_CPU_AVX512_VNNI = 1u << 1, /* QK_CPU_AVX2 and AVX512F/BW/VL/VNNI with ZMM/opmask state: "avx512" path */
    QK_CPU_AVX512 = 1u << 2,      /* AVX512F/DQ/BW/VL, FMA, ZMM/opmask state: attention, element-wise, GPTQ */
    QK_CPU_AMX_BF16 = 1u << 3,    /* AMX-TILE/BF16, AVX512_BF16, AVX512F/BW/VL, tile state in XCR0 (the
                                     Linux permission is asked for separately: qk_cpu_amx_permitted) */
    QK_CPU_AVX512_BF16 = 1u << 4, /* AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16), AVX512F/BW/VL, ZMM/opmask state:
                                     the bfloat16 products' engine where AMX is missing (AMD Zen 4/5) */
    /* aarch64 */
    QK_CPU_NEON = 1u << 8,
    QK_CPU_DOTPROD = 1u << 9,     /* NEON and sdot */
    QK_CPU_I8MM = 1u << 10,       /* NEON, sdot and smmla */
    QK_CPU_SVE = 1u << 11,
};

/* The QK_CPU_* bits of this machine. */
unsigned qk_cpu_features(void);

/* 1 when QK_CPU_AMX_BF16 is set and Linux (>= 5.16) granted this process the tile data state; asked once. */
int qk_cpu_amx_permitted(void);

static inline int qk_have_avx2(void) { return (qk_cpu_features() & QK_CPU_AVX2) != 0; }
static inline int qk_have_avx512(void) { return (qk_cpu_features() & QK_CPU_AVX512) != 0; }

#endif
