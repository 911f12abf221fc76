/* CPU feature guard.
 *
 * Tells which instruction sets the CPU *and* the OS support, so that the
 * kernel extension for that set can be imported without risking SIGILL.
 * Compiled without any -m flags: this file must run on every x86-64 CPU
 * (and compile to "nothing supported" elsewhere).
 */
#ifndef MOED_CPU_FEATURES_H
#define MOED_CPU_FEATURES_H

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <stdint.h>

static inline uint64_t moed_xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

/* OS saves the YMM state (XCR0 bits 1, 2). */
static inline int moed_os_avx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 27))) return 0;          /* OSXSAVE */
    return (moed_xgetbv0() & 0x6) == 0x6;
}

/* OS saves the ZMM and opmask state too (XCR0 bits 5, 6, 7). */
static inline int moed_os_avx512(void) {
    return moed_os_avx() && (moed_xgetbv0() & 0xe0) == 0xe0;
}

static inline int moed_cpu_avx2_fma(void) {
    unsigned a, b, c, d;
    if (!moed_os_avx()) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 12))) return 0; /* FMA */
    if (!(c & (1u << 29))) return 0;                                    /* F16C */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & (1u << 5)) != 0;                                        /* AVX2 */
}

/* AVX-512 F + BW + VL + VBMI: the FP8 kernel needs vpermt2b-class byte
 * shuffles (VBMI). Enough for the avx512emu build (BF16 dots emulated). */
static inline int moed_cpu_avx512_vbmi(void) {
    unsigned a, b, c, d;
    if (!moed_os_avx512()) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    int vbmi = (c >> 1) & 1;
    return f && bw && vl && vbmi;
}

/* ... + AVX512_BF16 (vdpbf16ps): the avx512 build. */
static inline int moed_cpu_avx512_bf16(void) {
    unsigned a, b, c, d;
    if (!moed_cpu_avx512_vbmi()) return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1;                                                /* AVX512_BF16 */
}
#else
static inline int moed_cpu_avx2_fma(void) { return 0; }
static inline int moed_cpu_avx512_vbmi(void) { return 0; }
static inline int moed_cpu_avx512_bf16(void) { return 0; }
#endif

#endif
