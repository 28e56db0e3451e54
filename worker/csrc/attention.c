/* decode_attention: attention straight from the paged KV cache for one query token per sequence, with no gathered
 * copy of its keys.
 *
 *   q       [B, H, D]   the new tokens' query heads; row stride q_row and head stride q_head, in elements
 *   k, v    [Hkv, num_blocks, block_size, D], contiguous: one layer's cache
 *   tables  [B, max_blocks] int64: each sequence's blocks; lengths [B] int64: its tokens, the new one included
 *   out     [B, H, D], contiguous
 *
 * q, k, v and out are all float32 or all bfloat16. Query heads h*G .. h*G+G-1 share KV head h (G = H / Hkv).
 * Scores, softmax and the weighted sum of values are float32; out is rounded once, at the end, to nearest even as
 * torch rounds. Returns 0, or 1 for shapes it does not take (the caller then uses its own path), 2 out of memory,
 * 3 for a length outside [1, max_blocks * block_size] or a block id it would read outside [0, num_blocks) (nothing
 * written: a wrong table is a bug upstream, never a read of another process's memory).
 * Written for AVX-512 (16 float lanes); elsewhere the caller keeps its torch path.
 */
#include "common.h"

#define MAX_D 512

static void softmax(float *s, int64_t n) {
    __m512 top = _mm512_set1_ps(-FLT_MAX);
    int64_t t = 0;
    for (; t + LANES <= n; t += LANES) top = _mm512_max_ps(top, _mm512_loadu_ps(s + t));
    float m = _mm512_reduce_max_ps(top);
    for (int64_t i = t; i < n; i++) m = s[i] > m ? s[i] : m;
    __m512 vm = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    for (t = 0; t + LANES <= n; t += LANES) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vm));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (t < n) {
        __mmask16 tail = (__mmask16)((1u << (n - t)) - 1u);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), vm));
        _mm512_mask_storeu_ps(s + t, tail, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
    }
    float inv = 1.0f / _mm512_reduce_add_ps(sum);
    for (t = 0; t < n; t++) s[t] *= inv;
}

/* scores[g * n + i] = scale * q_g . key_i for one block of n keys */
INLINE void block_scores(const float *qf, int G, int D, const void *keys, int64_t n, dtype_t t, float scale,
                                float *scores, int64_t stride) {
    __m512 row[MAX_D / LANES];
    for (int64_t i = 0; i < n; i++) {
        for (int c = 0; c < D / LANES; c++) row[c] = load16(keys, i * D + c * LANES, t);
        for (int g = 0; g < G; g++) {
            const float *qg = qf + g * D;
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qg), row[0]);
            for (int c = 1; c < D / LANES; c++) s = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * LANES), row[c], s);
            scores[g * stride + i] = _mm512_reduce_add_ps(s) * scale;
        }
    }
}

/* r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: pairs of vectors are interleaved and added, then
 * pairs of pairs, then 128-bit quarters across registers; 45 shuffles and adds where 16 separate reductions take
 * about three times as many. */
INLINE __m512 reduce16x16(__m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int j = 0; j < 8; j++) /* each 128-bit quarter: v[2j], v[2j+1], v[2j], v[2j+1] partial sums */
        w[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) { /* each quarter: v[4j] .. v[4j+3] partial sums */
        __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
        x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int j = 0; j < 2; j++) /* quarters 0+1 and 2+3 of x[2j], then of x[2j+1] */
        y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* block_scores for the first n - n % 16 keys, 16 at a time: one register of scores per query head, no horizontal
 * sum per key. Returns how many keys it scored. */
INLINE int64_t block_scores16(const float *qf, int G, int D, const void *keys, int64_t n, dtype_t t, float scale,
                              float *scores, int64_t stride) {
    __m512 vscale = _mm512_set1_ps(scale);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int g = 0; g < G; g++) {
            const float *qg = qf + g * D;
            __m512 acc[LANES];
            for (int j = 0; j < LANES; j++) acc[j] = _mm512_setzero_ps();
            for (int c = 0; c < D / LANES; c++) {
                __m512 qc = _mm512_loadu_ps(qg + c * LANES);
                for (int j = 0; j < LANES; j++)
                    acc[j] = _mm512_fmadd_ps(qc, load16(keys, (i + j) * D + c * LANES, t), acc[j]);
            }
            _mm512_storeu_ps(scores + g * stride + i, _mm512_mul_ps(reduce16x16(acc), vscale));
        }
    return i;
}

/* acc_g += sum_i probs[g * stride + i] value_i for one block of n values */
INLINE void block_values(const float *probs, int G, int D, const void *values, int64_t n, dtype_t t,
                                float *acc, int64_t stride) {
    __m512 row[MAX_D / LANES];
    for (int64_t i = 0; i < n; i++) {
        for (int c = 0; c < D / LANES; c++) row[c] = load16(values, i * D + c * LANES, t);
        for (int g = 0; g < G; g++) {
            __m512 p = _mm512_set1_ps(probs[g * stride + i]);
            float *ag = acc + g * D;
            for (int c = 0; c < D / LANES; c++)
                _mm512_storeu_ps(ag + c * LANES, _mm512_fmadd_ps(p, row[c], _mm512_loadu_ps(ag + c * LANES)));
        }
    }
}

/* block_values for D = 64 and G <= 4 query heads a KV head: the accumulators stay in registers for the whole block
 * instead of a load and a store per value row (the same multiply-adds in the same order). Returns 0 where it does
 * not take the shape. */
#define VALUES_64(GG)                                                                                             \
    case GG: {                                                                                                    \
        __m512 a[GG][4];                                                                                          \
        for (int g = 0; g < GG; g++)                                                                              \
            for (int c = 0; c < 4; c++) a[g][c] = _mm512_loadu_ps(acc + g * 64 + c * LANES);                      \
        for (int64_t i = 0; i < n; i++) {                                                                         \
            __m512 row[4];                                                                                        \
            for (int c = 0; c < 4; c++) row[c] = load16(values, i * 64 + c * LANES, t);                           \
            for (int g = 0; g < GG; g++) {                                                                        \
                __m512 p = _mm512_set1_ps(probs[g * stride + i]);                                                 \
                for (int c = 0; c < 4; c++) a[g][c] = _mm512_fmadd_ps(p, row[c], a[g][c]);                        \
            }                                                                                                     \
        }                                                                                                         \
        for (int g = 0; g < GG; g++)                                                                              \
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + c * LANES, a[g][c]);                      \
        return 1;                                                                                                 \
    }

INLINE int block_values_64(const float *probs, int G, const void *values, int64_t n, dtype_t t, float *acc,
                           int64_t stride) {
    switch (G) {
        VALUES_64(1)
        VALUES_64(2)
        VALUES_64(3)
        VALUES_64(4)
    default:
        return 0;
    }
}

/* Ask for the next block's rows while this one is worked on: a sequence's blocks lie anywhere in the cache, so the
 * hardware prefetcher, which follows addresses within a page, never runs ahead across them. */
INLINE void prefetch_block(const void *rows, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch((const char *)rows + at, _MM_HINT_T0);
}

/* Blocks this far ahead are asked into L2 while the next one comes into L1: one block at a time left the reads
 * waiting on memory (decode attention of 32 SmolLM2 streams read their cache at 14 GB/s in a served step). */
#define AHEAD 4

INLINE void prefetch_l2(const void *rows, int64_t bytes) {
    for (int64_t at = 0; at < bytes; at += 64) _mm_prefetch((const char *)rows + at, _MM_HINT_T1);
}

/* One sequence against one KV head: its G query heads; scores holds G * n floats, qf and acc G * D each. */
static void attend_head(dtype_t t, const void *q, int64_t q_row, int64_t q_head, const void *k, const void *v,
                        const int64_t *table, int64_t n, void *out, int b, int h, int H, int G, int D,
                        int64_t head_elems, int block_size, float scale, float *scores, float *qf, float *acc) {
    int64_t block_elems = (int64_t)block_size * D, block_bytes = block_elems * (t == BF16 ? 2 : 4);
    for (int g = 0; g < G; g++)
        for (int d = 0; d < D; d++) qf[g * D + d] = load1(q, b * q_row + (int64_t)(h * G + g) * q_head + d, t);
    int64_t blocks = (n + block_size - 1) / block_size;
    for (int64_t i = 1; i < AHEAD && i < blocks; i++) prefetch_l2(row_at(k, h * head_elems + table[i] * block_elems, t), block_bytes);
    for (int64_t first = 0; first < n; first += block_size) {
        int64_t count = n - first < block_size ? n - first : block_size;
        int64_t ahead = first / block_size + AHEAD;
        if (ahead < blocks) /* keys ahead, then the first blocks of values */
            prefetch_l2(row_at(k, h * head_elems + table[ahead] * block_elems, t), block_bytes);
        else if (ahead < 2 * blocks)
            prefetch_l2(row_at(v, h * head_elems + table[ahead - blocks] * block_elems, t), block_bytes);
        const void *keys = row_at(k, h * head_elems + table[first / block_size] * block_elems, t);
        /* the next block of keys, or after the last the first block of values */
        const void *next = first + block_size < n ? row_at(k, h * head_elems + table[first / block_size + 1] * block_elems, t)
                                                  : row_at(v, h * head_elems + table[0] * block_elems, t);
        prefetch_block(next, block_bytes);
        int64_t done = t == BF16 ? block_scores16(qf, G, D, keys, count, BF16, scale, scores + first, n)
                                 : block_scores16(qf, G, D, keys, count, F32, scale, scores + first, n);
        const void *rest = row_at(keys, done * D, t);
        if (t == BF16)
            block_scores(qf, G, D, rest, count - done, BF16, scale, scores + first + done, n);
        else
            block_scores(qf, G, D, rest, count - done, F32, scale, scores + first + done, n);
    }
    for (int g = 0; g < G; g++) softmax(scores + g * n, n);
    memset(acc, 0, sizeof(float) * (size_t)(G * D));
    for (int64_t first = 0; first < n; first += block_size) {
        int64_t count = n - first < block_size ? n - first : block_size;
        const void *values = row_at(v, h * head_elems + table[first / block_size] * block_elems, t);
        int64_t ahead = first / block_size + AHEAD;
        if (ahead < blocks) prefetch_l2(row_at(v, h * head_elems + table[ahead] * block_elems, t), block_bytes);
        if (first + block_size < n) prefetch_block(row_at(v, h * head_elems + table[first / block_size + 1] * block_elems, t), block_bytes);
        if (D == 64 && (t == BF16 ? block_values_64(scores + first, G, values, count, BF16, acc, n)
                                  : block_values_64(scores + first, G, values, count, F32, acc, n)))
            continue;
        if (t == BF16)
            block_values(scores + first, G, D, values, count, BF16, acc, n);
        else
            block_values(scores + first, G, D, values, count, F32, acc, n);
    }
    for (int i = 0; i < G * D; i++) store1(out, ((int64_t)b * H + (int64_t)h * G) * D + i, acc[i], t);
}

int decode_attention(int dtype, const void *q, int64_t q_row, int64_t q_head, const void *k, const void *v,
                     const int64_t *tables, int64_t max_blocks, const int64_t *lengths, void *out, int B, int H,
                     int Hkv, int D, int64_t num_blocks, int block_size, float scale) {
    dtype_t t = (dtype_t)dtype;
    int G = Hkv > 0 ? H / Hkv : 0;
    if ((t != F32 && t != BF16) || G < 1 || G * Hkv != H || D > MAX_D || D % LANES != 0 || block_size < 1)
        return 1;
    int64_t longest = 1;
    for (int b = 0; b < B; b++) {
        int64_t n = lengths[b];
        if (n < 1 || n > max_blocks * block_size) return 3;
        for (int64_t i = 0; i < (n + block_size - 1) / block_size; i++)
            if (tables[b * max_blocks + i] < 0 || tables[b * max_blocks + i] >= num_blocks) return 3;
        longest = n > longest ? n : longest;
    }
    int64_t head_elems = num_blocks * block_size * D;
    int failed = 0;
    /* (sequence, KV head) pairs split over the threads torch uses (the same OpenMP runtime, when built with it) */
#pragma omp parallel reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(G * longest));
        float *work = malloc(sizeof(float) * (size_t)(2 * G * D));
#pragma omp for schedule(dynamic, 1)
        for (int pair = 0; pair < B * Hkv; pair++) {
            int b = pair / Hkv, h = pair % Hkv;
            if (scores == NULL || work == NULL) {
                failed = 1;
                continue;
            }
            attend_head(t, q, q_row, q_head, k, v, tables + b * max_blocks, lengths[b], out, b, h, H, G, D,
                        head_elems, block_size, scale, scores, work, work + G * D);
        }
        free(scores);
        free(work);
    }
    return failed ? 2 : 0;
}

