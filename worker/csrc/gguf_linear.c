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
 * Every output is summed in one fixed order whatever the number of rows in x and the threads: two partial sums
 * (even and odd columns) over the row, added at the end. A request's logits do not depend on what it is batched
 * with.
 */
#include "common.h"

#define GROUP 16
#define BLOCK 32
#define M_CHUNK 64 /* rows of x whose running sums stay in a thread's scratch while a block is reused across them */
#define M_TILE 6   /* rows of x in registers at once */
#define G_TILE 4   /* groups of 16 output rows in registers at once */

enum { Q4_1 = 2, Q8_0 = 8 };

static int64_t packed_block_bytes(int type) {
    return type == Q4_1 ? GROUP * 2 * 2 + BLOCK * GROUP / 2 : GROUP * 2 + BLOCK * GROUP;
}

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

/* The 32 columns of one packed block as float32 weights of the group's 16 rows. */
INLINE void dequantize_block(int type, const uint8_t *block, __m512 *w) {
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)block));
    if (type == Q4_1) {
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 2 * GROUP)));
        const uint8_t *q = block + 4 * GROUP;
        const __m128i low = _mm_set1_epi8(0x0f);
        for (int c = 0; c < BLOCK; c += 2) {
            __m128i both = _mm_loadu_si128((const __m128i *)(q + c / 2 * GROUP));
            __m128i even = _mm_and_si128(both, low), odd = _mm_and_si128(_mm_srli_epi16(both, 4), low);
            __m512 qe = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(even)), qo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(odd));
            w[c] = _mm512_add_ps(_mm512_mul_ps(d, qe), m);
            w[c + 1] = _mm512_add_ps(_mm512_mul_ps(d, qo), m);
        }
    } else {
        const int8_t *q = (const int8_t *)(block + 2 * GROUP);
        for (int c = 0; c < BLOCK; c++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(q + c * GROUP));
            w[c] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)));
        }
    }
}

/* Rows of x (T of them) times one block of GT groups dequantized into w [GT][BLOCK], added to their running sums
 * [T][GT]: a column of weights loaded once serves T rows, a broadcast of x serves GT groups. */
#define MICRO(T, GT)                                                                                              \
    static void micro_##T##_##GT(const __m512 *w, const float *x, int64_t x_stride, __m512 *sums) {               \
        __m512 s[T][GT];                                                                                          \
        for (int t = 0; t < T; t++)                                                                               \
            for (int g = 0; g < GT; g++) s[t][g] = sums[t * G_TILE + g];                                          \
        for (int c = 0; c < BLOCK; c++) {                                                                         \
            __m512 col[GT];                                                                                       \
            for (int g = 0; g < GT; g++) col[g] = w[g * BLOCK + c];                                               \
            for (int t = 0; t < T; t++) {                                                                         \
                __m512 xs = _mm512_set1_ps(x[t * x_stride + c]);                                                  \
                for (int g = 0; g < GT; g++) s[t][g] = _mm512_fmadd_ps(col[g], xs, s[t][g]);                      \
            }                                                                                                     \
        }                                                                                                         \
        for (int t = 0; t < T; t++)                                                                               \
            for (int g = 0; g < GT; g++) sums[t * G_TILE + g] = s[t][g];                                          \
    }
MICRO(M_TILE, G_TILE)
MICRO(1, G_TILE)
MICRO(M_TILE, 1)
MICRO(1, 1)

/* y[i, n] = sum_j x[i, j] W[n, j] for i < m: x [m, k] (row stride x_stride), y [m, n] (row stride y_stride). Each
 * output is one chain of fused multiply-adds over j in order, whatever m, the tiling and the threads. */
void gguf_linear(int type, const uint8_t *packed, int64_t n, int64_t k, const float *x, int64_t x_stride, int64_t m,
                 float *y, int64_t y_stride) {
    int64_t blocks = k / BLOCK, block_bytes = packed_block_bytes(type), groups = n / GROUP;
    int64_t tiles = (groups + G_TILE - 1) / G_TILE;
    for (int64_t i0 = 0; i0 < m; i0 += M_CHUNK) {
        int64_t rows = m - i0 < M_CHUNK ? m - i0 : M_CHUNK;
#pragma omp parallel for schedule(static) if (tiles >= 4)
        for (int64_t tile = 0; tile < tiles; tile++) {
            int64_t g0 = tile * G_TILE;
            int gt = groups - g0 < G_TILE ? (int)(groups - g0) : G_TILE;
            __m512 sums[M_CHUNK * G_TILE];
            __m512 w[G_TILE * BLOCK];
            for (int64_t i = 0; i < rows * G_TILE; i++) sums[i] = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                for (int g = 0; g < gt; g++)
                    dequantize_block(type, packed + ((g0 + g) * blocks + b) * block_bytes, w + g * BLOCK);
                const float *xb = x + i0 * x_stride + b * BLOCK;
                int64_t i = 0;
                if (gt == G_TILE) {
                    for (; i + M_TILE <= rows; i += M_TILE) micro_M_TILE_G_TILE(w, xb + i * x_stride, x_stride, sums + i * G_TILE);
                    for (; i < rows; i++) micro_1_G_TILE(w, xb + i * x_stride, x_stride, sums + i * G_TILE);
                } else {
                    for (int g = 0; g < gt; g++) {
                        /* a partial tile: one group at a time, its sums at stride G_TILE as in a full tile */
                        for (i = 0; i + M_TILE <= rows; i += M_TILE) micro_M_TILE_1(w + g * BLOCK, xb + i * x_stride, x_stride, sums + i * G_TILE + g);
                        for (; i < rows; i++) micro_1_1(w + g * BLOCK, xb + i * x_stride, x_stride, sums + i * G_TILE + g);
                    }
                }
            }
            for (int64_t i = 0; i < rows; i++)
                for (int g = 0; g < gt; g++) _mm512_storeu_ps(y + (i0 + i) * y_stride + (g0 + g) * GROUP, sums[i * G_TILE + g]);
        }
    }
}

/* out[i, :] = row ids[i] of W in float32 (an embedding lookup, or the whole weight to check it) */
void gguf_rows(int type, const uint8_t *packed, int64_t n, int64_t k, const int64_t *ids, int64_t count, float *out) {
    int64_t blocks = k / BLOCK, block_bytes = packed_block_bytes(type);
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
        (void)n;
    }
}
