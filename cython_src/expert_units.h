/* Unit kernels: one 64-row x 128-column tile of a packed expert matrix
 * against up to 4 token rows. One body per instruction set, chosen by the
 * compiler flags of the extension that includes this file.
 *
 * SHAPES
 *   unit (FP8)   64 rows x 128 k = 4 row groups x 32 chunks x 64 bytes (8 KiB)
 *   unit (BF16)  64 rows x 128 k = 4 row groups x 32 chunks x 128 bytes (16 KiB)
 *   x[t]         128 BF16 activations of token t for this k block
 *   out[t][64]   FP32, out += scale * (unit . x[t])
 *
 * DEFINITION (the scalar twin below is this loop)
 *   for t, r < 64: out[t][r] += scale * sum_{k<128} W[r][k] * x[t][k]
 *   (precision contract: x is BF16, products exact, sums FP32; a token's sum
 *   runs in one order whatever nt is, so the output is batch-invariant)
 *
 * LAYOUT of one chunk (16 rows r, 4 columns k of one row group):
 *   BF16: A = 32 words [r0k0 r0k1 r1k0 r1k1 .. r15k1], then B = same for k2, k3.
 *         One vector load of A feeds vdpbf16ps against the broadcast pair
 *         (x[k0], x[k1]): 16 row sums at once, no horizontal add.
 *   FP8:  64 bytes whose 128-bit lane j holds A words 8j..8j+7 in bytes 0..7
 *         and B words 8j..8j+7 in bytes 8..15, so that after the byte LUT the
 *         per-lane vpunpcklbw / vpunpckhbw of (lo, hi) produce A and B exactly.
 *
 * REGULARITIES  decode: 1 token per expert, 8 experts; prefill: tens to
 *   hundreds of tokens per expert, so FP8 units are widened once into a BF16
 *   scratch unit and reused for every group of 4 tokens.
 *
 * EXAMPLE  DeepSeek-V3 gate_proj: 2048 x 7168 -> 32 row tiles x 56 k blocks,
 *   one 128x128 scale per two row tiles, 14.7 MB of FP8 units per expert.
 */
#ifndef MOED_EXPERT_UNITS_H
#define MOED_EXPERT_UNITS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include "vec.h"

#define UNIT_ROWS 64
#define UNIT_K 128
#define GROUP_ROWS 16
#define CHUNKS 32
#define FP8_UNIT_BYTES (UNIT_ROWS * UNIT_K)
#define BF16_UNIT_BYTES (UNIT_ROWS * UNIT_K * 2)
#define MAX_NT 4
#ifndef PF_BYTES
#define PF_BYTES 65536
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif

/* e4m3 code -> float, exact for all 256 codes (0x7f, 0xff are NaN). */
static float g_fp8_value[256];
/* e4m3 magnitude (7 bits) -> high / low byte of the BF16 of the same value. */
static uint8_t g_fp8_bf16_hi[128] __attribute__((aligned(64)));
static uint8_t g_fp8_bf16_lo[128] __attribute__((aligned(64)));
/* e4m3 code -> BF16 bits of the same value (sign included). */
static uint16_t g_fp8_bf16[256];

static float fp8_e4m3_decode(uint8_t code) {
    int sign = code >> 7, exp = (code >> 3) & 15, man = code & 7;
    float v;
    if (exp == 15 && man == 7) return __builtin_nanf("");
    if (exp == 0) v = (float)man / 8.0f / 64.0f;              /* subnormal: 2^-6 * m/8 */
    else v = (1.0f + (float)man / 8.0f) * (float)(1 << exp) / 128.0f; /* 2^(e-7) */
    return sign ? -v : v;
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1);                                            /* RNE */
    return (uint16_t)(u >> 16);
}

static void fp8_tables_init(void) {
    for (int c = 0; c < 256; c++) g_fp8_value[c] = fp8_e4m3_decode((uint8_t)c);
    for (int c = 0; c < 128; c++) {
        float v = g_fp8_value[c];
        uint32_t u;
        memcpy(&u, &v, 4);
        /* every finite e4m3 value has <= 4 significant bits: BF16 holds it exactly */
        uint16_t b = (c == 0x7f) ? 0x7fc0 : (uint16_t)(u >> 16);
        g_fp8_bf16_hi[c] = (uint8_t)(b >> 8);
        g_fp8_bf16_lo[c] = (uint8_t)(b & 0xff);
    }
    for (int c = 0; c < 256; c++)
        g_fp8_bf16[c] = (uint16_t)(((c & 0x80) << 8) | (g_fp8_bf16_hi[c & 0x7f] << 8)
                                   | g_fp8_bf16_lo[c & 0x7f]);
}

/* Position inside a chunk of element (row r < 16, column k < 4). */
static inline int bf16_chunk_pos(int r, int k) { return (k >> 1) * 32 + 2 * r + (k & 1); }
static inline int fp8_chunk_pos(int r, int k) {
    int word = 2 * r + (k & 1);                    /* word inside A or B */
    return 16 * (word >> 3) + 8 * (k >> 1) + (word & 7);
}

/* ---------------------------------------------------------------- scalar */
/* The scalar twin: oracle for the SIMD bodies and the portable path. */
static void unit_scalar(const uint8_t *w, int fp8, const uint16_t *const *x, int nt,
                        float scale, float *out) {
    for (int g = 0; g < 4; g++) {
        float acc[MAX_NT][GROUP_ROWS] = {{0}};
        for (int c = 0; c < CHUNKS; c++) {
            for (int r = 0; r < GROUP_ROWS; r++)
                for (int k = 0; k < 4; k++) {
                    float wv = fp8 ? g_fp8_value[w[g * 2048 + c * 64 + fp8_chunk_pos(r, k)]]
                                   : bf16_to_f32(((const uint16_t *)w)[g * 2048 + c * 64
                                                                       + bf16_chunk_pos(r, k)]);
                    for (int t = 0; t < nt; t++) acc[t][r] += wv * bf16_to_f32(x[t][4 * c + k]);
                }
        }
        for (int t = 0; t < nt; t++)
            for (int r = 0; r < GROUP_ROWS; r++)
                out[t * UNIT_ROWS + g * GROUP_ROWS + r] += scale * acc[t][r];
    }
}

/* ---------------------------------------------------------------- AVX-512 */
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#ifdef MOED_BF16_EMULATED
#define UNIT_ISA "avx512emu"
#else
#define UNIT_ISA "avx512"
#endif
#define UNIT_WIDEN 1

typedef struct { __m512i hi0, hi1, lo0, lo1, sign; } fp8_lut;

static inline fp8_lut fp8_lut_load(void) {
    fp8_lut l;
    l.hi0 = _mm512_load_si512((const void *)g_fp8_bf16_hi);
    l.hi1 = _mm512_load_si512((const void *)(g_fp8_bf16_hi + 64));
    l.lo0 = _mm512_load_si512((const void *)g_fp8_bf16_lo);
    l.lo1 = _mm512_load_si512((const void *)(g_fp8_bf16_lo + 64));
    l.sign = _mm512_set1_epi8((char)0x80);
    return l;
}

/* 64 e4m3 bytes -> 2 x 32 BF16. vpermt2b looks up a 128-entry table with the
 * low 7 bits of each byte (the index's bit 7 is ignored, so no mask), which
 * makes subnormals exact where a shift-and-rebias would need a fix-up; the
 * sign bit is OR-ed back with one vpternlogd. */
ALWAYS_INLINE void widen_fp8(__m512i b, const fp8_lut *l, __m512i *A, __m512i *B) {
    __m512i hi = _mm512_permutex2var_epi8(l->hi0, b, l->hi1);
    __m512i lo = _mm512_permutex2var_epi8(l->lo0, b, l->lo1);
    hi = _mm512_ternarylogic_epi32(hi, b, l->sign, 0xf8);    /* hi | (b & 0x80) */
    *A = _mm512_unpacklo_epi8(lo, hi);
    *B = _mm512_unpackhi_epi8(lo, hi);
}

ALWAYS_INLINE void load_chunk(const uint8_t *w, int fp8, int g, int c, const fp8_lut *l,
                              __m512i *A, __m512i *B) {
    if (fp8) {
        widen_fp8(_mm512_loadu_si512((const void *)(w + g * 2048 + c * 64)), l, A, B);
    } else {
        const uint8_t *p = w + g * 4096 + c * 128;
        *A = _mm512_loadu_si512((const void *)p);
        *B = _mm512_loadu_si512((const void *)(p + 64));
    }
}

ALWAYS_INLINE __m512bh bcast_pair(const uint16_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* One accumulation order for every token count (a token's result must not
 * depend on how many others share the unit: batch-invariant output). Per
 * (row group, token) eight FP32 accumulators: chunk c's A half goes to
 * a[2 (c % 4)], its B half to a[2 (c % 4) + 1]; they are summed a[0] + a[1]
 * + ... + a[7] and added to out as sum * scale + out. Row group by row
 * group, so the unit is read front to back like a plain stream (the hardware
 * prefetcher follows it; in chunk order the reads hop between four streams
 * 2 KiB apart). Eight independent vdpbf16ps chains per token keep the
 * instruction's latency hidden at one token (decode), where the chunk-order
 * body with one chain per group measured 21-25% slower on FP8. Tokens go in
 * pairs (16 accumulators); the prefill GEMM (widened BF16 units, nt 3-4)
 * runs the same pairs over the unit, which stays in L1. */
ALWAYS_INLINE void unit_pair(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out, const uint8_t *pf, int pf_fp8,
                             const fp8_lut *l) {
    enum { U = 4 };
    const __m512 s = _mm512_set1_ps(scale);
    for (int g = 0; g < 4; g++) {
        __m512 a[2][2 * U];
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < 2 * U; i++) a[t][i] = _mm512_setzero_ps();
        for (int c = 0; c < CHUNKS; c += U) {
            if (pf) {
                const char *p = (const char *)pf + (pf_fp8 ? g * 2048 + c * 64 : g * 4096 + c * 128);
                for (int b = 0; b < U * (pf_fp8 ? 64 : 128); b += 64) _mm_prefetch(p + b, PF_HINT);
            }
            for (int j = 0; j < U; j++) {
                __m512i A, B;
                load_chunk(w, fp8, g, c + j, l, &A, &B);
                for (int t = 0; t < nt; t++) {
                    a[t][2 * j] = _mm512_dpbf16_ps(a[t][2 * j], (__m512bh)A, bcast_pair(x[t] + 4 * (c + j)));
                    a[t][2 * j + 1] = _mm512_dpbf16_ps(a[t][2 * j + 1], (__m512bh)B,
                                                       bcast_pair(x[t] + 4 * (c + j) + 2));
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            __m512 sum = a[t][0];
            for (int i = 1; i < 2 * U; i++) sum = _mm512_add_ps(sum, a[t][i]);
            float *o = out + t * UNIT_ROWS + g * GROUP_ROWS;
            _mm512_storeu_ps(o, _mm512_fmadd_ps(sum, s, _mm512_loadu_ps(o)));
        }
    }
}

/* unit_body with an explicit prefetch target: `pf` (or NULL) is the unit this
 * thread will stream PF_BYTES from now, FP8 when pf_fp8 (it may differ from
 * w's format: prefill widens FP8 units into BF16 scratch); every line of it
 * is fetched once, during the first token pair. The caller knows its own
 * future reads (the next tiles of its task and of the tasks it has claimed),
 * which a fixed distance past `w` does not: that lands in tiles other threads
 * own. */
ALWAYS_INLINE void unit_body_pf(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                                float scale, float *out, const uint8_t *pf, int pf_fp8) {
    fp8_lut l = fp8_lut_load();
    if (nt == 1) { unit_pair(w, fp8, x, 1, scale, out, pf, pf_fp8, &l); return; }
    unit_pair(w, fp8, x, 2, scale, out, pf, pf_fp8, &l);
    if (nt == 3) unit_pair(w, fp8, x + 2, 1, scale, out + 2 * UNIT_ROWS, NULL, pf_fp8, &l);
    if (nt == 4) unit_pair(w, fp8, x + 2, 2, scale, out + 2 * UNIT_ROWS, NULL, pf_fp8, &l);
}

ALWAYS_INLINE void unit_body(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out) {
    unit_body_pf(w, fp8, x, nt, scale, out, nt <= 2 ? w + PF_BYTES : NULL, fp8);
}

/* FP8 unit -> BF16 unit in the BF16 chunk layout (prefill: widen once, reuse). */
static void unit_widen(const uint8_t *w, uint16_t *dst) {
    fp8_lut l = fp8_lut_load();
    for (int g = 0; g < 4; g++)
        for (int c = 0; c < CHUNKS; c++) {
            __m512i A, B;
            widen_fp8(_mm512_loadu_si512((const void *)(w + g * 2048 + c * 64)), &l, &A, &B);
            _mm512_store_si512((void *)(dst + g * 2048 + c * 64), A);
            _mm512_store_si512((void *)(dst + g * 2048 + c * 64 + 32), B);
        }
}

/* ---------------------------------------------------------------- AVX2 */
#elif defined(__AVX2__) && defined(__FMA__)
#define UNIT_ISA "avx2"

/* 8 weights of lane j (rows 4j..4j+3 x one column pair) -> 8 floats. */
ALWAYS_INLINE __m256 load8(const uint8_t *p, int fp8) {
    if (fp8) {
        /* e4m3 bits to the top of a float: the magnitude moves into exponent/mantissa
         * with exponent field e (bias 127 instead of 7), so the float is exactly
         * value * 2^-120, subnormals included (float denormals are exact), then
         * one multiply by 2^120 restores it. */
        __m256i v = _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)), 24);
        __m256i sign = _mm256_and_si256(v, _mm256_set1_epi32((int)0x80000000u));
        __m256i mag = _mm256_srli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7f000000)), 4);
        __m256 f = _mm256_castsi256_ps(_mm256_or_si256(sign, mag));
        __m256 r = _mm256_mul_ps(f, _mm256_set1_ps(0x1p120f));
        /* 0x7f / 0xff are NaN in e4m3fn; the shift maps them to finite floats */
        __m256i nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x07f00000));
        return _mm256_or_ps(r, _mm256_castsi256_ps(nan));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* (x[k], x[k+1]) repeated 4 times as floats. */
ALWAYS_INLINE __m256 xpair(const uint16_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    __m256i w = _mm256_set1_epi32(v);
    __m256i lo = _mm256_slli_epi32(w, 16);
    __m256i hi = _mm256_and_si256(w, _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_castsi256_ps(_mm256_blend_epi32(lo, hi, 0xaa));
}

#define UNIT_WIDEN 1

/* FP8 unit -> BF16 unit in the BF16 chunk layout, by table (prefill: widen
 * once, reuse for every token; the FP8 body converts per token and ran
 * prefill ~3x slower). In FP8 chunk lane j, bytes 0..7 are A words 8j..8j+7
 * and bytes 8..15 the B words. */
static void unit_widen(const uint8_t *w, uint16_t *dst) {
    for (int g = 0; g < 4; g++)
        for (int c = 0; c < CHUNKS; c++) {
            const uint8_t *src = w + g * 2048 + c * 64;
            uint16_t *A = dst + g * 2048 + c * 64, *B = A + 32;
            for (int j = 0; j < 4; j++)
                for (int i = 0; i < 8; i++) {
                    A[8 * j + i] = g_fp8_bf16[src[16 * j + i]];
                    B[8 * j + i] = g_fp8_bf16[src[16 * j + 8 + i]];
                }
        }
}

/* pf: see the AVX-512 unit_body_pf; fetched during the first token's pass. */
ALWAYS_INLINE void unit_body_pf(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                                float scale, float *out, const uint8_t *pf, int pf_fp8) {
    for (int t = 0; t < nt; t++)
        for (int g = 0; g < 4; g++) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(),
                             _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int c = 0; c < CHUNKS; c++) {
                if (pf && t == 0) {
                    const char *p = (const char *)pf + g * (pf_fp8 ? 2048 : 4096) + c * (pf_fp8 ? 64 : 128);
                    _mm_prefetch(p, _MM_HINT_T0);
                    if (!pf_fp8) _mm_prefetch(p + 64, _MM_HINT_T0);
                }
                __m256 xa = xpair(x[t] + 4 * c), xb = xpair(x[t] + 4 * c + 2);
                for (int j = 0; j < 4; j++) {
                    const uint8_t *pa, *pb;
                    if (fp8) { pa = w + g * 2048 + c * 64 + 16 * j; pb = pa + 8; }
                    else { pa = w + g * 4096 + c * 128 + 16 * j; pb = pa + 64; }
                    acc[j] = _mm256_fmadd_ps(load8(pa, fp8), xa, acc[j]);
                    acc[j] = _mm256_fmadd_ps(load8(pb, fp8), xb, acc[j]);
                }
            }
            /* lane j holds rows 4j..4j+3 as (even k, odd k) partial pairs */
            float *o = out + t * UNIT_ROWS + g * GROUP_ROWS;
            for (int j = 0; j < 4; j++) {
                float a[8];
                _mm256_storeu_ps(a, acc[j]);
                for (int i = 0; i < 4; i++) o[4 * j + i] += scale * (a[2 * i] + a[2 * i + 1]);
            }
        }
}

ALWAYS_INLINE void unit_body(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out) {
    unit_body_pf(w, fp8, x, nt, scale, out, NULL, fp8);
}

#else
#define UNIT_ISA "generic"

ALWAYS_INLINE void unit_body(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out) {
    unit_scalar(w, fp8, x, nt, scale, out);
}

ALWAYS_INLINE void unit_body_pf(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                                float scale, float *out, const uint8_t *pf, int pf_fp8) {
    (void)pf; (void)pf_fp8;
    unit_scalar(w, fp8, x, nt, scale, out);
}
#endif

/* ---------------------------------------------------------------- row helpers
 * h[i] = bf16(silu(g[i]) * u[i]) and x[i] = bf16(f[i]) over a row, n elements,
 * VL lanes at a time (vec.h), then the scalar twin on the tail. exp is vf_exp:
 * scalar expf cost up to a sixth of a prefill call (one expf per slot x
 * intermediate).
 */
static inline float silu_ref(float g) { return g / (1.0f + expf(-g)); }

static void silu_mul_bf16(const float *g, const float *u, uint16_t *h, int n) {
    int i = 0;
#ifdef VL
    for (; i + VL <= n; i += VL) {
        vf gv = vf_load(g + i);
        vf e = vf_exp(vf_sub(vf_zero(), gv));
        vf s = vf_div(gv, vf_add(vf_set1(1.0f), e));
        vf_store_bf16(h + i, vf_mul(s, vf_load(u + i)));
    }
#endif
    for (; i < n; i++) h[i] = f32_to_bf16(silu_ref(g[i]) * u[i]);
}

static void f32_row_to_bf16(const float *f, uint16_t *b, int n) {
    int i = 0;
#ifdef VL
    for (; i + VL <= n; i += VL) vf_store_bf16(b + i, vf_load(f + i));
#endif
    for (; i < n; i++) b[i] = f32_to_bf16(f[i]);
}

#endif
