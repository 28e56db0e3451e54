/* Linear layers over GGUF's own quantized blocks, Q4_1 and Q8_0, computed in float32: y = x @ W.T with W exactly
 * the float32 weights gguf's dequantization gives (and transformers loads), read at 5 or 8.5 bits a weight.
 *
 * GGUF blocks hold 32 consecutive weights of a row: Q4_1 {fp16 d, fp16 m, 16 bytes of nibbles}, w = d * q + m;
 * Q8_0 {fp16 d, 32 int8}, w = d * q (each product and sum rounded to float32, as gguf-py computes them).
 *
 * Packed layout (gguf_pack): rows in groups of 16, one AVX-512 lane a row. For each group and each block of 32
 * columns: the 16 rows' d (fp16), for Q4_1 their 16 m (fp16), then the 32 columns' quants, 16 rows each: Q4_1 one
 * byte for columns 2i and 2i+1 of a row (low nibble, high nibble), so 8 bytes a column; Q8_0 16 bytes a column.
 *
 * The product goes block by block: sum_j x_j (d q_j + m) = d (sum_j x_j q_j) + m (sum_j x_j), the dot product with
 * the integer quants a chain of multiply-adds in column order. Every output is summed in that one order whatever the
 * number of rows in x and the threads. gguf_amx.c computes the same on AMX tiles (the caller picks it for batches of
 * 32 rows and more, where it is faster): the same float32 sums, rounded in another order.
 */
#include "gguf.h"

#define M_CHUNK 64 /* rows of x whose running sums stay in a thread's scratch while a block is reused across them */
#define M_TILE 6   /* rows of x in registers at once */
#define G_TILE 4   /* groups of 16 output rows in registers at once */

static int64_t gguf_block_bytes(int type) { return type == Q4_1 ? 4 + BLOCK / 2 : 2 + BLOCK; }

/* bytes gguf_pack writes for an [n, k] weight; n % 16 == 0 and k % 32 == 0 */
int64_t gguf_packed_size(int type, int64_t n, int64_t k) { return n / GROUP * (k / BLOCK) * packed_block_bytes(type); }

/* rows: [n, k / 32] GGUF blocks in the order of the output rows */
void gguf_pack(int type, const uint8_t *rows, int64_t n, int64_t k, uint8_t *out) {
    int64_t blocks = k / BLOCK, in_block = gguf_block_bytes(type), out_block = packed_block_bytes(type);
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < n / GROUP; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *dst = out + (g * blocks + b) * out_block;
            for (int r = 0; r < GROUP; r++) {
                const uint8_t *src = rows + ((g * GROUP + r) * blocks + b) * in_block;
                memcpy(dst + 2 * r, src, 2); /* d */
                if (type == Q4_1) {
                    memcpy(dst + 2 * GROUP + 2 * r, src + 2, 2); /* m */
                    uint8_t *q = dst + 4 * GROUP;
                    for (int c = 0; c < BLOCK; c += 2) { /* GGUF: byte j holds column j (low) and j + 16 (high) */
                        uint8_t lo = src[4 + c % 16] >> (c < 16 ? 0 : 4), hi = src[4 + (c + 1) % 16] >> (c + 1 < 16 ? 0 : 4);
                        q[c / 2 * GROUP + r] = (uint8_t)((lo & 0x0f) | (hi & 0x0f) << 4);
                    }
                } else {
                    int8_t *q = (int8_t *)(dst + 2 * GROUP);
                    for (int c = 0; c < BLOCK; c++) q[c * GROUP + r] = (int8_t)src[2 + c];
                }
            }
        }
    }
}

/* The 32 columns of one packed block as the group's quants (integers, as floats): q, lane r for row r. */
INLINE void quants_of_block(int type, const uint8_t *block, __m512 *q) {
    if (type == Q4_1) {
        const uint8_t *nibbles = block + 4 * GROUP;
        const __m128i low = _mm_set1_epi8(0x0f);
        for (int c = 0; c < BLOCK; c += 2) {
            __m128i both = _mm_loadu_si128((const __m128i *)(nibbles + c / 2 * GROUP));
            __m128i even = _mm_and_si128(both, low), odd = _mm_and_si128(_mm_srli_epi16(both, 4), low);
            q[c] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(even));
            q[c + 1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(odd));
        }
    } else {
        const int8_t *bytes = (const int8_t *)(block + 2 * GROUP);
        for (int c = 0; c < BLOCK; c++)
            q[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(bytes + c * GROUP))));
    }
}

/* The block's float32 weights exactly as gguf decodes them: d * q (+ m), each step rounded. */
INLINE void dequantize_block(int type, const uint8_t *block, __m512 *w) {
    quants_of_block(type, block, w);
    __m512 d = scales_of_block(block), m = type == Q4_1 ? offsets_of_block(block) : _mm512_setzero_ps();
    for (int c = 0; c < BLOCK; c++) {
        w[c] = _mm512_mul_ps(d, w[c]);
        if (type == Q4_1) w[c] = _mm512_add_ps(w[c], m);
    }
}

/* T rows of x through one block of GT groups: the block's dot products with the quants q [GT][BLOCK], then into the
 * running sums [T][G_TILE] scaled by the groups' d, plus (Q4_1) m times the rows' sums of x over the block
 * (xsum[t * xsum_stride]):  sum_j x_j (d q_j + m) = d sum_j x_j q_j + m sum_j x_j. A column of quants loaded once
 * serves T rows, a broadcast of x serves GT groups. */
#define MICRO(T, GT)                                                                                              \
    static void micro_##T##_##GT(const __m512 *q, const __m512 *d, const __m512 *m, const float *x,               \
                                 int64_t x_stride, const float *xsum, int64_t xsum_stride, __m512 *sums) {        \
        __m512 dot[T][GT];                                                                                        \
        for (int t = 0; t < T; t++)                                                                               \
            for (int g = 0; g < GT; g++) dot[t][g] = _mm512_setzero_ps();                                         \
        for (int c = 0; c < BLOCK; c++) {                                                                         \
            __m512 col[GT];                                                                                       \
            for (int g = 0; g < GT; g++) col[g] = q[g * BLOCK + c];                                               \
            for (int t = 0; t < T; t++) {                                                                         \
                __m512 xs = _mm512_set1_ps(x[t * x_stride + c]);                                                  \
                for (int g = 0; g < GT; g++) dot[t][g] = _mm512_fmadd_ps(col[g], xs, dot[t][g]);                  \
            }                                                                                                     \
        }                                                                                                         \
        for (int t = 0; t < T; t++)                                                                               \
            for (int g = 0; g < GT; g++) {                                                                        \
                __m512 s = _mm512_fmadd_ps(d[g], dot[t][g], sums[t * G_TILE + g]);                                \
                if (m != NULL) s = _mm512_fmadd_ps(m[g], _mm512_set1_ps(xsum[t * xsum_stride]), s);               \
                sums[t * G_TILE + g] = s;                                                                         \
            }                                                                                                     \
    }
MICRO(1, G_TILE)
MICRO(2, G_TILE)
MICRO(3, G_TILE)
MICRO(4, G_TILE)
MICRO(5, G_TILE)
MICRO(6, G_TILE)
MICRO(1, 1)
MICRO(2, 1)
MICRO(3, 1)
MICRO(4, 1)
MICRO(5, 1)
MICRO(6, 1)

typedef void (*micro_fn)(const __m512 *, const __m512 *, const __m512 *, const float *, int64_t, const float *, int64_t,
                         __m512 *);
static const micro_fn FULL[M_TILE + 1] = {0, micro_1_G_TILE, micro_2_G_TILE, micro_3_G_TILE, micro_4_G_TILE,
                                          micro_5_G_TILE, micro_6_G_TILE};
static const micro_fn SINGLE[M_TILE + 1] = {0, micro_1_1, micro_2_1, micro_3_1, micro_4_1, micro_5_1, micro_6_1};

/* y[i, n] = sum_j x[i, j] W[n, j] for i < m: x [m, k] (row stride x_stride), y [m, n] (row stride y_stride). Every
 * output is summed in one order whatever m, the tiling and the threads: block by block, each block's dot product a
 * chain of multiply-adds in column order (on AMX, where `amx` asks for it and the CPU has it: gguf_amx.c). Returns
 * 0, or 2 out of memory (nothing written). */
int gguf_linear(int type, const uint8_t *packed, int64_t n, int64_t k, const float *x, int64_t x_stride, int64_t m,
                 float *y, int64_t y_stride, int amx) {
    if (amx) {
        int status = gguf_linear_amx(type, packed, n, k, x, x_stride, m, y, y_stride);
        if (status != 1) return status;
    }
    int64_t blocks = k / BLOCK, block_bytes = packed_block_bytes(type), groups = n / GROUP;
    int64_t tiles = (groups + G_TILE - 1) / G_TILE;
    float *xsum = NULL; /* Q4_1: [m, blocks] sums of x over each block, each in one fixed order */
    if (type == Q4_1 && (xsum = block_sums_of_x(x, x_stride, m, blocks)) == NULL) return 2;
    for (int64_t i0 = 0; i0 < m; i0 += M_CHUNK) {
        int64_t rows = m - i0 < M_CHUNK ? m - i0 : M_CHUNK;
/* dynamic: a thread the OS preempts (the API process shares the cores) leaves its tiles to the others */
#pragma omp parallel for schedule(dynamic, 1) if (tiles >= 4)
        for (int64_t tile = 0; tile < tiles; tile++) {
            int64_t g0 = tile * G_TILE;
            int gt = groups - g0 < G_TILE ? (int)(groups - g0) : G_TILE;
            __m512 sums[M_CHUNK * G_TILE], q[G_TILE * BLOCK], d[G_TILE], offsets[G_TILE];
            for (int64_t i = 0; i < rows * G_TILE; i++) sums[i] = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                for (int g = 0; g < gt; g++) {
                    const uint8_t *block = packed + ((g0 + g) * blocks + b) * block_bytes;
                    quants_of_block(type, block, q + g * BLOCK);
                    d[g] = scales_of_block(block);
                    if (type == Q4_1) offsets[g] = offsets_of_block(block);
                }
                const __m512 *mv = type == Q4_1 ? offsets : NULL;
                const float *xs = xsum != NULL ? xsum + i0 * blocks + b : NULL;
                /* rows in tiles as even as they go (32: 6 6 5 5 5 5, not 6 6 6 6 6 2: a short tile waits on its chains) */
                int64_t tiles_of_rows = (rows + M_TILE - 1) / M_TILE;
                for (int64_t i = 0, r = 0; r < tiles_of_rows; i += rows / tiles_of_rows + (r < rows % tiles_of_rows), r++) {
                    int64_t t = rows / tiles_of_rows + (r < rows % tiles_of_rows);
                    const float *xt = x + (i0 + i) * x_stride + b * BLOCK;
                    const float *st = xs != NULL ? xs + i * blocks : NULL;
                    if (gt == G_TILE) {
                        FULL[t](q, d, mv, xt, x_stride, st, blocks, sums + i * G_TILE);
                    } else { /* a partial tile: group by group, sums at stride G_TILE as in a full one */
                        for (int g = 0; g < gt; g++)
                            SINGLE[t](q + g * BLOCK, d + g, mv ? mv + g : NULL, xt, x_stride, st, blocks, sums + i * G_TILE + g);
                    }
                }
            }
            for (int64_t i = 0; i < rows; i++)
                for (int g = 0; g < gt; g++) _mm512_storeu_ps(y + (i0 + i) * y_stride + (g0 + g) * GROUP, sums[i * G_TILE + g]);
        }
    }
    free(xsum);
    return 0;
}

/* out[i, :] = row ids[i] of W in float32 (an embedding lookup, or the whole weight to check it). Returns 0, or 3
 * (nothing written) when an id lies outside [0, n). */
int gguf_rows(int type, const uint8_t *packed, int64_t n, int64_t k, const int64_t *ids, int64_t count, float *out) {
    int64_t blocks = k / BLOCK, block_bytes = packed_block_bytes(type);
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return 3;
#pragma omp parallel for schedule(static) if (count >= 64)
    for (int64_t i = 0; i < count; i++) {
        int64_t g = ids[i] / GROUP, lane = ids[i] % GROUP;
        for (int64_t b = 0; b < blocks; b++) {
            __m512 w[BLOCK];
            dequantize_block(type, packed + (g * blocks + b) * block_bytes, w);
            float lanes[GROUP];
            for (int c = 0; c < BLOCK; c++) {
                _mm512_storeu_ps(lanes, w[c]);
                out[i * k + b * BLOCK + c] = lanes[lane];
            }
        }
    }
    return 0;
}
