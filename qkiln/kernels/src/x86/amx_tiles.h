/* amx_tiles.h — what the AMX units (x86/bf16.c: linear and Gram; attention/attention_bf16.c) share: the one
 * tile configuration they use (8 tiles of 16 rows x 64 bytes), the 2x2 multiply step of the linear and the
 * Gram, the same products on AVX512_BF16 vectors (dpbf16_rows) and the lane mask of a partial vector. The
 * including file is compiled with -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16. */
#ifndef QKILN_AMX_TILES_H
#define QKILN_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tilecfg_t;

/* Every tile 16 rows x 64 bytes (16 float32 or 32 bf16 per row). Once per thread before its first tile op. */
static inline void tile_config(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* C tiles 0..3 += the 2x2 product of A tiles 4, 5 (1 KB each at a, a + 512 bf16) and B tiles 6, 7 (at b,
 * b + 512): one reduction step of 32 bf16 pairs for a 32 x 32 block of float32 accumulators. */
static inline void tile_step_2x2(const uint16_t *a, const uint16_t *b) {
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a + 512, 64);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

/* The tile product's definition on AVX512_BF16 vectors, for the units' engines without AMX: acc[r * NV + v] (R rows
 * x NV vectors of 16 float32 accumulators, NV <= 4) += over `steps` steps of 16 pairs, A's pair p of row r in step
 * s (at a + r * ars + s * ast + p * aps, broadcast) times B's pair-row p of vector v (16 columns' pairs at
 * b + v * bv + s * bst + 32 p): per accumulator step after step, pair after pair, as tdpbf16ps orders them.
 * R, NV and the strides the caller fixes become constants once inlined, and acc stays in registers. */
static inline __attribute__((always_inline)) void dpbf16_rows(__m512 *acc, const int R, const int NV, const uint16_t *a,
                                                              int64_t ars, int64_t ast, int64_t aps, const uint16_t *b,
                                                              int64_t bv, int64_t bst, int64_t steps) {
    for (int64_t s = 0; s < steps; s++)
        for (int p = 0; p < 16; p++) {
            __m512bh bp[4];
            for (int v = 0; v < NV; v++) bp[v] = (__m512bh)_mm512_loadu_si512(b + v * bv + s * bst + 32 * p);
            for (int r = 0; r < R; r++) {
                int32_t pair;
                memcpy(&pair, a + r * ars + s * ast + p * aps, sizeof pair);
                const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                for (int v = 0; v < NV; v++) acc[r * NV + v] = _mm512_dpbf16_ps(acc[r * NV + v], av, bp[v]);
            }
        }
}

/* Lanes 0..n-1 of a 16-float vector (none for n <= 0, all for n >= 16). */
static inline __mmask16 mask_upto(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

#endif
