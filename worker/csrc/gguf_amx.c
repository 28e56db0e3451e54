/* gguf_linear on AMX: the same float32 products, with the block dot products on the tile unit.
 *
 * The quants are small integers (Q4_1 0..15, Q8_0 -128..127), exact in bfloat16, and x splits exactly into three
 * bfloat16 parts, x = x1 + x2 + x3 (each the rounding of what the parts before it leave: 8 + 8 + 8 bits of float32's
 * 24). Each product of a quant and a part is exact in float32, so q . x = q . x1 + q . x2 + q . x3 comes out of
 * TDPBF16PS with float32 sums, as the FMA kernel's does. Then, block by block as there: d (q . x) + m (sum of x).
 *
 * A thread takes a group of 16 output rows, turns its blocks into bfloat16 tiles once (in the pair-interleaved
 * layout TDPBF16PS reads: tile row i holds columns 2i and 2i+1 of the 16 rows) and runs 16 rows of x at a time
 * through them. Every output is summed in one order whatever the number of rows of x and the threads.
 */
#include "gguf.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define X_ROWS 16   /* rows of x a tile holds */
#define M_CHUNK 64  /* rows of x whose bfloat16 parts are made at once */
#define TILE_BYTES 1024

static int amx_state = -1; /* -1 not asked yet, 0 refused, 1 granted */

int gguf_amx_ready(void) {
    if (amx_state < 0) amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_state;
}

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tiles: 0 and 1 the dot products (x rows by 16 outputs, float32), 2-4 the parts of x, 5 and 6 the weights */
static void configure_tiles(int x_rows) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 5; t++) {
        config.rows[t] = (uint8_t)x_rows;
        config.colsb[t] = 64;
    }
    for (int t = 5; t < 7; t++) {
        config.rows[t] = BLOCK / 2;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* bfloat16 bits of 0..15, for vpermw */
static const uint16_t BF16_OF_NIBBLE[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                            0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

/* One packed block of 16 rows as a TDPBF16PS weight tile: row i, lane r = (column 2i, column 2i + 1) of row r. */
INLINE void weight_tile(int type, const uint8_t *block, uint16_t *tile) {
    if (type == Q4_1) {
        const uint8_t *nibbles = block + 4 * GROUP; /* byte (i, r): column 2i low, 2i + 1 high */
        const __m512i table = _mm512_loadu_si512(BF16_OF_NIBBLE), low = _mm512_set1_epi32(0x0f),
                      high = _mm512_set1_epi32(0xf0);
        for (int i = 0; i < BLOCK / 2; i++) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(nibbles + i * GROUP)));
            __m512i pairs = _mm512_or_si512(_mm512_and_si512(bytes, low), _mm512_slli_epi32(_mm512_and_si512(bytes, high), 12));
            _mm512_store_si512(tile + i * 2 * GROUP, _mm512_permutexvar_epi16(pairs, table));
        }
    } else {
        const int8_t *bytes = (const int8_t *)(block + 2 * GROUP); /* column c of row r at c * 16 + r */
        const __m512i upper = _mm512_set1_epi32((int)0xffff0000u);
        for (int i = 0; i < BLOCK / 2; i++) {
            __m512 even = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + 2 * i * GROUP))));
            __m512 odd = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + (2 * i + 1) * GROUP))));
            __m512i pairs = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                                            _mm512_and_si512(_mm512_castps_si512(odd), upper));
            _mm512_store_si512(tile + i * 2 * GROUP, pairs);
        }
    }
}

/* rows [i0, i0 + rows) of x as three bfloat16 parts, [3][padded rows][k], zeros past the last row */
static void split_x(const float *x, int64_t x_stride, int64_t i0, int64_t rows, int64_t padded, int64_t k, uint16_t *parts) {
    for (int64_t i = 0; i < padded; i++)
        for (int64_t j = 0; j < k; j += LANES) {
            __m512 rest = i < rows ? _mm512_loadu_ps(x + (i0 + i) * x_stride + j) : _mm512_setzero_ps();
            for (int p = 0; p < 3; p++) {
                __m512 part = round16(rest, BF16);
                store16(parts + (p * padded + i) * k, j, part, BF16);
                rest = _mm512_sub_ps(rest, part);
            }
        }
}

/* sums[r] += d dot[r] (+ m xsum[r]) for the first `count` rows */
INLINE void fold(const float *dot, __m512 d, const __m512 *m, const float *xsum, int64_t xsum_stride, int count, __m512 *sums) {
    for (int r = 0; r < count; r++) {
        __m512 s = _mm512_fmadd_ps(d, _mm512_load_ps(dot + r * GROUP), sums[r]);
        if (m != NULL) s = _mm512_fmadd_ps(*m, _mm512_set1_ps(xsum[r * xsum_stride]), s);
        sums[r] = s;
    }
}

/* Tile work for block b: its dot products with the three parts of x into tile C (C 0 with weight tile 5, C 1 with 6). */
#define BLOCK_DOTS(C, W)                                                                                          \
    _tile_loadd(2, x1 + b * BLOCK, k * 2);                                                                        \
    _tile_loadd(3, x2 + b * BLOCK, k * 2);                                                                        \
    _tile_loadd(4, x3 + b * BLOCK, k * 2);                                                                        \
    _tile_loadd(W, w + b * TILE_BYTES / 2, 64);                                                                   \
    _tile_zero(C);                                                                                                \
    _tile_dpbf16ps(C, 2, W);                                                                                      \
    _tile_dpbf16ps(C, 3, W);                                                                                      \
    _tile_dpbf16ps(C, 4, W);                                                                                      \
    _tile_stored(C, dot[C], GROUP * 4)

/* One group of 16 outputs for `count` rows of x: the blocks' dot products on the tiles, each block folded in (d, m)
 * while the tiles work on the next. w: the group's weight tiles; xs: the rows' block sums of x (Q4_1). */
INLINE void group_rows(int type, const uint8_t *first, int64_t block_bytes, int64_t blocks, int64_t k,
                       const uint16_t *w, const uint16_t *x1, const uint16_t *x2, const uint16_t *x3, const float *xs,
                       int count, float *out, int64_t y_stride) {
    float dot[2][X_ROWS * GROUP] __attribute__((aligned(64)));
    __m512 sums[X_ROWS];
    for (int r = 0; r < X_ROWS; r++) sums[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b <= blocks; b++) {
        if (b < blocks) {
            if (b % 2 == 0) {
                BLOCK_DOTS(0, 5);
            } else {
                BLOCK_DOTS(1, 6);
            }
        }
        if (b > 0) { /* the block before */
            const uint8_t *block = first + (b - 1) * block_bytes;
            __m512 offsets = type == Q4_1 ? offsets_of_block(block) : _mm512_setzero_ps();
            fold(dot[(b - 1) % 2], scales_of_block(block), xs != NULL ? &offsets : NULL, xs != NULL ? xs + b - 1 : NULL, blocks,
                 count, sums);
        }
    }
    for (int r = 0; r < count; r++) _mm512_storeu_ps(out + r * y_stride, sums[r]);
}

int gguf_linear_amx(int type, const uint8_t *packed, int64_t n, int64_t k, const float *x, int64_t x_stride, int64_t m,
                    float *y, int64_t y_stride) {
    if (!gguf_amx_ready()) return 1;
    int64_t blocks = k / BLOCK, block_bytes = packed_block_bytes(type), groups = n / GROUP;
    float *xsum = NULL;
    if (type == Q4_1 && (xsum = block_sums_of_x(x, x_stride, m, blocks)) == NULL) return 2;
    int64_t most = m < M_CHUNK ? (m + X_ROWS - 1) / X_ROWS * X_ROWS : M_CHUNK;
    uint16_t *parts = aligned_alloc(64, (size_t)(3 * most * k) * sizeof(uint16_t));
    int failed = parts == NULL;
    for (int64_t i0 = 0; i0 < m && !failed; i0 += M_CHUNK) {
        int64_t rows = m - i0 < M_CHUNK ? m - i0 : M_CHUNK, padded = (rows + X_ROWS - 1) / X_ROWS * X_ROWS;
        split_x(x, x_stride, i0, rows, padded, k, parts);
        int x_rows = rows < X_ROWS ? (int)rows : X_ROWS;
#pragma omp parallel
        {
            uint16_t *tiles = aligned_alloc(64, (size_t)(blocks * TILE_BYTES)); /* one group's weight tiles */
            if (tiles == NULL) {
#pragma omp atomic write
                failed = 1;
            } else {
                configure_tiles(x_rows);
            }
/* dynamic: a thread the OS preempts (the API process shares the cores) leaves its groups to the others */
#pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < groups; g++) {
                if (tiles == NULL) continue;
                const uint8_t *first = packed + g * blocks * block_bytes;
                for (int64_t b = 0; b < blocks; b++) weight_tile(type, first + b * block_bytes, tiles + b * TILE_BYTES / 2);
                for (int64_t s = 0; s < padded; s += X_ROWS) {
                    int count = rows - s < X_ROWS ? (int)(rows - s) : X_ROWS;
                    const uint16_t *x1 = parts + s * k, *x2 = parts + (padded + s) * k, *x3 = parts + (2 * padded + s) * k;
                    const float *xs = xsum != NULL ? xsum + (i0 + s) * blocks : NULL;
                    float *out = y + (i0 + s) * y_stride + g * GROUP;
                    if (count == X_ROWS) /* a constant count: the fold's running sums stay in registers */
                        group_rows(type, first, block_bytes, blocks, k, tiles, x1, x2, x3, xs, X_ROWS, out, y_stride);
                    else
                        group_rows(type, first, block_bytes, blocks, k, tiles, x1, x2, x3, xs, count, out, y_stride);
                }
            }
            if (tiles != NULL) _tile_release();
            free(tiles);
        }
    }
    free(parts);
    free(xsum);
    return failed ? 2 : 0;
}

#else

int gguf_amx_ready(void) { return 0; }

int gguf_linear_amx(int type, const uint8_t *packed, int64_t n, int64_t k, const float *x, int64_t x_stride, int64_t m,
                    float *y, int64_t y_stride) {
    (void)type, (void)packed, (void)n, (void)k, (void)x, (void)x_stride, (void)m, (void)y, (void)y_stride;
    return 1;
}

#endif
