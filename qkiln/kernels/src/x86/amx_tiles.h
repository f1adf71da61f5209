/* amx_tiles.h — what the AMX units (x86/bf16.c: linear and Gram; attention/attention_bf16.c) share: the one
 * tile configuration they use (8 tiles of 16 rows x 64 bytes), the 2x2 multiply step of the linear and the
 * Gram, and the lane mask of a partial vector. The including file is compiled with -mamx-tile -mamx-bf16
 * -mavx512f. */
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

/* Lanes 0..n-1 of a 16-float vector (none for n <= 0, all for n >= 16). */
static inline __mmask16 mask_upto(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

#endif
