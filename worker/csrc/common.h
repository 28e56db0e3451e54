/* Shared by tokenmill's CPU kernels: the dtypes they take, bfloat16 conversions, 16-lane AVX-512 loads, stores
 * and exp. */
#ifndef TOKENMILL_COMMON_H
#define TOKENMILL_COMMON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef enum { F32 = 0, BF16 = 1 } dtype_t;

static inline float bf16_to_float(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load1(const void *base, int64_t i, dtype_t t) {
    return t == BF16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void store1(void *base, int64_t i, float x, dtype_t t) {
    if (t == BF16)
        ((uint16_t *)base)[i] = float_to_bf16(x);
    else
        ((float *)base)[i] = x;
}

static inline const void *row_at(const void *base, int64_t i, dtype_t t) {
    return t == BF16 ? (const void *)((const uint16_t *)base + i) : (const void *)((const float *)base + i);
}

#ifndef __AVX512F__
#error "tokenmill's kernels are written for AVX-512"
#endif
#include <immintrin.h>
#define LANES 16
/* whether the compiler's target has AVX-512 BF16 (vdpbf16ps), which the bfloat16 kernels need */
#ifdef __AVX512BF16__
#define HAS_AVX512_BF16 1
#else
#define HAS_AVX512_BF16 0
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE __m512 load16(const void *base, int64_t i, dtype_t t) {
    if (t == BF16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

/* exp of 16 lanes: 2^n p(r) with x = n ln2 + r, |r| <= ln2 / 2 and p the Taylor polynomial of degree 7 (its
 * truncation error is 5e-9 relative; float rounding adds about an ulp). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

INLINE void store16(void *base, int64_t i, __m512 x, dtype_t t) {
    if (t == BF16) {
        /* round to nearest even, as torch rounds (NaN is not kept apart: no model here makes one on purpose) */
        __m512i u = _mm512_castps_si512(x);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
        _mm256_storeu_si256((__m256i *)((uint16_t *)base + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_storeu_ps((float *)base + i, x);
    }
}

/* x rounded to the dtype and back: what torch keeps of a float result stored in that dtype */
INLINE __m512 round16(__m512 x, dtype_t t) {
    if (t == F32) return x;
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

#endif
