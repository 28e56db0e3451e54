/* The packed layout of GGUF blocks that gguf_linear.c writes and both its kernels read (see gguf_linear.c). */
#ifndef TOKENMILL_GGUF_H
#define TOKENMILL_GGUF_H

#include "common.h"

#define GROUP 16 /* output rows a packed block holds, one AVX-512 lane each */
#define BLOCK 32 /* columns of a GGUF block */

enum { Q4_1 = 2, Q8_0 = 8 };

static inline int64_t packed_block_bytes(int type) {
    return type == Q4_1 ? GROUP * 2 * 2 + BLOCK * GROUP / 2 : GROUP * 2 + BLOCK * GROUP;
}

/* the 16 rows' d (as float32) */
INLINE __m512 scales_of_block(const uint8_t *block) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)block)); }

/* Q4_1: the 16 rows' m */
INLINE __m512 offsets_of_block(const uint8_t *block) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 2 * GROUP)));
}

/* Q4_1: [m, blocks] sums of each row of x over each block, each in one fixed order; NULL when out of memory */
static inline float *block_sums_of_x(const float *x, int64_t x_stride, int64_t m, int64_t blocks) {
    float *xsum = malloc(sizeof(float) * (size_t)(m * blocks + 1));
    if (xsum == NULL) return NULL;
    for (int64_t i = 0; i < m; i++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + i * x_stride + b * BLOCK;
            xsum[i * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xb), _mm512_loadu_ps(xb + LANES)));
        }
    return xsum;
}

/* whether gguf_linear_amx runs here (the CPU has AMX and the OS lets this process use it) */
int gguf_amx_ready(void);

/* gguf_linear on AMX: 0, 2 out of memory, or 1 when AMX is not there (nothing written) */
int gguf_linear_amx(int type, const uint8_t *packed, int64_t n, int64_t k, const float *x, int64_t x_stride, int64_t m,
                    float *y, int64_t y_stride);

#endif
