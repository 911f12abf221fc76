/* DeepSeek MLA's absorbed decode: the two per-head products with kv_b, read in
 * its checkpoint format (FP8 e4m3 with 128 x 128 block scales, or BF16).
 *
 * SHAPES (B decodes, H heads, dn / dv no-rope key and value head dims, r the
 *         latent rank; row h (dn + dv) + i of kv_b is head h's i-th output)
 *   W       [H (dn + dv), r] FP8 (uint8 codes) or BF16, contiguous
 *   scale   [ceil(H (dn + dv) / 128), ceil(r / 128)] FP32 (FP8 only), row stride
 *           scale_ld: W[i][c] = e4m3(W[i][c]) * scale[i / 128][c / 128]
 *   x       [B, H, n] FP32, token stride x_ld, head stride x_hs, n = dn (QUERY)
 *           or r (OUTPUT), contiguous last dim
 *   out     [B, H, m] FP32, contiguous, m = r (QUERY) or dv (OUTPUT)
 *
 * DEFINITION (b < B, h < H)
 *   QUERY   out[b][h][c] = sum_{i < dn} x[b][h][i] W[h (dn + dv) + i][c]       c < r
 *           (q_nope absorbed into the latent: q_lat = q_nope W_uk)
 *   OUTPUT  out[b][h][v] = sum_{c < r} x[b][h][c] W[h (dn + dv) + dn + v][c]  v < dv
 *           (the latent-space attention output through W_uv)
 *
 * REGULARITIES  DeepSeek-V3: H 128, dn = dv = 128, r 512: 16 MB of FP8 kv_b a
 *   layer, read once a decode step for all B (torch's einsums over kv_b widened
 *   to FP32 read 64 MB: 2.1 ms a layer, cold, B = 1, 2 cores; this: 0.7 ms).
 *   Heads go to the pool in equal shares.
 *   AVX-512, FP8 in whole 128 x 128 blocks per head (dn, dv, r multiples of
 *   128: the published layout): QUERY keeps 128 columns of up to 4 decodes in
 *   registers over the head's rows, each row's scale folded into its broadcast
 *   x; OUTPUT scales x per column block once per row block, then one 16-lane
 *   dot per (row, decode). Weights are widened once per 4 decodes.
 *   Otherwise (BF16, ragged dims, AVX2, generic): per weight row, the row is
 *   widened once into an FP32 line (scale applied) and used by every decode:
 *   an axpy into out (QUERY) or a dot with x (OUTPUT), loops in 16 independent
 *   lanes that every ISA build vectorises.
 *   FP8 widening is the float bit trick: the 7 magnitude bits shift to the top
 *   of a float's exponent and mantissa, which is then value x 2^-120 exactly,
 *   subnormals included (float denormals are exact); a multiply by 2^120
 *   restores it (the AVX-512 path splits that factor between the other operand
 *   and the result). e4m3fn's NaN codes are not expected in weights.
 */
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"

#define MLA_LANES 16
#define MLA_MAX_R 4096               /* widest row (the latent rank) */

typedef struct {
    const uint8_t *w;
    const float *scale;
    int64_t scale_ld, x_ld, x_hs;
    const float *x;
    float *out;
    int fp8, H, dn, dv, r, B, mode;
} mla_job;

/* Row `row` of W, columns [0, r), scaled, as FP32 into dst. */
static void mla_row(const mla_job *j, int64_t row, float *restrict dst) {
    const int r = j->r;
    if (!j->fp8) {
        const uint16_t *restrict w = (const uint16_t *)j->w + row * r;
        for (int c = 0; c < r; c++) {
            uint32_t bits = (uint32_t)w[c] << 16;
            memcpy(dst + c, &bits, 4);
        }
        return;
    }
    const uint8_t *restrict w = j->w + row * r;
    const float *s = j->scale + (row >> 7) * j->scale_ld;
    for (int c0 = 0; c0 < r; c0 += 128) {
        const float k = s[c0 >> 7];
        const int c1 = c0 + 128 < r ? c0 + 128 : r;
        for (int c = c0; c < c1; c++) {
            uint32_t u = (uint32_t)w[c] << 24;
            uint32_t bits = (u & 0x80000000u) | ((u & 0x7f000000u) >> 4);
            float f;
            memcpy(&f, &bits, 4);
            dst[c] = f * 0x1p120f * k;          /* the value, exactly; then its scale */
        }
    }
}

static float mla_dot(const float *restrict a, const float *restrict b, int n) {
    float acc[MLA_LANES] = {0};
    int i = 0;
    for (; i + MLA_LANES <= n; i += MLA_LANES)
        for (int l = 0; l < MLA_LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) acc[0] += a[i] * b[i];
    float s = 0.0f;
    for (int l = 0; l < MLA_LANES; l++) s += acc[l];
    return s;
}

static void mla_axpy(float *restrict o, float a, const float *restrict x, int n) {
    for (int c = 0; c < n; c++) o[c] += a * x[c];
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define MLA_INLINE static inline __attribute__((always_inline))

/* 16 e4m3 codes -> 16 floats equal to value x 2^-120 (the spec's bit trick). The
 * fast paths leave the 2^120 out and fold 2^60 into the other operand and 2^60 into
 * the result: products stay far from FP32's denormals (scale x activation ~2^-12
 * would leave value x 2^-132) and from overflow (scale x activation < 2^68). */
MLA_INLINE __m512 mla_raw16(const uint8_t *p) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i sign = _mm512_and_si512(_mm512_slli_epi32(v, 24), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_srli_epi32(_mm512_slli_epi32(v, 25), 5)));
}

/* QUERY of head h, decodes [b0, b0 + NB), columns [c0, c0 + 128): one column block
 * (dn a multiple of 128 keeps every head's rows in whole row blocks), so each row's
 * scale folds into its broadcast x; the accumulators stay in registers. */
MLA_INLINE void mla_query_cols(const mla_job *j, int h, int b0, int c0, const int NB) {
    const int r = j->r;
    const int64_t row0 = (int64_t)h * (j->dn + j->dv);
    const uint8_t *w = j->w + row0 * r + c0;
    __m512 acc[4][8];
    for (int b = 0; b < NB; b++)
        for (int v = 0; v < 8; v++) acc[b][v] = _mm512_setzero_ps();
    for (int i = 0; i < j->dn; i++, w += r) {
        const float k = j->scale[((row0 + i) >> 7) * j->scale_ld + (c0 >> 7)] * 0x1p60f;
        __m512 xb[4];
        for (int b = 0; b < NB; b++)
            xb[b] = _mm512_set1_ps(k * j->x[(int64_t)(b0 + b) * j->x_ld + (int64_t)h * j->x_hs + i]);
        for (int v = 0; v < 8; v++) {
            __m512 raw = mla_raw16(w + 16 * v);
            for (int b = 0; b < NB; b++) acc[b][v] = _mm512_fmadd_ps(xb[b], raw, acc[b][v]);
        }
    }
    const __m512 k = _mm512_set1_ps(0x1p60f);
    for (int b = 0; b < NB; b++) {
        float *o = j->out + ((int64_t)(b0 + b) * j->H + h) * r + c0;
        for (int v = 0; v < 8; v++) _mm512_storeu_ps(o + 16 * v, _mm512_mul_ps(acc[b][v], k));
    }
}

/* OUTPUT of head h, decodes [b0, b0 + NB): per row block (128 of the head's dv
 * rows), xk = x scaled per column block, then one dot per (row, decode). */
MLA_INLINE void mla_output_rows(const mla_job *j, int h, int b0, float *xk, const int NB) {
    const int r = j->r, dv = j->dv;
    const int64_t row0 = (int64_t)h * (j->dn + j->dv) + j->dn;
    const uint8_t *w = j->w + row0 * r;
    for (int v = 0; v < dv; v++, w += r) {
        if (v % 128 == 0) {
            const float *s = j->scale + ((row0 + v) >> 7) * j->scale_ld;
            for (int b = 0; b < NB; b++) {
                const float *x = j->x + (int64_t)(b0 + b) * j->x_ld + (int64_t)h * j->x_hs;
                for (int c = 0; c < r; c += 16)
                    _mm512_storeu_ps(xk + b * r + c,
                                     _mm512_mul_ps(_mm512_loadu_ps(x + c),
                                                   _mm512_set1_ps(s[c >> 7] * 0x1p60f)));
            }
        }
        __m512 acc[4];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
        for (int c = 0; c < r; c += 16) {
            __m512 raw = mla_raw16(w + c);
            for (int b = 0; b < NB; b++)
                acc[b] = _mm512_fmadd_ps(raw, _mm512_loadu_ps(xk + b * r + c), acc[b]);
        }
        for (int b = 0; b < NB; b++)
            j->out[((int64_t)(b0 + b) * j->H + h) * dv + v] = _mm512_reduce_add_ps(acc[b]) * 0x1p60f;
    }
}

/* FP8 in whole 128 x 128 blocks per head (DeepSeek-V3/R1: dn = dv = 128, r = 512). */
static int mla_blocked(const mla_job *j) {
    return j->fp8 && j->dn % 128 == 0 && j->dv % 128 == 0 && j->r % 128 == 0;
}

static void mla_head_blocked(const mla_job *j, int h, float *xk) {
    for (int b0 = 0; b0 < j->B; b0 += 4) {
        const int nb = j->B - b0 < 4 ? j->B - b0 : 4;
        if (j->mode == 0) {
            for (int c0 = 0; c0 < j->r; c0 += 128) {
                if (nb == 4) mla_query_cols(j, h, b0, c0, 4);
                else if (nb == 3) mla_query_cols(j, h, b0, c0, 3);
                else if (nb == 2) mla_query_cols(j, h, b0, c0, 2);
                else mla_query_cols(j, h, b0, c0, 1);
            }
        } else {
            if (nb == 4) mla_output_rows(j, h, b0, xk, 4);
            else if (nb == 3) mla_output_rows(j, h, b0, xk, 3);
            else if (nb == 2) mla_output_rows(j, h, b0, xk, 2);
            else mla_output_rows(j, h, b0, xk, 1);
        }
    }
}
#endif

static void mla_heads(const mla_job *j, int h0, int h1) {
    float line[MLA_MAX_R] __attribute__((aligned(64)));
    const int dn = j->dn, dv = j->dv, r = j->r, B = j->B;
#if defined(__AVX512F__)
    if (mla_blocked(j)) {
        float xk[4 * MLA_MAX_R] __attribute__((aligned(64)));
        for (int h = h0; h < h1; h++) mla_head_blocked(j, h, xk);
        return;
    }
#endif
    for (int h = h0; h < h1; h++) {
        const int64_t base = (int64_t)h * (dn + dv);
        if (j->mode == 0) {                           /* QUERY: out[b][h] = sum_i x_i W_i */
            for (int b = 0; b < B; b++) memset(j->out + ((int64_t)b * j->H + h) * r, 0, 4 * (size_t)r);
            for (int i = 0; i < dn; i++) {
                mla_row(j, base + i, line);
                for (int b = 0; b < B; b++)
                    mla_axpy(j->out + ((int64_t)b * j->H + h) * r,
                             j->x[b * j->x_ld + h * j->x_hs + i], line, r);
            }
        } else {                                      /* OUTPUT: out[b][h][v] = x . W_v */
            for (int v = 0; v < dv; v++) {
                mla_row(j, base + dn + v, line);
                for (int b = 0; b < B; b++)
                    j->out[((int64_t)b * j->H + h) * dv + v] =
                        mla_dot(j->x + b * j->x_ld + h * j->x_hs, line, r);
            }
        }
    }
}

static void mla_worker(void *arg, int tid, int n) {
    const mla_job *j = (const mla_job *)arg;
    mla_heads(j, (int)((int64_t)j->H * tid / n), (int)((int64_t)j->H * (tid + 1) / n));
}

/* The spec block's QUERY (mode 0) or OUTPUT (mode 1) product. Returns 0, or -1 when
 * r exceeds MLA_MAX_R (nothing written). Shapes and strides are checked by the
 * caller (moed/backends/cpu/mla.py). */
static int mla_absorb(const void *w, int fp8, const float *scale, int64_t scale_ld, int H,
                      int dn, int dv, int r, const float *x, int64_t x_ld, int64_t x_hs, int B,
                      float *out, int mode, int nthreads) {
    if (r > MLA_MAX_R) return -1;
    mla_job j = {.w = (const uint8_t *)w, .scale = scale, .scale_ld = scale_ld, .x_ld = x_ld,
                 .x_hs = x_hs, .x = x, .out = out, .fp8 = fp8, .H = H, .dn = dn, .dv = dv,
                 .r = r, .B = B, .mode = mode};
    if (nthreads <= 1 || H < 2) mla_heads(&j, 0, H);
    else pool_run(mla_worker, &j, nthreads < H ? nthreads : H);
    return 0;
}
