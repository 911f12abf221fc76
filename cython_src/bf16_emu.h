/* AVX512_BF16 emulated on AVX-512F: the two BF16 instructions the kernels use,
 * for the avx512emu build (the AVX-512 kernels on AVX-512 CPUs without
 * AVX512_BF16: Skylake-X, Cascade Lake, Ice Lake). It exists so the AVX-512
 * code paths — their precision and their reduction orders — are tested on
 * such machines; it is never chosen automatically.
 *
 * vdpbf16ps (Intel SDM): for each FP32 lane j,
 *     acc[j] += bf16(a.hi) * bf16(b.hi);  acc[j] += bf16(a.lo) * bf16(b.lo)
 * in that order, each addition rounded to nearest even. A product of two BF16
 * values is exact in FP32 (8 x 8 significand bits), so one FMA per half gives
 * the same roundings. The hardware also treats denormal inputs and results as
 * zero (DAZ, FTZ); the emulation keeps denormals, so results differ only where
 * an operand or a partial sum is below 2^-126.
 * vcvtneps2bf16: FP32 -> BF16, round to nearest even, NaN stays a quiet NaN.
 */
#ifndef MOED_BF16_EMU_H
#define MOED_BF16_EMU_H
#include <immintrin.h>

#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif

static inline __attribute__((always_inline)) __m512
moed_emu_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512i ai = (__m512i)a, bi = (__m512i)b;
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(ai, hi)),
                          _mm512_castsi512_ps(_mm512_and_si512(bi, hi)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(ai, 16)),
                           _mm512_castsi512_ps(_mm512_slli_epi32(bi, 16)), acc);
}

static inline __attribute__((always_inline)) __m256bh moed_emu_cvtneps_pbh(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                    _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return (__m256bh)_mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

#define _mm512_dpbf16_ps(acc, a, b) moed_emu_dpbf16_ps((acc), (a), (b))
#define _mm512_cvtneps_pbh(v) moed_emu_cvtneps_pbh(v)
#endif
