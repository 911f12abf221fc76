/* Unit kernels: one 64-row x 128-column tile of a packed expert matrix
 * against up to 4 token rows. One body per instruction set, chosen by the
 * compiler flags of the extension that includes this file.
 *
 * SHAPES
 *   unit (FP8)   64 rows x 128 k = 4 row groups x 32 chunks x 64 bytes (8 KiB)
 *   unit (BF16)  64 rows x 128 k = 4 row groups x 32 chunks x 128 bytes (16 KiB)
 *   unit (INT4)  64 rows x 128 k = 4 row groups x 16 chunk pairs x 64 bytes (4 KiB)
 *                of codes, then FP32 group scales [4 row groups][ng][16 rows]
 *                (ng = 128 / G groups of G columns), then, asymmetric only,
 *                index offsets 16 - zero as bytes in the same order
 *   x[t]         128 BF16 activations of token t for this k block
 *   out[t][64]   FP32, out += scale * (unit . x[t])
 *
 * DEFINITION (the scalar twin below is this loop)
 *   for t, r < 64: out[t][r] += scale * sum_{k<128} W[r][k] * x[t][k]
 *   INT4: out[t][r] += sum_j s[r][j] * sum_{k in group j} (q[r][k] - z[r][j]) * x[t][k]
 *   (the unit's own group scales; the `scale` argument is unused)
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
 *   INT4: chunks 2p and 2p+1 share 64 bytes = 32 u16 words; word w (= A/B word
 *         w: row w/2, column pair w%2) holds in nibbles 0..3 the codes of A(2p),
 *         B(2p), A(2p+1), B(2p+1). Shift, mask, add the row's offset 16 - z and
 *         one vpermw through the BF16 table of -16..15 gives the BF16 of q - z
 *         (exact: 5-bit integers) in the BF16 layout, 16 lanes a row.
 *
 * REGULARITIES  decode: 1 token per expert, 8 experts; prefill: tens to
 *   hundreds of tokens per expert, so FP8 units are widened once into a BF16
 *   scratch unit and reused for every group of 4 tokens (AVX2: up to 5,
 *   unit_body_wide).
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
#define INT4_CODE_BYTES (UNIT_ROWS * UNIT_K / 2)
#define WIDE_UNIT_BYTES (BF16_UNIT_BYTES + 4 * UNIT_ROWS * 4)   /* BF16 + INT4 scales, ng <= 4 */

/* Weight format codes (the `fmt` of a packed matrix): 0 BF16, 1 FP8, INT4 =
 * 2 | asym << 2 | log2(ng) << 3; WF_WIDE marks an INT4 unit widened to BF16
 * codes (q - z) with its group scales after them (prefill scratch). */
#define WF_BF16 0
#define WF_FP8 1
#define WF_INT4 2
#define WF_WIDE 64
static inline int wf_int4(int f) { return (f & 3) == WF_INT4; }
static inline int wf_asym(int f) { return (f >> 2) & 1; }
static inline int wf_ng(int f) { return 1 << ((f >> 3) & 3); }
static inline int wf_wide(int f) { return (f & WF_WIDE) != 0; }

static inline int unit_bytes_of(int f) {
    if (!wf_int4(f)) return f == WF_FP8 ? FP8_UNIT_BYTES : BF16_UNIT_BYTES;
    int ng = wf_ng(f);
    if (wf_wide(f)) return BF16_UNIT_BYTES + 256 * ng;
    return INT4_CODE_BYTES + 256 * ng + (wf_asym(f) ? 64 * ng : 0);
}

/* Whether a unit of this format is widened once into BF16 scratch before a
 * prefill's token groups reuse it (the format it then has: unit_widen_fmt). */
static inline int wf_widens(int f) { return f == WF_FP8 || (wf_int4(f) && !wf_wide(f)); }

static inline const float *int4_scales(const uint8_t *w, int f) {
    return (const float *)(w + (wf_wide(f) ? BF16_UNIT_BYTES : INT4_CODE_BYTES));
}
static inline const uint8_t *int4_offsets(const uint8_t *w, int f) {
    return (const uint8_t *)(int4_scales(w, f) + 64 * wf_ng(f));
}

/* Prefetch share `it` (0..31, one per row group and 4 chunks) of the unit pf:
 * a 32nd of its bytes, whatever its format, into L2 (prefetcht2): PF_BYTES
 * ahead is twice a 32 KiB L1, so lines fetched into L1 that far ahead evict the
 * unit being read before it is done. Zen 4, 2 threads, cold, paired against
 * prefetcht0: the FP8 LM head at 1 token 10-15 -> 8.2-9.1 ms, at 4 tokens
 * 17.5-19.8 -> 12.2-13.7 ms; the BF16 LM head 23-25 -> 16.5-20.6 ms, at 4 tokens
 * 28-32 -> 20-25 ms; 8-layer decode 21.2-21.5 -> 24.5-24.6 tok/s. prefetchnta
 * and a longer distance (192 KiB) measured slower. */
#ifndef PF_LOCALITY
#define PF_LOCALITY 1
#endif
ALWAYS_INLINE void pf_share(const uint8_t *pf, int pf_fmt, int it) {
    const int ub = unit_bytes_of(pf_fmt);
    for (int b = (it * ub / 32) & ~63; b < (it + 1) * ub / 32; b += 64)
        __builtin_prefetch((const char *)pf + b, 0, PF_LOCALITY);
}
#ifndef PF_BYTES
#define PF_BYTES 65536
#endif

/* e4m3 code -> float, exact for all 256 codes (0x7f, 0xff are NaN). */
static float g_fp8_value[256];
/* e4m3 magnitude (7 bits) -> high / low byte of the BF16 of the same value. */
static uint8_t g_fp8_bf16_hi[128] __attribute__((aligned(64)));
static uint8_t g_fp8_bf16_lo[128] __attribute__((aligned(64)));
/* e4m3 code -> BF16 bits of the same value (sign included). */
static uint16_t g_fp8_bf16[256];
/* BF16 of the integer i - 16, i < 32: INT4 q - z + 16 -> BF16 (vpermw's table). */
static uint16_t g_int4_bf16[32] __attribute__((aligned(64)));
/* BF16 of (i & 15) - 8, i < 32: symmetric INT4 q -> BF16 of q - 8 (vpermw's table for
 * unmasked codes: its index bit 4, the next code's low bit, picks the same entry). */
static uint16_t g_int4_sym_bf16[32] __attribute__((aligned(64)));

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
    for (int i = 0; i < 32; i++) g_int4_bf16[i] = f32_to_bf16((float)(i - 16));
    for (int i = 0; i < 32; i++) g_int4_sym_bf16[i] = f32_to_bf16((float)((i & 15) - 8));
}

/* Position inside a chunk of element (row r < 16, column k < 4). */
static inline int bf16_chunk_pos(int r, int k) { return (k >> 1) * 32 + 2 * r + (k & 1); }
static inline int fp8_chunk_pos(int r, int k) {
    int word = 2 * r + (k & 1);                    /* word inside A or B */
    return 16 * (word >> 3) + 8 * (k >> 1) + (word & 7);
}

/* INT4 q - z (row r < 16 of row group g, column k < 4 of chunk c; j: c's group)
 * as stored: codes and offsets, or widened BF16. */
static inline float int4_value(const uint8_t *w, int f, int g, int c, int r, int k) {
    if (wf_wide(f))
        return bf16_to_f32(((const uint16_t *)w)[g * 2048 + c * 64 + bf16_chunk_pos(r, k)]);
    int word = ((const uint16_t *)w)[g * 512 + (c >> 1) * 32 + 2 * r + (k & 1)];
    int code = (word >> (4 * (2 * (c & 1) + (k >> 1)))) & 15;
    int ng = wf_ng(f), j = c / (CHUNKS / ng);
    int zero = wf_asym(f) ? 16 - int4_offsets(w, f)[(g * ng + j) * 16 + r] : 8;
    return (float)(code - zero);
}

/* INT4 unit -> the same unit widened: BF16 q - z in the BF16 chunk layout, then its
 * group scales (prefill: widen once, reuse). Scalar: the oracle of the SIMD one. */
static void unit_widen_q4_scalar(const uint8_t *w, int f, uint16_t *dst) {
    for (int g = 0; g < 4; g++)
        for (int c = 0; c < CHUNKS; c++)
            for (int r = 0; r < GROUP_ROWS; r++)
                for (int k = 0; k < 4; k++)
                    dst[g * 2048 + c * 64 + bf16_chunk_pos(r, k)] =
                        f32_to_bf16(int4_value(w, f, g, c, r, k));
    memcpy((uint8_t *)dst + BF16_UNIT_BYTES, int4_scales(w, f), 256 * (size_t)wf_ng(f));
}

static inline int unit_widen_fmt(int f) {
    return wf_int4(f) ? ((f & ~4) | WF_WIDE) : WF_BF16;
}

static void unit_scalar_q4(const uint8_t *w, int f, const uint16_t *const *x, int nt,
                           float *out) {
    const int ng = wf_ng(f), gc = CHUNKS / ng;
    const float *sc = int4_scales(w, f);
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < ng; j++) {
            float acc[MAX_NT][GROUP_ROWS] = {{0}};
            for (int c = j * gc; c < (j + 1) * gc; c++)
                for (int r = 0; r < GROUP_ROWS; r++)
                    for (int k = 0; k < 4; k++) {
                        float wv = int4_value(w, f, g, c, r, k);
                        for (int t = 0; t < nt; t++)
                            acc[t][r] += wv * bf16_to_f32(x[t][4 * c + k]);
                    }
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < GROUP_ROWS; r++)
                    out[t * UNIT_ROWS + g * GROUP_ROWS + r] += sc[(g * ng + j) * 16 + r] * acc[t][r];
        }
}

/* ---------------------------------------------------------------- scalar */
/* The scalar twin: oracle for the SIMD bodies and the portable path. */
static void unit_scalar(const uint8_t *w, int fp8, const uint16_t *const *x, int nt,
                        float scale, float *out) {
    if (wf_int4(fp8)) { unit_scalar_q4(w, fp8, x, nt, out); return; }
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
/* dense linears: up to UNIT_DIRECT_DECODE tokens stream as decode; up to
 * UNIT_DIRECT_TOKENS FP8 is widened in registers (once per 4 tokens: unit_rows),
 * past it once into BF16 scratch (see dense_kernels.c). */
#define UNIT_DIRECT_DECODE 8
#define UNIT_DIRECT_TOKENS 4

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

/* The chains' sum a[0] + .. + a[n-1], after `part` when carry: a row group in
 * two passes sums in the one-pass order. */
ALWAYS_INLINE __m512 chain_sum(__m512 part, const __m512 *a, const int n, const int carry) {
    __m512 sum = carry ? _mm512_add_ps(part, a[0]) : a[0];
    for (int i = 1; i < n; i++) sum = _mm512_add_ps(sum, a[i]);
    return sum;
}

/* One pass over row group g: chunks c with c % 4 in [j0, j0 + nj), chunk c's A
 * half into a[2 (c % 4 - j0)], its B half into the next; part[t] = their sum
 * (after part[t] when carry). */
ALWAYS_INLINE void unit_pass(const uint8_t *w, int fp8, int g, const int j0, const int nj,
                             const uint16_t *const *x, const int nt, __m512 *part,
                             const int carry, const uint8_t *pf, int pf_fp8, const fp8_lut *l) {
    __m512 a[MAX_NT][8];
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < 2 * nj; i++) a[t][i] = _mm512_setzero_ps();
    for (int c = j0; c < CHUNKS; c += 4) {
        if (pf) pf_share(pf, pf_fp8, g * 8 + c / 4);
        for (int j = 0; j < nj; j++) {
            __m512i A, B;
            load_chunk(w, fp8, g, c + j, l, &A, &B);
            for (int t = 0; t < nt; t++) {
                const uint16_t *xt = x[t] + 4 * (c + j);
                a[t][2 * j] = _mm512_dpbf16_ps(a[t][2 * j], (__m512bh)A, bcast_pair(xt));
                a[t][2 * j + 1] = _mm512_dpbf16_ps(a[t][2 * j + 1], (__m512bh)B, bcast_pair(xt + 2));
            }
        }
    }
    for (int t = 0; t < nt; t++) part[t] = chain_sum(part[t], a[t], 2 * nj, carry);
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
 * body with one chain per group measured 21-25% slower on FP8. 1..2 tokens
 * (16 accumulators) in one pass. 3..4 tokens in two, each chunk widened once
 * (a pass per token pair widened it again for the second pair): chunks c % 4
 * in {0, 1} feed a[0..3], then c % 4 in {2, 3} a[4..7], the first pass's sum
 * carried into the second, so the sum runs in the same order: the same bits.
 * 4 chains a token (16 at 4 tokens) keep vdpbf16ps busy. One Zen 4 core, unit
 * in L1, best of 3 paired against a pass per pair: FP8 3 / 4 tokens 484 / 580
 * -> 340 / 403 ns, BF16 290 / 340 -> 242 / 309 ns. */
ALWAYS_INLINE void unit_rows(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out, const uint8_t *pf, int pf_fp8,
                             const fp8_lut *l) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int g = 0; g < 4; g++) {
        __m512 part[MAX_NT];
        for (int t = 0; t < nt; t++) part[t] = _mm512_setzero_ps();
        if (nt <= 2) {
            unit_pass(w, fp8, g, 0, 4, x, nt, part, 0, pf, pf_fp8, l);
        } else {
            unit_pass(w, fp8, g, 0, 2, x, nt, part, 0, pf, pf_fp8, l);
            unit_pass(w, fp8, g, 2, 2, x, nt, part, 1, NULL, pf_fp8, l);
        }
        for (int t = 0; t < nt; t++) {
            float *o = out + t * UNIT_ROWS + g * GROUP_ROWS;
            _mm512_storeu_ps(o, _mm512_fmadd_ps(part[t], s, _mm512_loadu_ps(o)));
        }
    }
}

/* INT4 chunks 2p, 2p+1 of row group g -> their A and B halves as BF16 q - z.
 * Symmetric (sym, tab = g_int4_sym_bf16): vpermw reads each code unmasked, its
 * table folding in z = 8 (3 shifts and 4 vpermw against 15 ops: one Zen 4 core,
 * unit in L1, group 32, 1 / 2 tokens 227 / 289 -> 177 / 241 ns). Asymmetric:
 * code + 16 - z through g_int4_bf16. */
ALWAYS_INLINE void widen_q4(const uint8_t *w, int g, int p, int sym, __m512i off, __m512i tab,
                            __m512i *A0, __m512i *B0, __m512i *A1, __m512i *B1) {
    const __m512i m4 = _mm512_set1_epi16(15);
    __m512i v = _mm512_loadu_si512((const void *)(w + g * 1024 + p * 64));
    if (sym) {
        *A0 = _mm512_permutexvar_epi16(v, tab);
        *B0 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);
        *A1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tab);
        *B1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tab);
        return;
    }
    *A0 = _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_and_si512(v, m4), off), tab);
    *B0 = _mm512_permutexvar_epi16(
        _mm512_add_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), off), tab);
    *A1 = _mm512_permutexvar_epi16(
        _mm512_add_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 8), m4), off), tab);
    *B1 = _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_srli_epi16(v, 12), off), tab);
}

/* Row group g, group j's index offsets (16 - z) in both words of each row's lane. */
ALWAYS_INLINE __m512i q4_offsets(const uint8_t *w, int f, int g, int j) {
    if (!wf_asym(f) || wf_wide(f)) return _mm512_set1_epi16(8);
    __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(
        (const __m128i *)(int4_offsets(w, f) + (g * wf_ng(f) + j) * 16)));
    return _mm512_or_si512(z, _mm512_slli_epi32(z, 16));
}

/* INT4 (codes, or widened: the same A/B values from BF16 scratch) against 1..4
 * tokens, in the FP8/BF16 body's order within a group: chunk c's halves into
 * a[2 (c % 4)], a[2 (c % 4) + 1], summed a[0] + .. + a[7], then out += sum *
 * the rows' group scale, group after group. The widened and direct units give
 * identical A/B, so prefill and decode give identical bits. At 3..4 tokens the
 * group runs in two passes as in unit_rows (each chunk pair widened once; the
 * first pass's a[0] + .. + a[3] carries into the second: the same order). */
ALWAYS_INLINE void q4_pass(const uint8_t *w, int wide, int sym, int g, int c0, int c1,
                           const int h0, const int nh, __m512i off, __m512i tab,
                           const uint16_t *const *x, const int nt, __m512 *part,
                           const int carry, const uint8_t *pf, int pf_fmt) {
    __m512 a[MAX_NT][8];
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < 4 * nh; i++) a[t][i] = _mm512_setzero_ps();
    for (int c = c0; c < c1; c += 4) {
        if (pf) pf_share(pf, pf_fmt, g * 8 + c / 4);
        for (int k = 0; k < nh; k++) {
            const int h = h0 + 2 * k;
            __m512i A0, B0, A1, B1;
            if (wide) {
                const uint8_t *q = w + g * 4096 + (c + h) * 128;
                A0 = _mm512_loadu_si512((const void *)q);
                B0 = _mm512_loadu_si512((const void *)(q + 64));
                A1 = _mm512_loadu_si512((const void *)(q + 128));
                B1 = _mm512_loadu_si512((const void *)(q + 192));
            } else {
                widen_q4(w, g, (c + h) / 2, sym, off, tab, &A0, &B0, &A1, &B1);
            }
            for (int t = 0; t < nt; t++) {
                const uint16_t *xt = x[t] + 4 * (c + h);
                a[t][4 * k] = _mm512_dpbf16_ps(a[t][4 * k], (__m512bh)A0, bcast_pair(xt));
                a[t][4 * k + 1] = _mm512_dpbf16_ps(a[t][4 * k + 1], (__m512bh)B0, bcast_pair(xt + 2));
                a[t][4 * k + 2] = _mm512_dpbf16_ps(a[t][4 * k + 2], (__m512bh)A1, bcast_pair(xt + 4));
                a[t][4 * k + 3] = _mm512_dpbf16_ps(a[t][4 * k + 3], (__m512bh)B1, bcast_pair(xt + 6));
            }
        }
    }
    for (int t = 0; t < nt; t++) part[t] = chain_sum(part[t], a[t], 4 * nh, carry);
}

ALWAYS_INLINE void unit_q4(const uint8_t *w, int f, const uint16_t *const *x, const int nt,
                           float *out, const uint8_t *pf, int pf_fmt) {
    const int ng = wf_ng(f), gc = CHUNKS / ng, wide = wf_wide(f), sym = !wide && !wf_asym(f);
    const float *sc = int4_scales(w, f);
    const __m512i tab = _mm512_load_si512((const void *)(sym ? g_int4_sym_bf16 : g_int4_bf16));
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < ng; j++) {
            const __m512i off = q4_offsets(w, f, g, j);
            const int c0 = j * gc, c1 = c0 + gc;
            __m512 part[MAX_NT];
            for (int t = 0; t < nt; t++) part[t] = _mm512_setzero_ps();
            if (nt <= 2) {
                q4_pass(w, wide, sym, g, c0, c1, 0, 2, off, tab, x, nt, part, 0, pf, pf_fmt);
            } else {
                q4_pass(w, wide, sym, g, c0, c1, 0, 1, off, tab, x, nt, part, 0, pf, pf_fmt);
                q4_pass(w, wide, sym, g, c0, c1, 2, 1, off, tab, x, nt, part, 1, NULL, pf_fmt);
            }
            const __m512 s = _mm512_loadu_ps(sc + (g * ng + j) * 16);
            for (int t = 0; t < nt; t++) {
                float *o = out + t * UNIT_ROWS + g * GROUP_ROWS;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(part[t], s, _mm512_loadu_ps(o)));
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
    if (wf_int4(fp8)) { unit_q4(w, fp8, x, nt, out, pf, pf_fp8); return; }
    fp8_lut l = fp8_lut_load();
    unit_rows(w, fp8, x, nt, scale, out, pf, pf_fp8, &l);
}

ALWAYS_INLINE void unit_body(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out) {
    unit_body_pf(w, fp8, x, nt, scale, out, nt <= 2 ? w + PF_BYTES : NULL, fp8);
}

static void unit_widen_q4(const uint8_t *w, int f, uint16_t *dst) {
    const int ng = wf_ng(f), gc = CHUNKS / ng, sym = !wf_asym(f);
    const __m512i tab = _mm512_load_si512((const void *)(sym ? g_int4_sym_bf16 : g_int4_bf16));
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < ng; j++) {
            const __m512i off = q4_offsets(w, f, g, j);
            for (int c = j * gc; c < (j + 1) * gc; c += 2) {
                __m512i A0, B0, A1, B1;
                widen_q4(w, g, c / 2, sym, off, tab, &A0, &B0, &A1, &B1);
                uint16_t *d = dst + g * 2048 + c * 64;
                _mm512_store_si512((void *)d, A0);
                _mm512_store_si512((void *)(d + 32), B0);
                _mm512_store_si512((void *)(d + 64), A1);
                _mm512_store_si512((void *)(d + 96), B1);
            }
        }
    memcpy((uint8_t *)dst + BF16_UNIT_BYTES, int4_scales(w, f), 256 * (size_t)ng);
}

/* FP8 unit -> BF16 unit in the BF16 chunk layout (prefill: widen once, reuse);
 * INT4 -> the widened INT4 unit (unit_widen_fmt says which). */
static void unit_widen(const uint8_t *w, int f, uint16_t *dst) {
    if (wf_int4(f)) { unit_widen_q4(w, f, dst); return; }
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
/* dense linears: FP8 units run unwidened and stream as decode up to this many tokens */
#define UNIT_DIRECT_DECODE 8

/* 16 e4m3 codes of FP8 chunk lane j (bytes 0..7: A words 8j..8j+7, bytes 8..15: the
 * B words) -> the A and B lanes as floats, each exactly value * 2^-8 (the caller's
 * scale carries the 2^8): with the sign in bit 15, the magnitude's bits become an
 * FP16 exponent (bias 15 against e4m3's 7) and mantissa, subnormals included, and
 * F16C widens them; the NaN codes 0x7f / 0xff become an FP16 NaN. */
ALWAYS_INLINE __m256i fp16_of_fp8_hi(__m256i v) {
    /* v: 16 codes in the high bytes of words. Bits 15, 14: the sign; 13..7: the
     * magnitude; then bit 14 cleared; a NaN code's word becomes 0xffff (no other
     * code's can) */
    __m256i h = _mm256_and_si256(_mm256_srai_epi16(v, 1), _mm256_set1_epi16((short)0xbf80));
    __m256i mag = _mm256_and_si256(h, _mm256_set1_epi16(0x3f80));
    return _mm256_or_si256(h, _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x3f80)));
}

/* v: 16 codes as words */
ALWAYS_INLINE __m256i fp16_of_fp8(__m256i v) { return fp16_of_fp8_hi(_mm256_slli_epi16(v, 8)); }

ALWAYS_INLINE __m256i load16_codes(const uint8_t *p) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
}

ALWAYS_INLINE void fp16_to_floats(__m256i h, __m256 *a, __m256 *b) {
    *a = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *b = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

ALWAYS_INLINE void load16_fp8(const uint8_t *p, __m256 *a, __m256 *b) {
    fp16_to_floats(fp16_of_fp8(load16_codes(p)), a, b);
}

#define UNIT_WIDEN 1

/* The 32 codes of FP8 chunk lanes j, j + 1 -> their A (a[0], a[1]) and B (b[0], b[1])
 * lanes as load16_fp8 gives them: the per-lane byte unpacks put lane j's A bytes
 * and then lane j + 1's in the high bytes of 16 words (and the B bytes likewise),
 * so no word is shifted into place. */
ALWAYS_INLINE void load32_fp8(const uint8_t *p, __m256 *a, __m256 *b) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), z = _mm256_setzero_si256();
    fp16_to_floats(fp16_of_fp8_hi(_mm256_unpacklo_epi8(z, v)), a, a + 1);
    fp16_to_floats(fp16_of_fp8_hi(_mm256_unpackhi_epi8(z, v)), b, b + 1);
}

/* A token's 128 BF16 activations as floats (once per unit, then broadcast from it). */
ALWAYS_INLINE void x_floats(const uint16_t *x, float *xf) {
    for (int i = 0; i < UNIT_K; i += 8)
        _mm256_storeu_ps(xf + i, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i))), 16)));
}

/* INT4 on AVX2. A 32-byte load of chunk pair p's words holds, for row half hh, 8
 * dwords: row 8hh + i's even-column word in the low half, its odd-column word in
 * the high half, 4 nibbles each: A(2p), B(2p), A(2p+1), B(2p+1). Nibble q moved to
 * the low bits of its dword plus the row's bias 0x4b000000 + 16 - z is the float
 * 2^23 + 16 + q - z; minus 2^23 + 16 that is q - z, exact, for every zero point:
 * the even and odd chains of 8 rows without a widening instruction. */
ALWAYS_INLINE __m256i q4_bias(const uint8_t *w, int f, int g, int jg, int hh) {
    if (!wf_asym(f) || wf_wide(f)) return _mm256_set1_epi32(0x4b000000 + 8);
    __m128i o = _mm_loadl_epi64((const __m128i *)(int4_offsets(w, f)
                                                  + (g * wf_ng(f) + jg) * 16 + 8 * hh));
    return _mm256_add_epi32(_mm256_cvtepu8_epi32(o), _mm256_set1_epi32(0x4b000000));
}

/* Nibble n of the even (ev) and odd (od) words of d -> 8 rows' q - z as floats. */
ALWAYS_INLINE void q4_floats(__m256i d, int n, __m256i bias, __m256 *ev, __m256 *od) {
    const __m256i m = _mm256_set1_epi32(15);
    const __m256 c = _mm256_set1_ps(0x1p23f + 16.0f);
    __m256i e = n ? _mm256_and_si256(_mm256_srli_epi32(d, 4 * n), m) : _mm256_and_si256(d, m);
    __m256i o = n == 3 ? _mm256_srli_epi32(d, 28) : _mm256_and_si256(_mm256_srli_epi32(d, 16 + 4 * n), m);
    *ev = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(e, bias)), c);
    *od = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(o, bias)), c);
}

/* The masked decode, for decode's 1..2 tokens (q4_body_masked): nibble n left in
 * place, bits 4n..4n+3 of the even word (of d) and of the odd word (of d >> 16), with
 * the exponent bits 0x4b000000 OR-ed in once a load (D, D16) and kept by the mask, is
 * the float 2^23 + q 16^n; minus the row's 2^23 + z 16^n that is (q - z) 16^n, exact.
 * Against x 16^-n (q4_x_scaled) each product is exactly q4_floats's (q - z) x, so every
 * FMA rounds alike: an AND and a SUB a nibble and word, against q4_floats's four. */
ALWAYS_INLINE void q4_floats_masked(__m256i D, __m256i D16, int n, __m256 sub, __m256 *ev,
                                    __m256 *od) {
    const __m256i m = _mm256_set1_epi32((15 << (4 * n)) | 0x4b000000);
    *ev = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(D, m)), sub);
    *od = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(D16, m)), sub);
}

/* A token's 128 activations for the masked decode: k's float times 16^-n, n =
 * (k % 8) / 2 the nibble k's weight sits in. Exact for every BF16 x, subnormals
 * included (their lowest bit, 2^-133, stays above 2^-149), unless the MXCSR flushes
 * subnormals (the caller checks). */
ALWAYS_INLINE void q4_x_scaled(const uint16_t *x, float *xf) {
    const __m256 s = _mm256_setr_ps(1.0f, 1.0f, 0x1p-4f, 0x1p-4f, 0x1p-8f, 0x1p-8f, 0x1p-12f, 0x1p-12f);
    for (int i = 0; i < UNIT_K; i += 8)
        _mm256_store_ps(xf + i, _mm256_mul_ps(s, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i))), 16))));
}

/* An INT4 unit's codes against nt tokens by the masked decode: stream by stream
 * (row group, group jg, row half; the two halves side by side, each broadcast x
 * serving both), each stream's even and odd chains as q4_streams runs them (chunk by
 * chunk, nibble by nibble), then out += scale * (even + odd), group after group:
 * q4_streams's operations, so its bits. The halves' loads first, then nibble by
 * nibble: fewer live registers, so that the chains stay in them. */
ALWAYS_INLINE void q4_body_masked(const uint8_t *w, int f, const int asym,
                                  const float (*xv)[UNIT_K], const int nt, float *out,
                                  const uint8_t *pf, int pf_fmt) {
    const int lg = (f >> 3) & 3, ng = 1 << lg, gc = CHUNKS >> lg;
    const float *sc = int4_scales(w, f);
    const uint8_t *zp = int4_offsets(w, f);
    int pfi = 0;
    for (int g = 0; g < 4; g++)
        for (int jg = 0; jg < ng; jg++) {
            __m256 ev[2][2], od[2][2], sub[2][4];
#pragma GCC unroll 2
            for (int hh = 0; hh < 2; hh++) {
                __m256 z = _mm256_set1_ps(8.0f);      /* the offsets' bytes hold 16 - z */
                if (asym)
                    z = _mm256_sub_ps(_mm256_set1_ps(16.0f), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                        _mm_loadl_epi64((const __m128i *)(zp + (g * ng + jg) * 16 + 8 * hh)))));
                for (int n = 0; n < 4; n++)
                    sub[hh][n] = _mm256_fmadd_ps(z, _mm256_set1_ps((float)(1 << (4 * n))),
                                                 _mm256_set1_ps(0x1p23f));
                for (int t = 0; t < nt; t++) ev[hh][t] = od[hh][t] = _mm256_setzero_ps();
            }
            for (int c = jg * gc; c < (jg + 1) * gc; c += 2) {
                __m256i D[2], D16[2];
#pragma GCC unroll 2
                for (int hh = 0; hh < 2; hh++) {
                    if (pf && pfi++ % 4 == 0) pf_share(pf, pf_fmt, (pfi - 1) / 4);
                    const __m256i e = _mm256_set1_epi32(0x4b000000), d = _mm256_loadu_si256(
                        (const __m256i *)(w + g * 1024 + (c >> 1) * 64 + 32 * hh));
                    D[hh] = _mm256_or_si256(d, e);
                    D16[hh] = _mm256_or_si256(_mm256_srli_epi32(d, 16), e);
                    __asm__("" : "+x"(D[hh]), "+x"(D16[hh]));   /* kept: gcc would fold the ORs back */
                }
#pragma GCC unroll 4
                for (int n = 0; n < 4; n++)
#pragma GCC unroll 2
                    for (int t = 0; t < nt; t++) {
                        const float *xt = xv[t] + 4 * c + 2 * n;
                        const __m256 xe = _mm256_broadcast_ss(xt), xo = _mm256_broadcast_ss(xt + 1);
#pragma GCC unroll 2
                        for (int hh = 0; hh < 2; hh++) {
                            __m256 fe, fo;
                            q4_floats_masked(D[hh], D16[hh], n, sub[hh][n], &fe, &fo);
                            ev[hh][t] = _mm256_fmadd_ps(fe, xe, ev[hh][t]);
                            od[hh][t] = _mm256_fmadd_ps(fo, xo, od[hh][t]);
                        }
                    }
            }
#pragma GCC unroll 2
            for (int hh = 0; hh < 2; hh++) {
                const __m256 sv = _mm256_loadu_ps(sc + (g * ng + jg) * 16 + 8 * hh);
                for (int t = 0; t < nt; t++) {
                    float *o = out + t * UNIT_ROWS + g * GROUP_ROWS + 8 * hh;
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, _mm256_add_ps(ev[hh][t], od[hh][t]),
                                                        _mm256_loadu_ps(o)));
                }
            }
        }
}

/* NL streams of an INT4 unit (stream s: row group g = s / (2 ng), group jg, row half
 * hh) against nt tokens, side by side so that 2 NL nt FMA chains are in flight: per
 * row and token an even-column and an odd-column chain, chunk by chunk, A half then
 * B half, then out += the row's group scale * (even + odd). Decoded once for every
 * token, one order whatever nt and NL, the widened unit's values the same: the same
 * bits for decode, batches and prefill. *pfi counts pairs for the prefetch. */
ALWAYS_INLINE void q4_streams(const uint8_t *w, int f, const float (*xf)[UNIT_K], const int nt,
                              const int NL, const int wide, int s0, float *out, const uint8_t *pf,
                              int pf_fmt, int *pfi) {
    const int lg = (f >> 3) & 3, ng = 1 << lg, gc = CHUNKS >> lg;
    const float *sc = int4_scales(w, f);
    __m256 ev[4][MAX_NT], od[4][MAX_NT];
    __m256i bias[4];
    int g[4], jg[4], hh[4];
#pragma GCC unroll 4
    for (int l = 0; l < NL; l++) {
        int st = s0 + l;
        g[l] = st >> (1 + lg); jg[l] = (st >> 1) & (ng - 1); hh[l] = st & 1;
        bias[l] = q4_bias(w, f, g[l], jg[l], hh[l]);
        for (int t = 0; t < nt; t++) ev[l][t] = od[l][t] = _mm256_setzero_ps();
    }
    for (int i = 0; i < gc; i += 2) {
#pragma GCC unroll 4
        for (int l = 0; l < NL; l++) {
            if (pf && (*pfi)++ % 4 == 0) pf_share(pf, pf_fmt, (*pfi - 1) / 4);
            const int c = jg[l] * gc + i;
            const __m256i d = wide ? _mm256_setzero_si256() : _mm256_loadu_si256(
                (const __m256i *)(w + g[l] * 1024 + (c >> 1) * 64 + 32 * hh[l]));
#pragma GCC unroll 4
            for (int n = 0; n < 4; n++) {
                const int cc = c + (n >> 1), kb = 2 * (n & 1);
                __m256 fe, fo;
                if (wide) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(
                        w + g[l] * 4096 + cc * 128 + 64 * (n & 1) + 32 * hh[l]));
                    fe = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                    fo = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
                } else {
                    q4_floats(d, n, bias[l], &fe, &fo);
                }
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    const float *xt = xf[t] + 4 * cc + kb;
                    ev[l][t] = _mm256_fmadd_ps(fe, _mm256_broadcast_ss(xt), ev[l][t]);
                    od[l][t] = _mm256_fmadd_ps(fo, _mm256_broadcast_ss(xt + 1), od[l][t]);
                }
            }
        }
    }
    for (int l = 0; l < NL; l++) {
        const float *s = sc + (g[l] * ng + jg[l]) * 16 + 8 * hh[l];
        const __m256 sv = _mm256_loadu_ps(s);
        for (int t = 0; t < nt; t++) {
            float *o = out + t * UNIT_ROWS + g[l] * GROUP_ROWS + 8 * hh[l];
            _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, _mm256_add_ps(ev[l][t], od[l][t]),
                                                _mm256_loadu_ps(o)));
        }
    }
}

/* INT4 (codes, or widened BF16) against 1..4 tokens, two streams at a time (four
 * measured no faster at one token, slower at four); nt and NL constants in each
 * copy, so that the chains stay in registers. Codes against 1..2 tokens take the
 * masked decode (measured slower at 3..4), unless the MXCSR flushes subnormals. */
ALWAYS_INLINE void unit_body_q4(const uint8_t *w, int f, const uint16_t *const *x, const int nt,
                                float *out, const uint8_t *pf, int pf_fmt) {
    if (nt <= 2 && !wf_wide(f) && !(_mm_getcsr() & 0x8040)) {     /* neither FTZ nor DAZ */
        float xv[2][UNIT_K] __attribute__((aligned(32)));
        for (int t = 0; t < nt; t++) q4_x_scaled(x[t], xv[t]);
        if (wf_asym(f)) q4_body_masked(w, f, 1, (const float (*)[UNIT_K])xv, nt, out, pf, pf_fmt);
        else q4_body_masked(w, f, 0, (const float (*)[UNIT_K])xv, nt, out, pf, pf_fmt);
        return;
    }
    float xf[MAX_NT][UNIT_K] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++) x_floats(x[t], xf[t]);
    const int streams = 8 * wf_ng(f);
    int pfi = 0;
#define Q4_STREAMS(NT, NL, WIDE) \
    for (int s0 = 0; s0 < streams; s0 += NL) \
        q4_streams(w, f, xf, NT, NL, WIDE, s0, out, pf, pf_fmt, &pfi)
#define Q4_BODY(WIDE) \
    if (nt == 1) { Q4_STREAMS(1, 2, WIDE); } else if (nt == 2) { Q4_STREAMS(2, 2, WIDE); } \
    else if (nt == 3) { Q4_STREAMS(3, 2, WIDE); } else { Q4_STREAMS(4, 2, WIDE); }
    if (wf_wide(f)) { Q4_BODY(1) } else { Q4_BODY(0) }
#undef Q4_BODY
#undef Q4_STREAMS
}

/* INT4 unit -> its widened unit: the BF16 of q - z (exact: 5-bit integers, the top
 * half of the float) in the BF16 chunk layout, then the group scales. */
static void unit_widen_q4(const uint8_t *w, int f, uint16_t *dst) {
    const int ng = wf_ng(f), gc = CHUNKS / ng;
    for (int g = 0; g < 4; g++)
        for (int jg = 0; jg < ng; jg++)
            for (int hh = 0; hh < 2; hh++) {
                const __m256i bias = q4_bias(w, f, g, jg, hh);
                for (int c = jg * gc; c < (jg + 1) * gc; c += 2) {
                    const __m256i d = _mm256_loadu_si256(
                        (const __m256i *)(w + g * 1024 + (c >> 1) * 64 + 32 * hh));
                    for (int n = 0; n < 4; n++) {
                        __m256 fe, fo;
                        q4_floats(d, n, bias, &fe, &fo);
                        __m256i r = _mm256_or_si256(
                            _mm256_srli_epi32(_mm256_castps_si256(fe), 16),
                            _mm256_and_si256(_mm256_castps_si256(fo), _mm256_set1_epi32((int)0xffff0000u)));
                        _mm256_storeu_si256((__m256i *)(dst + g * 2048 + (c + (n >> 1)) * 64
                                                        + 32 * (n & 1) + 16 * hh), r);
                    }
                }
            }
    memcpy((uint8_t *)dst + BF16_UNIT_BYTES, int4_scales(w, f), 256 * (size_t)ng);
}

/* 32 e4m3 codes -> the high and low bytes of their BF16 (exact): a normal code's
 * magnitude m (7 bits) is BF16 (m << 4) + (120 << 7), whose bytes are (m >> 4) + 0x3c
 * and (m & 15) << 4; zero and subnormal codes (m < 8) by a 16-byte table of their
 * BF16 (from g_fp8_bf16); the sign the top bit of the high byte. NaN codes (m = 0x7f)
 * come out finite: *nan collects them, and such a unit takes the F16C widening. */
ALWAYS_INLINE void fp8_bf16_bytes(__m256i v, __m256i tlo, __m256i thi, __m256i *lo, __m256i *hi,
                                  __m256i *nan) {
    const __m256i mag = _mm256_and_si256(v, _mm256_set1_epi8(0x7f));
    const __m256i sub = _mm256_cmpgt_epi8(_mm256_set1_epi8(8), mag);
    __m256i l = _mm256_and_si256(_mm256_slli_epi16(mag, 4), _mm256_set1_epi8((char)0xf0));
    __m256i h = _mm256_and_si256(_mm256_srli_epi16(mag, 4), _mm256_set1_epi8(0x0f));
    h = _mm256_add_epi8(h, _mm256_set1_epi8(0x3c));
    l = _mm256_blendv_epi8(l, _mm256_shuffle_epi8(tlo, mag), sub);
    h = _mm256_blendv_epi8(h, _mm256_shuffle_epi8(thi, mag), sub);
    *hi = _mm256_or_si256(h, _mm256_and_si256(v, _mm256_set1_epi8((char)0x80)));
    *lo = l;
    *nan = _mm256_or_si256(*nan, _mm256_cmpeq_epi8(mag, _mm256_set1_epi8(0x7f)));
}

/* FP8 unit -> BF16 unit by bytes (fp8_bf16_bytes): a 32-code load is chunk lanes j,
 * j + 1; the byte unpacks of (low, high) are their A words 8j..8j+15 and B words.
 * 0: the unit holds a NaN code (dst partly written; the caller widens it again). */
static int unit_widen_fp8_bytes(const uint8_t *w, uint16_t *dst) {
    uint8_t tl[16] = {0}, th[16] = {0};
    for (int i = 0; i < 8; i++) { tl[i] = g_fp8_bf16[i] & 0xff; th[i] = g_fp8_bf16[i] >> 8; }
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tl));
    const __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)th));
    __m256i nan = _mm256_setzero_si256();
    for (int i = 0; i < FP8_UNIT_BYTES / 32; i++) {
        __m256i lo, hi;
        fp8_bf16_bytes(_mm256_loadu_si256((const __m256i *)(w + 32 * i)), tlo, thi, &lo, &hi,
                       &nan);
        uint16_t *A = dst + (i >> 1) * 64 + 16 * (i & 1);        /* chunk i / 2 */
        _mm256_storeu_si256((__m256i *)A, _mm256_unpacklo_epi8(lo, hi));
        _mm256_storeu_si256((__m256i *)(A + 32), _mm256_unpackhi_epi8(lo, hi));
    }
    return _mm256_testz_si256(nan, nan);
}

/* FP8 unit -> BF16 unit in the BF16 chunk layout, by bytes, or through F16C where
 * it holds a NaN code (prefill: widen once, reuse for every token; the FP8 body converts per token and ran
 * prefill ~3x slower). In FP8 chunk lane j, bytes 0..7 are A words 8j..8j+7
 * and bytes 8..15 the B words. INT4 -> its widened unit (unit_widen_fmt). */
static void unit_widen(const uint8_t *w, int f, uint16_t *dst) {
    if (wf_int4(f)) { unit_widen_q4(w, f, dst); return; }
    if (unit_widen_fp8_bytes(w, dst)) return;
    /* 16 codes at a time through load16_fp8 (value * 2^-8 as floats), times 2^8
     * (exact), the BF16 the top half (exact: <= 4 significant bits); NaN codes
     * take the table's BF16 NaN (0x7fc0 with the code's sign) */
    const __m256 up = _mm256_set1_ps(0x1p8f);
    for (int g = 0; g < 4; g++)
        for (int c = 0; c < CHUNKS; c++) {
            const uint8_t *src = w + g * 2048 + c * 64;
            uint16_t *A = dst + g * 2048 + c * 64, *B = A + 32;
            for (int j = 0; j < 4; j++) {
                __m256 a, b;
                __m256i v = load16_codes(src + 16 * j), h = fp16_of_fp8(v);
                fp16_to_floats(h, &a, &b);
                __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(_mm256_mul_ps(a, up)), 16);
                __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(_mm256_mul_ps(b, up)), 16);
                /* packus interleaves the 128-bit lanes: put A's 8 words before B's */
                __m256i r = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
                __m256i nan = _mm256_cmpeq_epi16(h, _mm256_set1_epi16(-1));
                __m256i qnan = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(v, 8),
                                                                _mm256_set1_epi16((short)0x8000)),
                                               _mm256_set1_epi16(0x7fc0));
                r = _mm256_blendv_epi8(r, qnan, nan);
                _mm_storeu_si128((__m128i *)(A + 8 * j), _mm256_castsi256_si128(r));
                _mm_storeu_si128((__m128i *)(B + 8 * j), _mm256_extracti128_si256(r, 1));
            }
        }
}

/* o[r] += scale * (even + odd partial sums of row r) for the 16 rows of a row group:
 * acc[j] lanes (2i, 2i + 1) = row 4j + i's (even k, odd k) sums. */
ALWAYS_INLINE void store_pairs(const __m256 *acc, float scale, float *o) {
    for (int j = 0; j < 4; j++) {
        float a[8];
        _mm256_storeu_ps(a, acc[j]);
        for (int i = 0; i < 4; i++) o[4 * j + i] += scale * (a[2 * i] + a[2 * i + 1]);
    }
}

/* Chunk c's A and B words of 8 rows (a word: a row's even- or odd-k weight as the
 * top half of a float) against nt tokens: the dword unpacks put each row's (even,
 * odd) weights side by side against broadcast x pairs; acc[t][i] lanes 0..3 are
 * rows 2i + (0, 1), lanes 4..7 the same + 4, each an (even, odd) pair. */
ALWAYS_INLINE void pair_fmas(__m256i va, __m256i vb, const float (*xf)[UNIT_K], int c, const int nt,
                             __m256 (*acc)[2]) {
    const __m256i z = _mm256_setzero_si256();
    const __m256 a0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, va));
    const __m256 a1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, va));
    const __m256 b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, vb));
    const __m256 b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, vb));
    for (int t = 0; t < nt; t++) {
        const double *xp = (const double *)(xf[t] + 4 * c);
        const __m256 xa = _mm256_castpd_ps(_mm256_broadcast_sd(xp));
        const __m256 xb = _mm256_castpd_ps(_mm256_broadcast_sd(xp + 1));
        acc[t][0] = _mm256_fmadd_ps(a0, xa, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(a1, xa, acc[t][1]);
        acc[t][0] = _mm256_fmadd_ps(b0, xb, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(b1, xb, acc[t][1]);
    }
}

/* BF16 units against 2 tokens: per chunk both row halves' even and odd weights
 * (A, then B) in registers, so that each broadcast x feeds two chains and 8 chains
 * are in flight (x1.5 over one half at a time, which waits on 4). */
ALWAYS_INLINE void unit_body_bf16_nt2(const uint8_t *w, const uint16_t *const *x, float scale,
                                      float *out, const uint8_t *pf, int pf_fmt) {
    float xf[2][UNIT_K] __attribute__((aligned(32)));
    for (int t = 0; t < 2; t++) x_floats(x[t], xf[t]);
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int g = 0; g < 4; g++) {
        __m256 ev[2][2], od[2][2];          /* [token][row half] */
        for (int t = 0; t < 2; t++) ev[t][0] = ev[t][1] = od[t][0] = od[t][1] = _mm256_setzero_ps();
        for (int c = 0; c < CHUNKS; c++) {
            if (pf && c % 4 == 0) pf_share(pf, pf_fmt, g * 8 + c / 4);
            const uint8_t *pa = w + g * 4096 + c * 128;
            for (int ab = 0; ab < 2; ab++) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(pa + 64 * ab));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(pa + 64 * ab + 32));
                const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
                const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi));
                const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
                const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi));
                for (int t = 0; t < 2; t++) {
                    const float *xt = xf[t] + 4 * c + 2 * ab;
                    const __m256 xe = _mm256_broadcast_ss(xt), xo = _mm256_broadcast_ss(xt + 1);
                    ev[t][0] = _mm256_fmadd_ps(e0, xe, ev[t][0]);
                    ev[t][1] = _mm256_fmadd_ps(e1, xe, ev[t][1]);
                    od[t][0] = _mm256_fmadd_ps(o0, xo, od[t][0]);
                    od[t][1] = _mm256_fmadd_ps(o1, xo, od[t][1]);
                }
            }
        }
        for (int t = 0; t < 2; t++)
            for (int h = 0; h < 2; h++) {
                float e[8], d[8];
                _mm256_storeu_ps(e, ev[t][h]);
                _mm256_storeu_ps(d, od[t][h]);
                float *o = out + t * UNIT_ROWS + g * GROUP_ROWS + 8 * h;
                for (int i = 0; i < 8; i++) o[i] += scale * (e[i] + d[i]);
            }
    }
}

/* o[r] += scale * (even + odd) for a row half's 8 rows r from pair_fmas's two
 * accumulators (acc[i] lanes 0..3: rows 2i + (0, 1), lanes 4..7 the same + 4). */
ALWAYS_INLINE void pair_sums_add(const __m256 *acc, float scale, float *o) {
    for (int i = 0; i < 2; i++) {
        float a[8];
        _mm256_storeu_ps(a, acc[i]);
        float *r = o + 2 * i;
        r[0] += scale * (a[0] + a[1]); r[1] += scale * (a[2] + a[3]);
        r[4] += scale * (a[4] + a[5]); r[5] += scale * (a[6] + a[7]);
    }
}

/* BF16 units against 3..4 tokens, one row half (8 rows) at a time through
 * pair_fmas, so that a token's two loads of x serve 4 chains (x1.05 at 3, x1.14 at
 * 4 over a broadcast x per chain). */
ALWAYS_INLINE void unit_body_bf16_nt(const uint8_t *w, const uint16_t *const *x, const int nt,
                                     float scale, float *out, const uint8_t *pf, int pf_fmt) {
    float xf[MAX_NT][UNIT_K] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++) x_floats(x[t], xf[t]);
    for (int g = 0; g < 4; g++)
        for (int h = 0; h < 2; h++) {
            __m256 acc[MAX_NT][2];
            for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            for (int c = 0; c < CHUNKS; c++) {
                if (pf && h == 0 && c % 4 == 0) pf_share(pf, pf_fmt, g * 8 + c / 4);
                const uint8_t *pa = w + g * 4096 + c * 128 + 32 * h;
                pair_fmas(_mm256_loadu_si256((const __m256i *)pa),
                          _mm256_loadu_si256((const __m256i *)(pa + 64)), xf, c, nt, acc);
            }
            for (int t = 0; t < nt; t++)
                pair_sums_add(acc[t], scale, out + t * UNIT_ROWS + g * GROUP_ROWS + 8 * h);
        }
}

/* Widened units (BF16, or INT4 widened: the BF16 of q - z, then its group scales)
 * against WIDE_NT tokens at once (prefill): one row half (8 rows) a pass, chunk by
 * chunk A words for every token, then B words (pair_fmas's chains: lanes are a row's
 * (even-k, odd-k) pair, each chain k ascending), so that 2 nt chains of 2 dependent
 * FMAs a chunk are in flight (4 tokens: 8 chains, just the FMA latency; 5: 10, the
 * most whose chains, weights and x stay in 16 registers). INT4 restarts the chains per group of columns and adds
 * scale * (even + odd) with q4_streams's FMA; BF16 adds unit_body_bf16_nt's scalar
 * sums. The same chains, order and epilogues as those bodies: the same bits. */
#define WIDE_NT 5
ALWAYS_INLINE void wide_rows(const uint8_t *w, int f, const int q4, const int ng,
                             const uint16_t *const *x, const int nt, float scale, float *out,
                             const uint8_t *pf, int pf_fmt) {
    float xf[WIDE_NT][UNIT_K] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++) x_floats(x[t], xf[t]);
    const int gc = CHUNKS / ng;
    const __m256i z = _mm256_setzero_si256();
    for (int g = 0; g < 4; g++)
        for (int h = 0; h < 2; h++)
            for (int jg = 0; jg < ng; jg++) {
                __m256 acc[WIDE_NT][2];
                for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
                for (int c = jg * gc; c < (jg + 1) * gc; c++) {
                    if (pf && h == 0 && c % 4 == 0) pf_share(pf, pf_fmt, g * 8 + c / 4);
                    const uint8_t *pa = w + g * 4096 + c * 128 + 32 * h;
                    for (int ab = 0; ab < 2; ab++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(pa + 64 * ab));
                        const __m256 v0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
                        const __m256 v1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
                        for (int t = 0; t < nt; t++) {
                            const __m256 xp = _mm256_castpd_ps(_mm256_broadcast_sd(
                                (const double *)(xf[t] + 4 * c + 2 * ab)));
                            acc[t][0] = _mm256_fmadd_ps(v0, xp, acc[t][0]);
                            acc[t][1] = _mm256_fmadd_ps(v1, xp, acc[t][1]);
                        }
                    }
                }
                if (q4) {
                    const float *sc = int4_scales(w, f) + (g * ng + jg) * 16 + 8 * h;
                    const __m256 sv = _mm256_loadu_ps(sc);
                    for (int t = 0; t < nt; t++) {
                        /* hadd: lanes rows 0..3 | 4..7, each even + odd */
                        const __m256 sum = _mm256_hadd_ps(acc[t][0], acc[t][1]);
                        float *o = out + t * UNIT_ROWS + g * GROUP_ROWS + 8 * h;
                        _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, sum, _mm256_loadu_ps(o)));
                    }
                } else {
                    for (int t = 0; t < nt; t++)
                        pair_sums_add(acc[t], scale, out + t * UNIT_ROWS + g * GROUP_ROWS + 8 * h);
                }
            }
}

/* q4, ng and nt constants in each copy (the chains stay in registers). */
ALWAYS_INLINE void unit_body_wide(const uint8_t *w, int f, const uint16_t *const *x, const int nt,
                                  float scale, float *out, const uint8_t *pf, int pf_fmt) {
    if (!wf_int4(f)) wide_rows(w, f, 0, 1, x, nt, scale, out, pf, pf_fmt);
    else if (wf_ng(f) == 4) wide_rows(w, f, 1, 4, x, nt, scale, out, pf, pf_fmt);
    else if (wf_ng(f) == 1) wide_rows(w, f, 1, 1, x, nt, scale, out, pf, pf_fmt);
    else if (wf_ng(f) == 2) wide_rows(w, f, 1, 2, x, nt, scale, out, pf, pf_fmt);
    else wide_rows(w, f, 1, 8, x, nt, scale, out, pf, pf_fmt);
}

/* Tokens the next pass of unit_body_wide_any takes of `rem` (groups of 4-5: 5 runs
 * at 4.7, 4 at 4.5, 3 at 3.6 FMA/ns, one core, the unit in L1; 6 spills). */
static inline int wide_take(int rem) {
    return rem >= 9 || rem == 5 ? 5 : rem >= 4 ? 4 : rem;
}
static inline int wide_rows_fmt(int f) { return f == WF_BF16 || (wf_int4(f) && wf_wide(f)); }

/* FP8 units against 2..4 tokens: lane j's 16 codes of a chunk are decoded once
 * (load32_fp8, two lanes a load) for every token, lane pair outermost, each token its own chain; the chains
 * and their order are the one-token body's, so the same bits. */
ALWAYS_INLINE void unit_body_fp8_nt(const uint8_t *w, const uint16_t *const *x, const int nt,
                                    float scale, float *out, const uint8_t *pf, int pf_fmt) {
    float xf[MAX_NT][UNIT_K] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++) x_floats(x[t], xf[t]);
    for (int g = 0; g < 4; g++) {
        __m256 acc[MAX_NT][4];
        for (int j = 0; j < 4; j += 2) {
            for (int t = 0; t < nt; t++) acc[t][j] = acc[t][j + 1] = _mm256_setzero_ps();
            for (int c = 0; c < CHUNKS; c++) {
                if (pf && j == 0 && c % 4 == 0) pf_share(pf, pf_fmt, g * 8 + c / 4);
                __m256 fa[2], fb[2];
                load32_fp8(w + g * 2048 + c * 64 + 16 * j, fa, fb);
                for (int t = 0; t < nt; t++) {
                    const double *xp = (const double *)(xf[t] + 4 * c);
                    const __m256 xa = _mm256_castpd_ps(_mm256_broadcast_sd(xp));
                    const __m256 xb = _mm256_castpd_ps(_mm256_broadcast_sd(xp + 1));
                    for (int i = 0; i < 2; i++) {
                        acc[t][j + i] = _mm256_fmadd_ps(fa[i], xa, acc[t][j + i]);
                        acc[t][j + i] = _mm256_fmadd_ps(fb[i], xb, acc[t][j + i]);
                    }
                }
            }
        }
        for (int t = 0; t < nt; t++)
            store_pairs(acc[t], scale * 0x1p8f, out + t * UNIT_ROWS + g * GROUP_ROWS);
    }
}

/* FP8 decode without F16C (Zen 3 widens 8 FP16 a cycle at best, the F16C bodies'
 * bound). A code's sign and magnitude shifted to the top of a float (the exponent
 * field e: bias 127 against e4m3's 7) are exactly its value * 2^-120, subnormal
 * codes included (float subnormals are exact); with x times 2^112 (exact for
 * |x| < 2^16) each product is value * x * 2^-8, load32_fp8's very product, so the
 * chains, their order and their bits are the F16C bodies'. Taken unless some
 * |x| >= 2^16 (or is not finite), the MXCSR flushes subnormal inputs (DAZ), or the
 * unit holds a NaN code (0x7f / 0xff: the shift makes them finite; the check rides
 * on the loads and such a unit is left to the F16C body, which the caller runs on a
 * 0 return, nothing written). */
ALWAYS_INLINE int x_floats_up(const uint16_t *x, float *xf) {
    __m128i big = _mm_setzero_si128();
    for (int i = 0; i < UNIT_K; i += 8) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(x + i));
        big = _mm_or_si128(big, _mm_cmpgt_epi16(_mm_and_si128(v, _mm_set1_epi16(0x7fff)),
                                                _mm_set1_epi16(0x477f)));   /* BF16 2^16 - */
        _mm256_storeu_ps(xf + i, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(v), 16)), _mm256_set1_ps(0x1p112f)));
    }
    return _mm_testz_si128(big, big);
}

/* The codes of v (16 per 128-bit lane, in the high bytes of words after the unpacks)
 * -> words whose top half as a float is value * 2^-120 (the sign copies in bits
 * 14..11 still to be masked); *nan: the bytewise min of ~code & 0x7f (0 for a NaN). */
ALWAYS_INLINE void fp8_shift_words(__m256i v, __m256i *lo, __m256i *hi, __m256i *nan) {
    const __m256i z = _mm256_setzero_si256();
    *nan = _mm256_min_epu8(*nan, _mm256_andnot_si256(v, _mm256_set1_epi8(0x7f)));
    *lo = _mm256_srai_epi16(_mm256_unpacklo_epi8(z, v), 4);
    *hi = _mm256_srai_epi16(_mm256_unpackhi_epi8(z, v), 4);
}

ALWAYS_INLINE int fp8_has_nan(__m256i nan) {
    return _mm256_movemask_epi8(_mm256_cmpeq_epi8(nan, _mm256_setzero_si256())) != 0;
}

/* out[t] += scale 2^8 res[t] (load32_fp8's 2^-8 undone) */
ALWAYS_INLINE void fp8_shift_store(const float (*res)[UNIT_ROWS], int nt, float scale, float *out) {
    scale *= 0x1p8f;
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < UNIT_ROWS; r++) out[t * UNIT_ROWS + r] += scale * res[t][r];
}

/* One token: 32 codes (chunk lanes j, j + 1) a load; each word of the unpacked codes
 * holds a row's even-k (low half) and odd-k (high half) weight, so rows 4j..4j+7 are
 * the 8 lanes of an even and an odd chain against broadcast x, as in the BF16 body. */
ALWAYS_INLINE int unit_body_fp8_shift1(const uint8_t *w, const uint16_t *x, float scale, float *out,
                                       const uint8_t *pf, int pf_fmt) {
    float xf[UNIT_K] __attribute__((aligned(32)));
    float res[1][UNIT_ROWS] __attribute__((aligned(32)));
    if (!x_floats_up(x, xf)) return 0;
    const __m256i m = _mm256_set1_epi32((int)0x87f00000u);
    __m256i nan = _mm256_set1_epi8(0x7f);
    for (int g = 0; g < 4; g++) {
        __m256 ev[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 od[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int c = 0; c < CHUNKS; c++) {
            if (pf && c % 4 == 0) pf_share(pf, pf_fmt, g * 8 + c / 4);
            const float *xt = xf + 4 * c;
            for (int h = 0; h < 2; h++) {
                __m256i a, b;
                fp8_shift_words(_mm256_loadu_si256((const __m256i *)(w + g * 2048 + c * 64 + 32 * h)),
                                &a, &b, &nan);
                ev[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(a, 16), m)),
                                        _mm256_broadcast_ss(xt), ev[h]);
                od[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, m)),
                                        _mm256_broadcast_ss(xt + 1), od[h]);
                ev[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 16), m)),
                                        _mm256_broadcast_ss(xt + 2), ev[h]);
                od[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(b, m)),
                                        _mm256_broadcast_ss(xt + 3), od[h]);
            }
        }
        for (int h = 0; h < 2; h++) _mm256_store_ps(res[0] + g * GROUP_ROWS + 8 * h, _mm256_add_ps(ev[h], od[h]));
    }
    if (fp8_has_nan(nan)) return 0;
    fp8_shift_store(res, 1, scale, out);
    return 1;
}

/* 2..4 tokens: each 32-code load decoded once for every token, lane pair j outermost
 * (rows 8(j/2)..+7), the A and B words through pair_fmas (load32_fp8's order). */
ALWAYS_INLINE int unit_body_fp8_shift_nt(const uint8_t *w, const uint16_t *const *x, const int nt,
                                         float scale, float *out, const uint8_t *pf, int pf_fmt) {
    float xf[MAX_NT][UNIT_K] __attribute__((aligned(32)));
    float res[MAX_NT][UNIT_ROWS] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++)
        if (!x_floats_up(x[t], xf[t])) return 0;
    const __m256i m = _mm256_set1_epi16((short)0x87f0);
    __m256i nan = _mm256_set1_epi8(0x7f);
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < 4; j += 2) {
            __m256 acc[MAX_NT][2];
            for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
            for (int c = 0; c < CHUNKS; c++) {
                if (pf && j == 0 && c % 4 == 0) pf_share(pf, pf_fmt, g * 8 + c / 4);
                __m256i a, b;
                fp8_shift_words(_mm256_loadu_si256((const __m256i *)(w + g * 2048 + c * 64 + 16 * j)),
                                &a, &b, &nan);
                pair_fmas(_mm256_and_si256(a, m), _mm256_and_si256(b, m), xf, c, nt, acc);
            }
            for (int t = 0; t < nt; t++)
                for (int i = 0; i < 2; i++) {
                    float a[8];
                    _mm256_storeu_ps(a, acc[t][i]);
                    float *r = res[t] + g * GROUP_ROWS + 8 * (j / 2) + 2 * i;
                    r[0] = a[0] + a[1]; r[1] = a[2] + a[3];
                    r[4] = a[4] + a[5]; r[5] = a[6] + a[7];
                }
        }
    if (fp8_has_nan(nan)) return 0;
    fp8_shift_store(res, nt, scale, out);
    return 1;
}

/* The shift bodies, a copy per token count; 0: not taken (see above), nothing written. */
ALWAYS_INLINE int unit_body_fp8_shift(const uint8_t *w, const uint16_t *const *x, const int nt,
                                      float scale, float *out, const uint8_t *pf, int pf_fmt) {
    if (_mm_getcsr() & 0x40) return 0;      /* DAZ */
    if (nt == 1) return unit_body_fp8_shift1(w, x[0], scale, out, pf, pf_fmt);
    if (nt == 2) return unit_body_fp8_shift_nt(w, x, 2, scale, out, pf, pf_fmt);
    if (nt == 3) return unit_body_fp8_shift_nt(w, x, 3, scale, out, pf, pf_fmt);
    return unit_body_fp8_shift_nt(w, x, 4, scale, out, pf, pf_fmt);
}

/* pf: see the AVX-512 unit_body_pf; fetched during the first token's pass.
 *
 * Every body keeps one order per row: an even-k and an odd-k FP32 FMA chain, k
 * ascending, added at the end (so FP8 units, their BF16 widening and the BF16 units
 * give the same bits). FP8 (decode): the shift bodies above, else (NaN codes, huge
 * x, DAZ) 32 codes a load through load32_fp8, x as broadcast (even, odd) pairs. BF16: a 32-byte load holds 8 rows x (k, k + 1); the
 * even words shifted up and the odd words masked are the two chains' weights, each
 * against its own broadcast x, so no pair of x is built and no word widened alone. */
ALWAYS_INLINE void unit_body_pf(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                                float scale, float *out, const uint8_t *pf, int pf_fp8) {
    if (wf_int4(fp8)) { unit_body_q4(w, fp8, x, nt, out, pf, pf_fp8); return; }
    /* 2..4 tokens: a copy per count, so that the per-token chains stay in registers */
    if (nt > 1 && !fp8) {
        if (nt == 2) unit_body_bf16_nt2(w, x, scale, out, pf, pf_fp8);
        else if (nt == 3) unit_body_bf16_nt(w, x, 3, scale, out, pf, pf_fp8);
        else unit_body_bf16_nt(w, x, 4, scale, out, pf, pf_fp8);
        return;
    }
    if (fp8 && unit_body_fp8_shift(w, x, nt, scale, out, pf, pf_fp8)) return;
    if (nt > 1) {
        if (nt == 2) unit_body_fp8_nt(w, x, 2, scale, out, pf, pf_fp8);
        else if (nt == 3) unit_body_fp8_nt(w, x, 3, scale, out, pf, pf_fp8);
        else unit_body_fp8_nt(w, x, 4, scale, out, pf, pf_fp8);
        return;
    }
    float xf[UNIT_K] __attribute__((aligned(32)));
    for (int t = 0; t < nt; t++) {
        x_floats(x[t], xf);
        for (int g = 0; g < 4; g++) {
            float *o = out + t * UNIT_ROWS + g * GROUP_ROWS;
            if (fp8) {
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(),
                                 _mm256_setzero_ps(), _mm256_setzero_ps()};
                for (int c = 0; c < CHUNKS; c++) {
                    if (pf && t == 0 && c % 4 == 0) pf_share(pf, pf_fp8, g * 8 + c / 4);
                    __m256 xa = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(xf + 4 * c)));
                    __m256 xb = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(xf + 4 * c + 2)));
                    for (int j = 0; j < 4; j += 2) {
                        __m256 fa[2], fb[2];
                        load32_fp8(w + g * 2048 + c * 64 + 16 * j, fa, fb);
                        for (int i = 0; i < 2; i++) {
                            acc[j + i] = _mm256_fmadd_ps(fa[i], xa, acc[j + i]);
                            acc[j + i] = _mm256_fmadd_ps(fb[i], xb, acc[j + i]);
                        }
                    }
                }
                store_pairs(acc, scale * 0x1p8f, o);
            } else {
                /* ev[h], od[h]: rows 8h..8h+7, the even-k and odd-k chains */
                __m256 ev[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                __m256 od[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
                for (int c = 0; c < CHUNKS; c++) {
                    if (pf && t == 0 && c % 4 == 0) pf_share(pf, pf_fp8, g * 8 + c / 4);
                    const __m256 x0 = _mm256_broadcast_ss(xf + 4 * c), x1 = _mm256_broadcast_ss(xf + 4 * c + 1);
                    const __m256 x2 = _mm256_broadcast_ss(xf + 4 * c + 2), x3 = _mm256_broadcast_ss(xf + 4 * c + 3);
                    const uint8_t *pa = w + g * 4096 + c * 128;
                    for (int h = 0; h < 2; h++) {
                        __m256i va = _mm256_loadu_si256((const __m256i *)(pa + 32 * h));
                        __m256i vb = _mm256_loadu_si256((const __m256i *)(pa + 64 + 32 * h));
                        ev[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(va, 16)), x0, ev[h]);
                        od[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(va, hi)), x1, od[h]);
                        ev[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(vb, 16)), x2, ev[h]);
                        od[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(vb, hi)), x3, od[h]);
                    }
                }
                for (int h = 0; h < 2; h++) {
                    float e[8], d[8];
                    _mm256_storeu_ps(e, ev[h]);
                    _mm256_storeu_ps(d, od[h]);
                    for (int i = 0; i < 8; i++) o[8 * h + i] += scale * (e[i] + d[i]);
                }
            }
        }
    }
}

ALWAYS_INLINE void unit_body(const uint8_t *w, int fp8, const uint16_t *const *x, const int nt,
                             float scale, float *out) {
    unit_body_pf(w, fp8, x, nt, scale, out, NULL, fp8);
}

/* A BF16 or widened INT4 unit against 1..WIDE_NT tokens; BF16 at 1 or 2 tokens through
 * unit_body_pf's bodies (the 2-token one holds both row halves: faster there). */
static void unit_body_wide_any(const uint8_t *w, int f, const uint16_t *const *x, int nt,
                               float scale, float *out, const uint8_t *pf, int pf_fmt) {
    switch (nt) {
    case 1: if (f == WF_BF16) unit_body_pf(w, 0, x, 1, scale, out, pf, pf_fmt);
            else unit_body_wide(w, f, x, 1, scale, out, pf, pf_fmt);
            break;
    case 2: if (f == WF_BF16) unit_body_pf(w, 0, x, 2, scale, out, pf, pf_fmt);
            else unit_body_wide(w, f, x, 2, scale, out, pf, pf_fmt);
            break;
    case 3: unit_body_wide(w, f, x, 3, scale, out, pf, pf_fmt); break;
    case 4: unit_body_wide(w, f, x, 4, scale, out, pf, pf_fmt); break;
    default: unit_body_wide(w, f, x, 5, scale, out, pf, pf_fmt); break;
    }
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
