/* prefill_attention: causal attention of one request's new query rows over its whole context, read from the paged
 * KV cache in place, in bfloat16 with AVX-512 BF16 dot products.
 *
 *   q       [q_len rows, H, D] bfloat16; row stride q_row and head stride q_head, in elements
 *   k, v    [Hkv, num_blocks, block_size, D] bfloat16, contiguous: one layer's cache, the new rows already stored
 *   table   the request's block ids, n_table of them, covering its ctx_len tokens
 *   out     [q_len rows, H, D] bfloat16; row stride out_row, heads contiguous
 *
 * Query row i sits at position ctx_len - q_len + i and attends keys 0 .. that position (a chunk of a long prompt
 * attends what earlier chunks cached, and itself causally). Query heads h*G .. h*G+G-1 share KV head h.
 *
 * torch's CPU flash kernel (SDPA) ran SmolLM2's 2,048-token prefill at about 60 GFLOP/s. Here each KV head's keys
 * and values are first repacked into the pairs that `vdpbf16ps` multiplies (two bfloat16 products summed into a
 * float lane), then tiles of R query rows run the two products as register-blocked outer products: scores of R rows
 * against 64 keys at a time, an online softmax in float32 (running max and sum per row, as flash attention does),
 * and the probabilities, rounded to bfloat16 as torch's kernel rounds them, against the 64 values.
 *
 * Returns 0; 1 for shapes it does not take (head_dim other than 64 or 128, heads not a multiple of KV heads, a
 * KV head's cache of 2^32 elements or more, or a build without AVX-512 BF16): the caller then keeps SDPA; 2 out of memory; 3 for a context longer than the table
 * or a block id outside [0, num_blocks) (nothing written).
 */
#include "common.h"

#define KEYS 64 /* keys a tile attends per round of the online softmax */

int prefill_attention_ready(void) { return HAS_AVX512_BF16; }

#ifdef __AVX512BF16__

typedef struct {
    const uint16_t *q;
    int64_t q_row, q_head;
    const uint16_t *kp, *vp; /* packed keys and values of every KV head */
    int64_t ctx_pad;         /* context rounded up to KEYS */
    int64_t ctx_len, q_len;
    uint16_t *out;
    int64_t out_row;
    int H, G, D;
    float scale;
} job_t;

/* Keys as [key block of 16][pair p][16 keys][2]: the 16 keys' dims 2p, 2p+1 in one 64-byte vector. Values as
 * [key pair][D][2]: keys 2j, 2j+1 of each dim side by side. Rows past ctx_len are zeros. One call packs the key
 * blocks [b0, b1) of one KV head. A key's dim pair is one 32-bit lane, so a packed key vector is a gather of 16
 * lanes, one from each key's row (rows sit anywhere in the paged cache); a value pair interleaves two rows' 16-bit
 * lanes. Packing a 4,096-token context element by element took 1.5 ms a layer of SmolLM2, more than attending a
 * 16-token chunk over it: a long prompt's late chunks paid it every step. */
static void pack_blocks(const uint16_t *k, const uint16_t *v, const int64_t *table, int64_t ctx_len, int64_t b0,
                        int64_t b1, int block_size, int D, uint16_t *kp, uint16_t *vp) {
    const int P = D / 2;
    /* out[2i] = a[i], out[2i+1] = b[i]: lanes 0-15 of a and b, then lanes 16-31 */
    __m512i lo_idx, hi_idx;
    {
        uint16_t lo[32], hi[32];
        for (int i = 0; i < 16; i++) {
            lo[2 * i] = (uint16_t)i, lo[2 * i + 1] = (uint16_t)(32 + i);
            hi[2 * i] = (uint16_t)(16 + i), hi[2 * i + 1] = (uint16_t)(48 + i);
        }
        lo_idx = _mm512_loadu_si512((const void *)lo), hi_idx = _mm512_loadu_si512((const void *)hi);
    }
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; b++) {
        int32_t rows[16];
        __mmask16 live = 0;
        for (int t = 0; t < 16; t++) {
            int64_t j = b * 16 + t;
            rows[t] = j < ctx_len ? (int32_t)(table[j / block_size] * block_size + j % block_size) : 0;
            if (j < ctx_len) live |= (__mmask16)(1u << t);
        }
        __m512i off = _mm512_mullo_epi32(_mm512_loadu_si512((const void *)rows), _mm512_set1_epi32(P));
        uint32_t *kdst = (uint32_t *)(kp + b * (int64_t)P * 32);
        for (int p = 0; p < P; p++) {
            __m512i lanes = _mm512_mask_i32gather_epi32(zero, live, _mm512_add_epi32(off, _mm512_set1_epi32(p)),
                                                        (const void *)k, 4);
            _mm512_storeu_si512((void *)(kdst + p * 16), lanes);
        }
        for (int t = 0; t < 16; t += 2) {
            uint16_t *vdst = vp + (b * 8 + t / 2) * (int64_t)D * 2;
            const uint16_t *va = v + (int64_t)rows[t] * D, *vb = v + (int64_t)rows[t + 1] * D;
            int a_live = (live >> t) & 1, b_live = (live >> (t + 1)) & 1;
            for (int c = 0; c < D; c += 32) {
                __m512i a = a_live ? _mm512_loadu_si512((const void *)(va + c)) : zero;
                __m512i bb = b_live ? _mm512_loadu_si512((const void *)(vb + c)) : zero;
                _mm512_storeu_si512((void *)(vdst + c * 2), _mm512_permutex2var_epi16(a, lo_idx, bb));
                _mm512_storeu_si512((void *)(vdst + c * 2 + 32), _mm512_permutex2var_epi16(a, hi_idx, bb));
            }
        }
    }
}

static inline __m512 bf16x16(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

/* One tile: rows r0 .. r0+n-1 (n <= R) of query head `head`, over its KV head's packed keys and values. DV = D / 16
 * float vectors a row of the output; R rows keep R * DV accumulators in registers. */
#define TILE(NAME, DD, RR)                                                                                            \
    static void NAME(const job_t *j, int head, int64_t r0, int n) {                                                   \
        enum { D = DD, R = RR, P = DD / 2, DV = DD / 16 };                                                            \
        const int h = head / j->G;                                                                                    \
        const uint16_t *kp = j->kp + (int64_t)h * j->ctx_pad * D, *vp = j->vp + (int64_t)h * j->ctx_pad * D;          \
        uint32_t qpair[R][P];                                                                                         \
        int64_t pos[R];                                                                                               \
        for (int r = 0; r < R; r++) {                                                                                 \
            int rr = r < n ? r : n - 1; /* rows past the tile's end repeat its last row; never stored */              \
            const uint16_t *src = j->q + (r0 + rr) * j->q_row + (int64_t)head * j->q_head;                           \
            memcpy(qpair[r], src, sizeof(uint32_t) * P);                                                              \
            pos[r] = j->ctx_len - j->q_len + r0 + rr;                                                                 \
        }                                                                                                             \
        float m[R], l[R];                                                                                             \
        __m512 o[R][DV];                                                                                              \
        for (int r = 0; r < R; r++) {                                                                                 \
            m[r] = -INFINITY;                                                                                         \
            l[r] = 0.0f;                                                                                              \
            for (int c = 0; c < DV; c++) o[r][c] = _mm512_setzero_ps();                                               \
        }                                                                                                             \
        uint16_t probs[R][KEYS] __attribute__((aligned(64)));                                                         \
        const int64_t last = pos[n - 1]; /* the tile's last key */                                                    \
        const __m512 ninf = _mm512_set1_ps(-INFINITY);                                                                \
        for (int64_t j0 = 0; j0 <= last; j0 += KEYS) {                                                                \
            __m512 s[R][KEYS / 16];                                                                                   \
            for (int r = 0; r < R; r++)                                                                               \
                for (int c = 0; c < KEYS / 16; c++) s[r][c] = _mm512_setzero_ps();                                    \
            const uint16_t *kb = kp + (j0 / 16) * (int64_t)P * 32;                                                    \
            for (int p = 0; p < P; p++) {                                                                             \
                __m512bh kv[KEYS / 16];                                                                               \
                for (int c = 0; c < KEYS / 16; c++)                                                                   \
                    kv[c] = (__m512bh)_mm512_loadu_si512((const void *)(kb + ((int64_t)c * P + p) * 32));             \
                for (int r = 0; r < R; r++) {                                                                         \
                    __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qpair[r][p]);                                      \
                    for (int c = 0; c < KEYS / 16; c++) s[r][c] = _mm512_dpbf16_ps(s[r][c], qb, kv[c]);               \
                }                                                                                                     \
            }                                                                                                         \
            float alpha[R];                                                                                           \
            for (int r = 0; r < R; r++) {                                                                             \
                __m512 top = ninf;                                                                                    \
                for (int c = 0; c < KEYS / 16; c++) {                                                                 \
                    s[r][c] = _mm512_mul_ps(s[r][c], _mm512_set1_ps(j->scale));                                       \
                    int64_t first = j0 + c * 16;                                                                      \
                    if (first + 15 > pos[r]) { /* keys past the row's position (or the context) are masked */         \
                        int64_t keep = pos[r] - first + 1;                                                            \
                        __mmask16 live = keep <= 0 ? 0 : (__mmask16)((1u << keep) - 1u);                              \
                        s[r][c] = _mm512_mask_mov_ps(ninf, live, s[r][c]);                                       \
                    }                                                                                                 \
                    top = _mm512_max_ps(top, s[r][c]);                                                                \
                }                                                                                                     \
                float mx = _mm512_reduce_max_ps(top);                                                                 \
                float m_new = mx > m[r] ? mx : m[r];                                                                  \
                alpha[r] = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);                                             \
                m[r] = m_new;                                                                                         \
                __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(m_new);                                         \
                for (int c = 0; c < KEYS / 16; c += 2) {                                                              \
                    __m512 e0 = exp16(_mm512_sub_ps(s[r][c], mv)), e1 = exp16(_mm512_sub_ps(s[r][c + 1], mv));       \
                    e0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s[r][c], ninf, _CMP_NEQ_OQ), e0); /* exp(-inf) = 0 */ \
                    e1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s[r][c + 1], ninf, _CMP_NEQ_OQ), e1);                \
                    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));                                                  \
                    _mm512_storeu_si512((void *)(probs[r] + c * 16), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));           \
                }                                                                                                     \
                l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);                                                   \
                for (int c = 0; c < DV; c++) o[r][c] = _mm512_mul_ps(o[r][c], _mm512_set1_ps(alpha[r]));              \
            }                                                                                                         \
            const uint16_t *vb = vp + (j0 / 2) * (int64_t)D * 2;                                                      \
            for (int jp = 0; jp < KEYS / 2; jp++) {                                                                   \
                __m512bh vv[DV];                                                                                      \
                for (int c = 0; c < DV; c++)                                                                          \
                    vv[c] = (__m512bh)_mm512_loadu_si512((const void *)(vb + ((int64_t)jp * D + c * 16) * 2));        \
                for (int r = 0; r < R; r++) {                                                                         \
                    uint32_t pair;                                                                                    \
                    memcpy(&pair, probs[r] + 2 * jp, sizeof pair);                                                    \
                    __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pair);                                             \
                    for (int c = 0; c < DV; c++) o[r][c] = _mm512_dpbf16_ps(o[r][c], pb, vv[c]);                      \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        for (int r = 0; r < n; r++) {                                                                                 \
            __m512 inv = _mm512_set1_ps(1.0f / l[r]);                                                                 \
            uint16_t *dst = j->out + (r0 + r) * j->out_row + (int64_t)head * D;                                       \
            for (int c = 0; c < DV; c++) store16(dst, c * 16, _mm512_mul_ps(o[r][c], inv), BF16);                     \
        }                                                                                                             \
    }

TILE(tile_64, 64, 6)
TILE(tile_128, 128, 3)

int prefill_attention(const void *q, int64_t q_row, int64_t q_head, const void *k, const void *v,
                      const int64_t *table, int64_t n_table, int64_t ctx_len, int64_t q_len, void *out,
                      int64_t out_row, int H, int Hkv, int D, int64_t num_blocks, int block_size, float scale) {
    int G = Hkv > 0 ? H / Hkv : 0;
    if ((D != 64 && D != 128) || G < 1 || G * Hkv != H || block_size < 1 || q_len < 1 || q_len > ctx_len) return 1;
    if (ctx_len > n_table * block_size) return 3;
    for (int64_t i = 0; i < (ctx_len + block_size - 1) / block_size; i++)
        if (table[i] < 0 || table[i] >= num_blocks) return 3;
    const int R = D == 64 ? 6 : 3;
    int64_t ctx_pad = (ctx_len + KEYS - 1) / KEYS * KEYS;
    uint16_t *kp = aligned_alloc(64, sizeof(uint16_t) * (size_t)(Hkv * ctx_pad * D));
    uint16_t *vp = aligned_alloc(64, sizeof(uint16_t) * (size_t)(Hkv * ctx_pad * D));
    if (kp == NULL || vp == NULL) {
        free(kp);
        free(vp);
        return 2;
    }
    job_t job = {q, q_row, q_head, kp, vp, ctx_pad, ctx_len, q_len, out, out_row, H, G, D, scale};
    int64_t head_elems = num_blocks * block_size * (int64_t)D;
    int64_t tiles = (q_len + R - 1) / R;
    if (head_elems / 2 > INT32_MAX) { /* a key's 32-bit lane index must fit the gather's */
        free(kp);
        free(vp);
        return 1;
    }
    /* the packing is split by heads and 64-key spans, so two threads share three heads evenly */
    const int64_t spans = ctx_pad / KEYS;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < Hkv * spans; task++) {
            int64_t h = task / spans, span = task % spans;
            pack_blocks((const uint16_t *)k + h * head_elems, (const uint16_t *)v + h * head_elems, table, ctx_len,
                        span * (KEYS / 16), (span + 1) * (KEYS / 16), block_size, D, kp + h * ctx_pad * D,
                        vp + h * ctx_pad * D);
        }
        /* the last tiles attend the most keys: handed out first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tiles * H; task++) {
            int64_t tile = tiles - 1 - task / H;
            int head = (int)(task % H);
            int64_t r0 = tile * R;
            int n = (int)(q_len - r0 < R ? q_len - r0 : R);
            if (D == 64)
                tile_64(&job, head, r0, n);
            else
                tile_128(&job, head, r0, n);
        }
    }
    free(kp);
    free(vp);
    return 0;
}

#else

int prefill_attention(const void *q, int64_t q_row, int64_t q_head, const void *k, const void *v,
                      const int64_t *table, int64_t n_table, int64_t ctx_len, int64_t q_len, void *out,
                      int64_t out_row, int H, int Hkv, int D, int64_t num_blocks, int block_size, float scale) {
    return 1;
}

#endif
