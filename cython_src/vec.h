/* Vector-width wrappers: one set per instruction set, chosen by the compiler
 * flags of the extension that includes this file, so that a kernel body is
 * written once over `vf` (VL FP32 lanes) and instantiated at 16 lanes on
 * AVX-512 and 8 on AVX2 (tinyBLAS's scheme). The generic build defines no VL:
 * bodies keep their scalar tail loop only.
 *
 * Every wrapper is one instruction or a fixed sequence of them, so a body over
 * the wrappers runs exactly the operations (and the same FMA or mul + add) it
 * ran when it was spelled per ISA: results are bit for bit the same.
 */
#ifndef MOED_VEC_H
#define MOED_VEC_H

#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(MOED_BF16_EMULATED) && defined(__AVX512F__)
#include "bf16_emu.h"
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------- AVX-512 */
#if defined(__AVX512F__)
#define VL 16
typedef __m512 vf;

ALWAYS_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
ALWAYS_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
ALWAYS_INLINE vf vf_set1(float x) { return _mm512_set1_ps(x); }
ALWAYS_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
ALWAYS_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
ALWAYS_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   /* a b + c */
ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a b */
ALWAYS_INLINE vf vf_round(vf v) {
    return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p 2^j for integral j, |j| <= 128: vscalefps, one rounding (denormal results). */
ALWAYS_INLINE vf vf_ldexp(vf p, vf j) { return _mm512_scalef_ps(p, j); }
/* lane bits: NaN lanes; lanes equal to t */
ALWAYS_INLINE unsigned vf_nan_bits(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
ALWAYS_INLINE unsigned vf_eq_bits(vf v, vf t) { return _mm512_cmp_ps_mask(v, t, _CMP_EQ_OQ); }
ALWAYS_INLINE float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
/* NaN seen in any lane of a stream of vectors */
typedef __mmask16 vf_nans;
ALWAYS_INLINE vf_nans vf_nans_none(void) { return 0; }
ALWAYS_INLINE vf_nans vf_nans_add(vf_nans n, vf v) { return n | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
ALWAYS_INLINE int vf_nans_any(vf_nans n) { return n != 0; }

/* 16 floats -> 16 BF16, round to nearest even like f32_to_bf16; NaN stays NaN.
 * Every AVX-512 build has vcvtneps2bf16, native or emulated (bf16_emu.h). */
ALWAYS_INLINE __m256i bf16x16(vf v) { return (__m256i)_mm512_cvtneps_pbh(v); }
ALWAYS_INLINE void vf_store_bf16(uint16_t *p, vf v) {
    _mm256_storeu_si256((__m256i *)p, bf16x16(v));
}

/* ---------------------------------------------------------------- AVX2 */
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vf;

ALWAYS_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
ALWAYS_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
ALWAYS_INLINE vf vf_set1(float x) { return _mm256_set1_ps(x); }
ALWAYS_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
ALWAYS_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
ALWAYS_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
ALWAYS_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
ALWAYS_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
ALWAYS_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
ALWAYS_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
ALWAYS_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
ALWAYS_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
ALWAYS_INLINE vf vf_round(vf v) {
    return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p 2^j for integral j, |j| <= 128: 2^j built in the exponent field as two
 * factors 2^(j/2), so every step stays finite. */
ALWAYS_INLINE vf vf_ldexp(vf p, vf j) {
    __m256i ji = _mm256_cvtps_epi32(j);
    __m256i j1 = _mm256_srai_epi32(ji, 1), j2 = _mm256_sub_epi32(ji, j1);
    __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(j1, _mm256_set1_epi32(127)), 23));
    __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(j2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}
ALWAYS_INLINE unsigned vf_nan_bits(vf v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
ALWAYS_INLINE unsigned vf_eq_bits(vf v, vf t) { return _mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_EQ_OQ)); }
ALWAYS_INLINE float vf_hmax(vf v) {
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, v);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
    return m;
}
typedef __m256 vf_nans;
ALWAYS_INLINE vf_nans vf_nans_none(void) { return _mm256_setzero_ps(); }
ALWAYS_INLINE vf_nans vf_nans_add(vf_nans n, vf v) { return _mm256_or_ps(n, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
ALWAYS_INLINE int vf_nans_any(vf_nans n) { return _mm256_movemask_ps(n) != 0; }

/* 8 floats -> 8 BF16, round to nearest even like f32_to_bf16; NaN stays NaN. */
ALWAYS_INLINE __m128i bf16x8(vf v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                    _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
ALWAYS_INLINE void vf_store_bf16(uint16_t *p, vf v) { _mm_storeu_si128((__m128i *)p, bf16x8(v)); }
#endif

#ifdef VL
/* exp(v) = 2^j p(r), v = j ln2 + r, |r| <= ln2/2, p the degree-6 Taylor
 * polynomial (relative error < 2e-7): far below the BF16 rounding of the
 * results it feeds (2^-9), and ~10x cheaper than scalar expf. The clamp keeps
 * |j| <= 128; the result is never 0. */
ALWAYS_INLINE vf vf_exp(vf v) {
    v = vf_max(vf_min(v, vf_set1(88.5f)), vf_set1(-88.5f));
    vf j = vf_round(vf_mul(v, vf_set1(1.44269504f)));
    vf r = vf_fnmadd(j, vf_set1(0.693145752f), v);      /* ln2 high part */
    r = vf_fnmadd(j, vf_set1(1.42860677e-6f), r);       /* ln2 low part */
    vf p = vf_set1(1.0f / 720);
    p = vf_fmadd(p, r, vf_set1(1.0f / 120));
    p = vf_fmadd(p, r, vf_set1(1.0f / 24));
    p = vf_fmadd(p, r, vf_set1(1.0f / 6));
    p = vf_fmadd(p, r, vf_set1(0.5f));
    p = vf_fmadd(p, r, vf_set1(1.0f));
    p = vf_fmadd(p, r, vf_set1(1.0f));
    return vf_ldexp(p, j);
}
#endif

#endif
