/* The elementwise parts of a Llama-family decoder layer, each one pass over its rows instead of a handful of torch
 * ops. Every result is rounded to the model dtype where the HF modules round it (each torch op stores its output in
 * that dtype), so outputs match theirs up to the order of the sum in RMSNorm's mean and the last bit of exp.
 * Row lengths must be multiples of 16 (rotary: head_dim of 32); the caller checks.
 */
#include "common.h"

#define PARALLEL_ROWS 32 /* fewer rows than this run on the calling thread: a parallel region costs more */

/* hidden += delta (when delta is given), then normed = weight * dtype(x * rsqrt(mean(x^2) + eps)), as HF's
 * LlamaRMSNorm computes it in float32 from the rounded sum. */
void add_rms_norm(int dtype, void *hidden, const void *delta, const void *weight, void *normed, int64_t rows,
                  int64_t cols, float eps) {
    dtype_t t = (dtype_t)dtype;
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        int64_t base = r * cols;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < cols; i += LANES) {
            __m512 x = load16(hidden, base + i, t);
            if (delta != NULL) {
                x = round16(_mm512_add_ps(x, load16(delta, base + i, t)), t);
                store16(hidden, base + i, x, t);
            }
            squares = _mm512_fmadd_ps(x, x, squares);
        }
        float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)cols + eps);
        __m512 s = _mm512_set1_ps(scale);
        for (int64_t i = 0; i < cols; i += LANES) {
            __m512 y = round16(_mm512_mul_ps(load16(hidden, base + i, t), s), t);
            store16(normed, base + i, _mm512_mul_ps(load16(weight, i, t), y), t);
        }
    }
}

/* Rotary embedding of the first heads + kv_heads heads of each qkv row, in place, as HF's apply_rotary_pos_emb:
 * x * cos + rotate_half(x) * sin, each product and the sum rounded. Then the row's (rotated) keys and its values go
 * to the cache at slots[r]: caches [kv_heads, cache_slots, D]. Returns 0, or 3 (nothing written) when a slot lies
 * outside [0, cache_slots). */
int rope_store(int dtype, void *qkv, int64_t row_stride, const void *cos, const void *sin, int64_t rows, int heads,
               int kv_heads, int D, void *k_cache, void *v_cache, int64_t cache_slots, const int64_t *slots) {
    dtype_t t = (dtype_t)dtype;
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= cache_slots) return 3;
    int half = D / 2;
    size_t size = t == BF16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        for (int h = 0; h < heads + kv_heads; h++) {
            int64_t x = r * row_stride + (int64_t)h * D;
            for (int i = 0; i < half; i += LANES) {
                __m512 x1 = load16(qkv, x + i, t), x2 = load16(qkv, x + half + i, t);
                __m512 c1 = load16(cos, r * D + i, t), c2 = load16(cos, r * D + half + i, t);
                __m512 s1 = load16(sin, r * D + i, t), s2 = load16(sin, r * D + half + i, t);
                __m512 minus_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
                __m512 y1 = _mm512_add_ps(round16(_mm512_mul_ps(x1, c1), t), round16(_mm512_mul_ps(minus_x2, s1), t));
                __m512 y2 = _mm512_add_ps(round16(_mm512_mul_ps(x2, c2), t), round16(_mm512_mul_ps(x1, s2), t));
                store16(qkv, x + i, y1, t);
                store16(qkv, x + half + i, y2, t);
            }
        }
        for (int h = 0; h < kv_heads; h++) {
            int64_t slot = ((int64_t)h * cache_slots + slots[r]) * D;
            const char *row = (const char *)qkv + (r * row_stride + (int64_t)(heads + h) * D) * (int64_t)size;
            memcpy((char *)k_cache + slot * (int64_t)size, row, (size_t)D * size);
            memcpy((char *)v_cache + slot * (int64_t)size, row + (int64_t)kv_heads * D * (int64_t)size, (size_t)D * size);
        }
    }
    return 0;
}

/* out = dtype(silu(gate)) * up for rows of [gate | up], each `inter` wide, as HF's act_fn(gate_proj) * up_proj. */
void silu_mul(int dtype, const void *gate_up, void *out, int64_t rows, int64_t inter) {
    dtype_t t = (dtype_t)dtype;
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < inter; i += LANES) {
            __m512 g = load16(gate_up, r * 2 * inter + i, t), u = load16(gate_up, r * 2 * inter + inter + i, t);
            __m512 act = round16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))), t);
            store16(out, r * inter + i, _mm512_mul_ps(act, u), t);
        }
    }
}
