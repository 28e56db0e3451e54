#include "common.h"

/* out[r] = the index of the first largest x[r, :], as torch.argmax: a NaN counts as the largest. */
static int64_t argmax_row(const float *x, int64_t cols) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = _mm512_setzero_si512(), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(LANES);
    int64_t i = 0;
    for (; i + LANES <= cols; i += LANES, at = _mm512_add_epi32(at, step)) {
        __m512 v = _mm512_loadu_ps(x + i);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        if (nan) return i + __builtin_ctz(nan);
        __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_blend_ps(greater, best, v);
        where = _mm512_mask_blend_epi32(greater, where, at);
    }
    /* each lane holds the first index of its own largest value: the answer is the smallest among the top lanes */
    float top = _mm512_reduce_max_ps(best);
    __mmask16 lanes = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    int64_t found = _mm512_mask_reduce_min_epi32(lanes, where);
    for (; i < cols; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > top) top = x[i], found = i;
    }
    return found;
}

void argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t stride, int64_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, cols);
}
