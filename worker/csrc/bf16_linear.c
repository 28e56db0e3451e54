/* A bfloat16 linear layer over the weight packed for AVX-512 BF16 dot products, for a model's projections and its
 * output head; the packed head also serves the embedding lookup when the two are tied: one copy of the vocabulary's
 * rows does both.
 *
 *   y [m, n] = x [m, k] @ W.T (+ b), x, y and b bfloat16 (rows contiguous), float32 sums plus the bias rounded once
 *   to bfloat16, as oneDNN's product rounds them; k even.
 *
 * The head is the largest weight of a small model (Qwen2.5-0.5B's 151,936 x 896 is a quarter of its bytes) and a
 * decode step reads all of it. torch's F.linear reorders a plain bfloat16 weight for oneDNN on every call: at one to
 * eight rows that doubled the head's time. A oneDNN copy reordered once is faster, but a tied head's plain rows must
 * stay for the embedding lookup, so that is a second copy of the head. On the layers' weights, streamed from memory
 * at decode, oneDNN's reordered product read 21-26 GB/s on an AMD EPYC (Zen 4) where this one reads 31-33, and from
 * 32 rows on both run at 350-440 GFLOP/s (loadtests: Qwen2.5-0.5B's and Llama-3.2-1B's shapes, 1 to 2,048 rows).
 *
 * Packed layout (bf16_pack): output rows in groups of 16, the last group padded with zero rows. For each group and
 * each pair of columns (2c, 2c + 1): the 16 rows' two values, row-major, so one 64-byte load is a vector of 16
 * pairs, what `vdpbf16ps` multiplies by a broadcast pair of x and sums into 16 float lanes. Tiles of up to 6 rows of
 * x by 2 groups keep 12 sums in registers; the weight streams from memory once per 6 rows of x.
 *
 * Sums run in column-pair order for every output, whatever the number of rows and threads, so results do not depend
 * on the batch. They are not bitwise oneDNN's: its blocking sums in another order, and about one output in 5,000
 * differs from F.linear's by one bfloat16 unit.
 *
 * Returns 0; 1 where the build has no AVX-512 BF16 (bf16_linear_ready says so first); 3 for a row id outside
 * [0, n) in bf16_rows (nothing written).
 */
#include "common.h"

#define GROUP 16
#define TILE_ROWS 6

int64_t bf16_packed_size(int64_t n, int64_t k) { return (n + GROUP - 1) / GROUP * GROUP * k; }

/* w [n, k] bfloat16 row-major -> out, bf16_packed_size(n, k) elements */
void bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *out) {
    int64_t groups = (n + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        uint16_t *dst = out + g * GROUP * k;
        for (int r = 0; r < GROUP; r++) {
            int64_t row = g * GROUP + r;
            for (int64_t c = 0; c < k; c++) dst[c / 2 * 2 * GROUP + 2 * r + c % 2] = row < n ? w[row * k + c] : 0;
        }
    }
}

/* rows ids[0 .. count) of the packed weight -> out [count, k] */
int bf16_rows(const uint16_t *packed, int64_t n, int64_t k, const int64_t *ids, int64_t count, uint16_t *out) {
    for (int64_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= n) return 3;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; i++) {
        const uint32_t *src = (const uint32_t *)(packed + ids[i] / GROUP * GROUP * k) + ids[i] % GROUP;
        uint32_t *dst = (uint32_t *)(out + i * k);
        for (int64_t p = 0; p < k / 2; p++) memcpy(dst + p, src + p * GROUP, 4);
    }
    return 0;
}

int bf16_linear_ready(void) { return HAS_AVX512_BF16; }

#ifdef __AVX512BF16__

/* rows of x (at most TILE_ROWS) by one or two groups of the weight, stored to y's columns of those groups; `valid`
 * of the second group's (or the only group's) 16 columns are real rows of W */
INLINE void tile(const uint16_t *x, int64_t k, const uint16_t *w0, int two, const int rows, uint16_t *y, int64_t n,
                 __mmask16 last_mask, const uint16_t *bias) {
    __m512 acc[TILE_ROWS][2];
    for (int r = 0; r < TILE_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint16_t *w1 = w0 + GROUP * k;
    for (int64_t c = 0; c < k; c += 2) {
        __m512bh a = (__m512bh)_mm512_loadu_si512(w0 + c * GROUP);
        __m512bh b = two ? (__m512bh)_mm512_loadu_si512(w1 + c * GROUP) : a;
        for (int r = 0; r < rows; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * k + c, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, a);
            if (two) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, b);
        }
    }
    if (bias != NULL) {
        __m256i raw0 = _mm256_maskz_loadu_epi16(two ? (__mmask16)0xffff : last_mask, bias);
        __m512 b0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw0), 16)), b1 = b0;
        if (two) {
            __m256i raw1 = _mm256_maskz_loadu_epi16(last_mask, bias + GROUP);
            b1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw1), 16));
        }
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm512_add_ps(acc[r][0], b0);
            acc[r][1] = _mm512_add_ps(acc[r][1], b1);
        }
    }
    for (int r = 0; r < rows; r++) {
        __m512 rounded = round16(acc[r][0], BF16);
        __m256i first = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16));
        _mm256_mask_storeu_epi16(y + r * n, two ? (__mmask16)0xffff : last_mask, first);
        if (two) {
            rounded = round16(acc[r][1], BF16);
            __m256i second = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16));
            _mm256_mask_storeu_epi16(y + r * n + GROUP, last_mask, second);
        }
    }
}

/* the row count a compile-time constant, so the sums stay in registers */
INLINE void tile_of(int rows, const uint16_t *x, int64_t k, const uint16_t *w0, int two, uint16_t *y, int64_t n,
                    __mmask16 mask, const uint16_t *bias) {
    switch (rows) {
    case 1: tile(x, k, w0, two, 1, y, n, mask, bias); break;
    case 2: tile(x, k, w0, two, 2, y, n, mask, bias); break;
    case 3: tile(x, k, w0, two, 3, y, n, mask, bias); break;
    case 4: tile(x, k, w0, two, 4, y, n, mask, bias); break;
    case 5: tile(x, k, w0, two, 5, y, n, mask, bias); break;
    default: tile(x, k, w0, two, TILE_ROWS, y, n, mask, bias);
    }
}

/* bias: n values, or NULL */
int bf16_linear(const uint16_t *x, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int64_t m, int64_t n,
                int64_t k) {
    int64_t groups = (n + GROUP - 1) / GROUP, pairs = (groups + 1) / 2;
    int tail = (int)(n - (groups - 1) * GROUP); /* real rows in the last group */
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < pairs; p++) {
        int64_t g = 2 * p;
        int two = g + 1 < groups;
        __mmask16 mask = g + 1 + two == groups ? (__mmask16)((1u << tail) - 1u) : (__mmask16)0xffff;
        for (int64_t r = 0; r < m; r += TILE_ROWS) {
            int rows = (int)(m - r < TILE_ROWS ? m - r : TILE_ROWS);
            tile_of(rows, x + r * k, k, packed + g * GROUP * k, two, y + r * n + g * GROUP, n, mask,
                    bias == NULL ? NULL : bias + g * GROUP);
        }
    }
    return 0;
}

#else

int bf16_linear(const uint16_t *x, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int64_t m, int64_t n,
                int64_t k) {
    return 1;
}

#endif
