/* Machine probes for tools/bench_experts.py, compiled per instruction set:
 * the read bandwidth a plain streaming loop gets from DRAM, and the peak
 * dot-product rate of a register-only loop. The expert kernels' figures are
 * reported as fractions of these, measured in the same run.
 */
#include <stdint.h>
#include "thread_pool.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *buf;
    int64_t bytes;
    int64_t iters;
    int prefetch;               /* read loop: 1 also prefetch PROBE_PF bytes ahead into L1,
                                   2 PROBE_PF2 bytes ahead into L2 (the kernels' way) */
    double sink[POOL_MAX_THREADS];
} probe_job;

/* The expert kernels prefetch ahead in software; the machine's read bandwidth
 * is the best of the plain loop and the same loop with a software prefetch
 * (into L1 from nearby, or into L2 from as far ahead as the kernels),
 * so a kernel's fraction of it is never flattered by a weak baseline. */
#define PROBE_PF 16384
#define PROBE_PF2 65536

/* Each thread streams its contiguous share; 4 independent adds hide latency. */
static void read_worker(void *arg, int tid, int n) {
    probe_job *j = (probe_job *)arg;
    int64_t share = (j->bytes / n) & ~(int64_t)255;
    const uint8_t *p = j->buf + tid * share, *end = p + share;
    const int pf = j->prefetch;
#if defined(__AVX512F__)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (; p < end; p += 256) {
        if (pf == 1)
            for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)p + PROBE_PF + l, _MM_HINT_T0);
        else if (pf == 2)
            for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)p + PROBE_PF2 + l, _MM_HINT_T1);
        a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)p));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(p + 64)));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(p + 128)));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(p + 192)));
    }
    a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
    j->sink[tid] = (double)_mm512_reduce_add_epi64(a0);
#elif defined(__AVX2__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (; p < end; p += 128) {
        if (pf == 1) {
            _mm_prefetch((const char *)p + PROBE_PF, _MM_HINT_T0);
            _mm_prefetch((const char *)p + PROBE_PF + 64, _MM_HINT_T0);
        } else if (pf == 2) {
            _mm_prefetch((const char *)p + PROBE_PF2, _MM_HINT_T1);
            _mm_prefetch((const char *)p + PROBE_PF2 + 64, _MM_HINT_T1);
        }
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)p));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + 96)));
    }
    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    int64_t t[4];
    _mm256_storeu_si256((__m256i *)t, a0);
    j->sink[tid] = (double)(t[0] + t[1] + t[2] + t[3]);
#else
    (void)pf;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (; p < end; p += 32) {
        const uint64_t *q = (const uint64_t *)p;
        s0 += q[0]; s1 += q[1]; s2 += q[2]; s3 += q[3];
    }
    j->sink[tid] = (double)(s0 + s1 + s2 + s3);
#endif
}

/* Register-only multiply-accumulate: 12 independent chains cover the
 * latency x throughput of the dot-product unit. Flops per instruction:
 * vdpbf16ps 64 (16 lanes x 2 products x 2), vfmadd ymm 16, scalar 2. */
static void peak_worker(void *arg, int tid, int n) {
    (void)n;
    probe_job *j = (probe_job *)arg;
#if defined(__AVX512BF16__)
    __m512 c[12];
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
    for (int i = 0; i < 12; i++) c[i] = _mm512_set1_ps((float)i);
    for (int64_t it = 0; it < j->iters; it++) {
        for (int i = 0; i < 12; i++) c[i] = _mm512_dpbf16_ps(c[i], a, b);
        __asm__ volatile("" : "+v"(a), "+v"(b));
    }
    __m512 s = c[0];
    for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, c[i]);
    j->sink[tid] = _mm512_reduce_add_ps(s);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 c[12];
    __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < 12; i++) c[i] = _mm256_set1_ps((float)i);
    for (int64_t it = 0; it < j->iters; it++) {
        for (int i = 0; i < 12; i++) c[i] = _mm256_fmadd_ps(a, b, c[i]);
        __asm__ volatile("" : "+x"(a), "+x"(b));
    }
    float t[8];
    _mm256_storeu_ps(t, c[0]);
    j->sink[tid] = t[0];
#else
    float c[12], a = 1.0f, b = 1e-7f;
    for (int i = 0; i < 12; i++) c[i] = (float)i;
    for (int64_t it = 0; it < j->iters; it++) {
        for (int i = 0; i < 12; i++) c[i] += a * b;
#if defined(__x86_64__)
        __asm__ volatile("" : "+x"(a), "+x"(b));
#endif
    }
    j->sink[tid] = c[0] + c[11];
#endif
}

static double probe_flops_per_iter(void) {
#if defined(__AVX512BF16__)
    return 12.0 * 64;
#elif defined(__AVX2__) && defined(__FMA__)
    return 12.0 * 16;
#else
    return 12.0 * 2;
#endif
}

/* Seconds to stream `bytes` once with n threads: the fastest of the plain
 * loop and the two prefetching loops. */
static double probe_read(const uint8_t *buf, int64_t bytes, int n) {
    double best = 1e30;
    for (int pf = 0; pf < 3; pf++) {
        probe_job j = {.buf = buf, .bytes = bytes, .prefetch = pf};
        int64_t t0 = now_ns();
        pool_run(read_worker, &j, n);
        double s = (now_ns() - t0) * 1e-9;
        if (s < best) best = s;
    }
    return best;
}

/* Flop/s of the register-only loop on n threads. */
static double probe_peak(int64_t iters, int n) {
    probe_job j = {.iters = iters};
    int64_t t0 = now_ns();
    pool_run(peak_worker, &j, n);
    double s = (now_ns() - t0) * 1e-9;
    return probe_flops_per_iter() * (double)iters * n / s;
}
