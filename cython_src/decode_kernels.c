/* Decode attention straight out of the paged KV cache, and the cache store.
 *
 * One new token per sequence attends to its whole context; the keys and
 * values are read in place through the sequence's slot table (no gathered
 * copy of the context), once per (sequence, kv head) for all the query heads
 * that share them.
 *
 * SHAPES (B decodes, H query heads, Hkv kv heads, G = H / Hkv, S cache slots,
 *         dq / dv head sizes, Lmax = ldslots)
 *   q        [B, H, dq]     FP32; token stride q_ld, head stride q_hs
 *   K, V     cache operands: row (slot s, kv head g) at p + s * ld + g * hs,
 *            FP32 or BF16, dq (K) / dv (V) contiguous elements
 *   slots    [B, ldslots]   int64: slot of each context position
 *   context  [B]            int64: valid positions of each row, 1..ldslots
 *   out      [B, H, dv]     FP32, contiguous
 *
 * DEFINITION (b < B, h < H, j < context[b], g = h / G)
 *   s[j]      = scale * sum_d q[b][h][d] * K(slots[b][j], g)[d]
 *   out[b][h] = sum_j softmax(s)[j] * V(slots[b][j], g)
 *
 * REGULARITIES  B 1..64, context 1..32K+. G 1 (Mixtral MHA) .. 8 (Qwen3-30B:
 *   32 / 4), 16 (MLA absorbed: 128 heads / 1 latent, dq 576, dv 512).
 *   GQA cache [S, 2, Hkv, d]: K at +0, V at +Hkv d, ld 2 Hkv d, hs d.
 *   MLA cache [S, r + dr]: K = V = the row, ld r + dr, hs 0, dv = r (a BF16 row is
 *   widened once for both).
 *
 * EXAMPLE  Qwen3-30B-A3B, B = 1, context 4096, FP32 cache: 4 (sequence, kv
 *   head) pairs of 8 query heads x 4096 keys x 128 dims; 16 MB of K/V read.
 *   Measured (2 AVX-512 EPYC cores): 0.6-0.8 ms, 21-28 GB/s (about half the
 *   streaming read rate), x2.8 the gathered torch path; BF16 cache 0.5 ms.
 *
 * PLAN  items = (sequence, kv head, key chunk). A pair is split into key
 *   chunks only when there are fewer pairs than threads (B = 1 MLA: one pair);
 *   each chunk leaves an unnormalised partial (max, sum, output) that the
 *   caller merges, as split-K flash decoding does. Items are claimed from an
 *   atomic cursor; work under DEC_SMALL multiply-adds stays on the calling
 *   thread (a pool wake-up costs more). Per item, keys go in blocks of
 *   DEC_BN: scores of the G query rows against the block (the block's K rows
 *   read once for all G), online softmax in FP32, then O += P V. BF16 rows
 *   are widened into an FP32 block first; FP32 rows are read in place.
 *   Slots are checked against S before each read: a bad one stops the call
 *   with an error, never a read outside the cache. The rows of the block
 *   DEC_AHEAD ahead are prefetched: each slot is its own page (Qwen3: 4 KB a
 *   slot), which the hardware prefetchers do not cross.
 *
 * AVX-512: 16 keys' dot products accumulate in 16 registers (one q vector
 *   feeds all 16 loads) and a transpose-add tree folds them into one vector
 *   of 16 scores; exp512. AVX2: the same over 8 keys, exp256. Generic: plain
 *   loops. O += P V is plain C that each build's flags vectorise.
 *
 * KV STORE  rows k [N, Hkv, dq] and v [N, Hkv, dv] (FP32, given strides) are
 *   written to slots slot_mapping[N]; BF16 rounds to nearest even (NaN ->
 *   0xffff, as torch's conversion). All slots are checked before any write.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"
#include "expert_units.h"

#define DEC_BN 16                   /* keys per block: one score vector (AVX-512) */
/* Multiply-adds below which no thread is woken: in a Qwen3-30B decode step (cold
 * caches after the experts) 64 keys took 54 us on the caller alone, 64 us on 2 threads. */
#define DEC_SMALL (1024 * 1024)
#define DEC_AHEAD 2                 /* blocks between a prefetch and the read */
#define DEC_MIN_CHUNK 256           /* keys per split chunk, at least */

typedef struct {
    const void *p;                  /* slot 0, kv head 0 */
    int64_t ld, hs;                 /* elements between slots / kv heads */
    int bf16;
} kv_operand;

typedef struct {
    const float *q;
    int64_t q_ld, q_hs;
    kv_operand k, v;
    const int64_t *slots, *context;
    int64_t ldslots, S;
    int B, H, Hkv, G, dq, dv, nsplit, chunk;
    int v_in_k;                     /* V rows are prefixes of the K rows (MLA): widened once */
    float scale;
    float *out;                     /* [B, H, dv] */
    float *part;                    /* nsplit > 1: [items][G][dv + 2] partials */
    uint8_t *scratch;               /* per thread: dec_stride bytes */
    int64_t stride;
    int items;
    atomic_int next;
    atomic_llong error;             /* 0, or -1 - flat index of a bad slot */
} dec_job;

typedef struct {
    float *o;                       /* [G][dv] unnormalised output */
    float *s;                       /* [G][DEC_BN] scores, then probabilities */
    float *mx, *l;                  /* [G] running max and sum */
    float *kb, *vb;                 /* [DEC_BN][dq], [DEC_BN][dv]: widened BF16 rows */
    const float *krow[DEC_BN], *vrow[DEC_BN];
} dec_scratch;

static int64_t dec_align(int64_t b) { return (b + 63) & ~(int64_t)63; }

static int64_t dec_stride(int G, int dq, int dv) {
    return dec_align(4 * (int64_t)G * dv) + dec_align(4 * (int64_t)G * DEC_BN)
         + 2 * dec_align(4 * (int64_t)G) + dec_align(4 * (int64_t)DEC_BN * dq)
         + dec_align(4 * (int64_t)DEC_BN * dv);
}

static dec_scratch dec_carve(uint8_t *cur, int G, int dq, int dv) {
    dec_scratch s;
    s.o = (float *)cur;   cur += dec_align(4 * (int64_t)G * dv);
    s.s = (float *)cur;   cur += dec_align(4 * (int64_t)G * DEC_BN);
    s.mx = (float *)cur;  cur += dec_align(4 * (int64_t)G);
    s.l = (float *)cur;   cur += dec_align(4 * (int64_t)G);
    s.kb = (float *)cur;  cur += dec_align(4 * (int64_t)DEC_BN * dq);
    s.vb = (float *)cur;
    return s;
}

/* Row n of a BF16 or FP32 operand as FP32: in place, or widened into dst. */
static const float *dec_row(const kv_operand *x, int64_t slot, int g, int n, float *dst) {
    int64_t off = slot * x->ld + g * x->hs;
    if (!x->bf16) return (const float *)x->p + off;
    const uint16_t *r = (const uint16_t *)x->p + off;
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + i))), 16)));
#elif defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(r + i))), 16)));
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(r[i]);
    return dst;
}

/* ====================================================== scores of one block
 * s[DEC_BN] = q . krow[t] for t < nk (lanes past nk are left as they are). */
#if defined(__AVX512F__)
/* 16 vectors -> one vector of their 16 horizontal sums (lane t = sum of a[t]). */
static inline __m512 dec_fold16(__m512 a[16]) {
    /* level 1: pairs (t, t + 8) swap 256-bit halves: 8 vectors of two 8-lane sums */
    const __m512i lo8 = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i hi8 = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8);
    __m512 b[8], c[4], d[2];
    for (int t = 0; t < 8; t++)
        b[t] = _mm512_add_ps(_mm512_permutex2var_ps(a[t], lo8, a[t + 8]),
                             _mm512_permutex2var_ps(a[t], hi8, a[t + 8]));
    /* b[t]: lanes 0-7 partial sums of key t, lanes 8-15 of key t + 8 */
    const __m512i lo4 = _mm512_set_epi32(27, 26, 25, 24, 11, 10, 9, 8, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i hi4 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 23, 22, 21, 20, 7, 6, 5, 4);
    for (int t = 0; t < 4; t++)
        c[t] = _mm512_add_ps(_mm512_permutex2var_ps(b[t], lo4, b[t + 4]),
                             _mm512_permutex2var_ps(b[t], hi4, b[t + 4]));
    /* c[t]: 4-lane groups for keys t, t + 4, t + 8, t + 12 */
    const __m512i lo2 = _mm512_set_epi32(29, 28, 13, 12, 25, 24, 9, 8, 21, 20, 5, 4, 17, 16, 1, 0);
    const __m512i hi2 = _mm512_set_epi32(31, 30, 15, 14, 27, 26, 11, 10, 23, 22, 7, 6, 19, 18, 3, 2);
    for (int t = 0; t < 2; t++)
        d[t] = _mm512_add_ps(_mm512_permutex2var_ps(c[t], lo2, c[t + 2]),
                             _mm512_permutex2var_ps(c[t], hi2, c[t + 2]));
    /* d[t]: 2-lane groups for keys t, t + 2, ..., t + 14 */
    const __m512i lo1 = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
    const __m512i hi1 = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
    return _mm512_add_ps(_mm512_permutex2var_ps(d[0], lo1, d[1]),
                         _mm512_permutex2var_ps(d[0], hi1, d[1]));
}

static void dec_scores(const float *q, const float *const *krow, int nk, int dq, float *s) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    int d = 0;
    for (; d + 16 <= dq; d += 16) {
        __m512 qv = _mm512_loadu_ps(q + d);
        for (int t = 0; t < 16; t++)       /* rows past nk repeat row 0: finite, unused */
            acc[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(krow[t < nk ? t : 0] + d), acc[t]);
    }
    if (d < dq) {
        __mmask16 m = (__mmask16)((1u << (dq - d)) - 1);
        __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
        for (int t = 0; t < 16; t++)
            acc[t] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, krow[t < nk ? t : 0] + d), acc[t]);
    }
    _mm512_storeu_ps(s, dec_fold16(acc));
}
#elif defined(__AVX2__) && defined(__FMA__)
/* 8 vectors -> one vector of their 8 horizontal sums. */
static inline __m256 dec_fold8(const __m256 a[8]) {
    __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 h0 = _mm256_hadd_ps(h01, h23), h1 = _mm256_hadd_ps(h45, h67);
    /* h0: lanes 0-3 low halves of keys 0-3, 4-7 high halves; h1 keys 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

static void dec_scores(const float *q, const float *const *krow, int nk, int dq, float *s) {
    for (int t0 = 0; t0 < DEC_BN; t0 += 8) {
        __m256 acc[8];
        const float *kr[8];
        for (int t = 0; t < 8; t++) {
            acc[t] = _mm256_setzero_ps();
            kr[t] = krow[t0 + t < nk ? t0 + t : 0];
        }
        int d = 0;
        for (; d + 8 <= dq; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            for (int t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[t] + d), acc[t]);
        }
        __m256 sv = dec_fold8(acc);
        if (d < dq) {
            float tail[8];
            for (int t = 0; t < 8; t++) {
                float a = 0.0f;
                for (int e = d; e < dq; e++) a += q[e] * kr[t][e];
                tail[t] = a;
            }
            sv = _mm256_add_ps(sv, _mm256_loadu_ps(tail));
        }
        _mm256_storeu_ps(s + t0, sv);
    }
}
#else
/* Eight partial sums per dot: lanes the compiler can keep in SSE registers (a
 * single running sum is a serial chain it may not reorder). */
static void dec_scores(const float *q, const float *const *krow, int nk, int dq, float *s) {
    for (int t = 0; t < nk; t++) {
        const float *k = krow[t];
        float a[8] = {0};
        int d = 0;
        for (; d + 8 <= dq; d += 8)
            for (int i = 0; i < 8; i++) a[i] += q[d + i] * k[d + i];
        for (; d < dq; d++) a[0] += q[d] * k[d];
        s[t] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    }
}
#endif

/* ====================================================== softmax and P V of one block
 * dec_softmax: sr[t] = exp(scale sr[t] - m') for t < nk (0 past nk) where m' =
 * max(*mx, scale sr[..nk]); *mx = m'; returns the block's sum.
 * dec_pv: o[c] = alpha o[c] + sum_t p[t] vrow[t][c], c < dv. */
#if defined(__AVX512F__)
static float dec_softmax(float *sr, int nk, float scale, float *mx) {
    __mmask16 m = nk >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nk) - 1);
    __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr), _mm512_set1_ps(scale));
    float hi = fmaxf(*mx, _mm512_mask_reduce_max_ps(m, x));
    __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(x, _mm512_set1_ps(hi))));
    _mm512_storeu_ps(sr, e);
    *mx = hi;
    return _mm512_reduce_add_ps(e);
}

/* Columns [c, c + 16 NV) in registers across the block's keys: o is read and
 * written once per block, and NV independent chains keep both FMA ports busy. */
ALWAYS_INLINE void dec_pv_cols(float *o, const float *p, const float *const *vrow, int nk,
                               __m512 alpha, int c, __mmask16 tail, const int NV) {
    __m512 acc[8];
    for (int v = 0; v < NV; v++)
        acc[v] = _mm512_mul_ps(alpha, _mm512_maskz_loadu_ps(v == NV - 1 ? tail : 0xffff, o + c + 16 * v));
    for (int t = 0; t < nk; t++) {
        __m512 pt = _mm512_set1_ps(p[t]);
        for (int v = 0; v < NV; v++)
            acc[v] = _mm512_fmadd_ps(pt, _mm512_maskz_loadu_ps(v == NV - 1 ? tail : 0xffff,
                                                               vrow[t] + c + 16 * v), acc[v]);
    }
    for (int v = 0; v < NV; v++)
        _mm512_mask_storeu_ps(o + c + 16 * v, v == NV - 1 ? tail : 0xffff, acc[v]);
}

static void dec_pv(float *o, const float *p, const float *const *vrow, int nk, int dv,
                   float alpha) {
    const __m512 a = _mm512_set1_ps(alpha);
    int c = 0;
    for (; c + 128 <= dv; c += 128) dec_pv_cols(o, p, vrow, nk, a, c, 0xffff, 8);
    for (; c < dv; c += 16) {
        __mmask16 tail = dv - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dv - c)) - 1);
        dec_pv_cols(o, p, vrow, nk, a, c, tail, 1);
    }
}
#else
static float dec_softmax(float *sr, int nk, float scale, float *mx) {
    float hi = *mx, sum = 0.0f;
    for (int t = 0; t < nk; t++) { sr[t] *= scale; hi = fmaxf(hi, sr[t]); }
    exp_sub_row(sr, hi, sr, nk);
    for (int t = 0; t < nk; t++) sum += sr[t];
    *mx = hi;
    return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
ALWAYS_INLINE void dec_pv_cols(float *o, const float *p, const float *const *vrow, int nk,
                               __m256 alpha, int c, const int NV) {
    __m256 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm256_mul_ps(alpha, _mm256_loadu_ps(o + c + 8 * v));
    for (int t = 0; t < nk; t++) {
        __m256 pt = _mm256_set1_ps(p[t]);
        for (int v = 0; v < NV; v++)
            acc[v] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vrow[t] + c + 8 * v), acc[v]);
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(o + c + 8 * v, acc[v]);
}
#endif

static void dec_pv(float *o, const float *p, const float *const *vrow, int nk, int dv,
                   float alpha) {
    int c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 a = _mm256_set1_ps(alpha);
    for (; c + 64 <= dv; c += 64) dec_pv_cols(o, p, vrow, nk, a, c, 8);
    for (; c + 8 <= dv; c += 8) dec_pv_cols(o, p, vrow, nk, a, c, 1);
#endif
    if (c == dv) return;
    for (int e = c; e < dv; e++) o[e] *= alpha;
    int t = 0;
    for (; t + 4 <= nk; t += 4) {   /* four keys per pass over o: a quarter of its stores */
        const float p0 = p[t], p1 = p[t + 1], p2 = p[t + 2], p3 = p[t + 3];
        const float *v0 = vrow[t], *v1 = vrow[t + 1], *v2 = vrow[t + 2], *v3 = vrow[t + 3];
        for (int e = c; e < dv; e++) o[e] += p0 * v0[e] + p1 * v1[e] + p2 * v2[e] + p3 * v3[e];
    }
    for (; t < nk; t++)
        for (int e = c; e < dv; e++) o[e] += p[t] * vrow[t][e];
}
#endif

/* ====================================================== one item */
/* Online softmax of query row r over a block of nk scores, then o += p V. */
static void dec_update(const dec_job *j, dec_scratch *s, int r, int nk) {
    float *sr = s->s + r * DEC_BN, old = s->mx[r], mx = old;
    float sum = dec_softmax(sr, nk, j->scale, &mx);
    float alpha = mx == old ? 1.0f : expf(old - mx);                /* -inf -> 0 */
    s->l[r] = s->l[r] * alpha + sum;
    s->mx[r] = mx;
    dec_pv(s->o + (int64_t)r * j->dv, sr, s->vrow, nk, j->dv, alpha);
}

/* Fetch the K/V rows of keys [t0, t1) (kv head g) towards the cache. Each row sits
 * in its own page (a GQA row is 2 Hkv d elements from the next slot's), where the
 * hardware prefetchers do not follow: left to demand misses, a 4K-key context read
 * at ~half the machine's read bandwidth. */
static void dec_prefetch(const dec_job *j, const int64_t *slots, int g, int t0, int t1) {
    const int kes = j->k.bf16 ? 2 : 4, ves = j->v.bf16 ? 2 : 4;
    for (int t = t0; t < t1; t++) {
        int64_t slot = slots[t];
        if (slot < 0 || slot >= j->S) continue;          /* reported when it is read */
        const char *kr = (const char *)j->k.p + (slot * j->k.ld + g * j->k.hs) * kes;
        const char *vr = (const char *)j->v.p + (slot * j->v.ld + g * j->v.hs) * ves;
        for (int c = 0; c < j->dq * kes; c += 64) __builtin_prefetch(kr + c, 0, 3);
        for (int c = 0; c < j->dv * ves; c += 64) __builtin_prefetch(vr + c, 0, 3);
    }
}

/* Keys [k0, k1) of pair (b, g) into s->o, s->mx, s->l; 0 or a bad slot's error. */
static int64_t dec_item(const dec_job *j, dec_scratch *s, int b, int g, int k0, int k1) {
    const int G = j->G;
    for (int r = 0; r < G; r++) { s->mx[r] = -INFINITY; s->l[r] = 0.0f; }
    memset(s->o, 0, 4 * (size_t)G * j->dv);
    const int64_t *slots = j->slots + (int64_t)b * j->ldslots;
    const float *q = j->q + (int64_t)b * j->q_ld + (int64_t)g * G * j->q_hs;
    /* rows DEC_AHEAD blocks ahead of the one being read (the first ones up front) */
    const int ahead = DEC_AHEAD * DEC_BN;
    dec_prefetch(j, slots, g, k0, k0 + ahead < k1 ? k0 + ahead : k1);
    for (int t0 = k0; t0 < k1; t0 += DEC_BN) {
        int nk = k1 - t0 < DEC_BN ? k1 - t0 : DEC_BN;
        int p0 = t0 + ahead, p1 = p0 + DEC_BN < k1 ? p0 + DEC_BN : k1;
        if (p0 < p1) dec_prefetch(j, slots, g, p0, p1);
        for (int t = 0; t < nk; t++) {
            int64_t slot = slots[t0 + t];
            if (slot < 0 || slot >= j->S) return -1 - ((int64_t)b * j->ldslots + t0 + t);
            s->krow[t] = dec_row(&j->k, slot, g, j->dq, s->kb + (int64_t)t * j->dq);
            s->vrow[t] = j->v_in_k ? s->krow[t]
                                   : dec_row(&j->v, slot, g, j->dv, s->vb + (int64_t)t * j->dv);
        }
        for (int r = 0; r < G; r++) {
            dec_scores(q + (int64_t)r * j->q_hs, s->krow, nk, j->dq, s->s + r * DEC_BN);
            dec_update(j, s, r, nk);
        }
    }
    return 0;
}

/* Item i -> (b, g, chunk); chunks past a short context are empty. */
static void dec_item_run(dec_job *j, dec_scratch *s, int i) {
    int split = i % j->nsplit, pair = i / j->nsplit, b = pair / j->Hkv, g = pair % j->Hkv;
    int ctx = (int)j->context[b];
    int k0 = split * j->chunk, k1 = k0 + j->chunk < ctx ? k0 + j->chunk : ctx;
    if (k0 > k1) k0 = k1;
    int64_t rc = dec_item(j, s, b, g, k0, k1);
    if (rc) { atomic_store(&j->error, rc); return; }
    const int G = j->G, dv = j->dv;
    for (int r = 0; r < G; r++) {
        const float *o = s->o + (int64_t)r * dv;
        if (j->nsplit == 1) {       /* the whole context: normalise into out */
            float inv = 1.0f / s->l[r], *dst = j->out + ((int64_t)b * j->H + g * G + r) * dv;
            for (int c = 0; c < dv; c++) dst[c] = o[c] * inv;
        } else {                    /* a chunk: leave the partial for dec_merge */
            float *p = j->part + ((int64_t)i * G + r) * (dv + 2);
            memcpy(p, o, 4 * (size_t)dv);
            p[dv] = s->mx[r];
            p[dv + 1] = s->l[r];
        }
    }
}

static void dec_worker(void *arg, int tid, int nthreads) {
    (void)nthreads;
    dec_job *j = (dec_job *)arg;
    dec_scratch s = dec_carve(j->scratch + tid * j->stride, j->G, j->dq, j->dv);
    for (;;) {
        int i = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (i >= j->items || atomic_load_explicit(&j->error, memory_order_relaxed)) break;
        dec_item_run(j, &s, i);
    }
}

/* out = the chunks' partials combined: o = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c. */
static void dec_merge(const dec_job *j) {
    const int G = j->G, dv = j->dv, n = j->nsplit;
    for (int pair = 0; pair < j->B * j->Hkv; pair++)
        for (int r = 0; r < G; r++) {
            const float *p0 = j->part + ((int64_t)pair * n * G + r) * (dv + 2);
            const int64_t step = (int64_t)G * (dv + 2);
            float M = -INFINITY, l = 0.0f;
            for (int c = 0; c < n; c++) M = fmaxf(M, p0[c * step + dv]);
            int b = pair / j->Hkv, g = pair % j->Hkv;
            float *dst = j->out + ((int64_t)b * j->H + g * G + r) * dv;
            memset(dst, 0, 4 * (size_t)dv);
            for (int c = 0; c < n; c++) {
                const float *p = p0 + c * step;
                if (p[dv + 1] == 0.0f) continue;               /* empty chunk */
                float w = expf(p[dv] - M);
                l += w * p[dv + 1];
                for (int e = 0; e < dv; e++) dst[e] += w * p[e];
            }
            float inv = 1.0f / l;
            for (int e = 0; e < dv; e++) dst[e] *= inv;
        }
}

/* Key chunks per pair: enough items for the threads, chunks of >= DEC_MIN_CHUNK. */
static int dec_splits(int pairs, int64_t Lmax, int nthreads) {
    if (pairs >= nthreads) return 1;
    int64_t want = (nthreads + pairs - 1) / pairs, most = Lmax / DEC_MIN_CHUNK;
    return (int)(want < most ? want : most < 1 ? 1 : most);
}

static int64_t dec_max_context(const int64_t *context, int B) {
    int64_t m = 0;
    for (int b = 0; b < B; b++) m = context[b] > m ? context[b] : m;
    return m;
}

/* Bytes of workspace decode_attention needs (bounded by the threads, not by context). */
static int64_t decode_workspace_bytes(int B, int H, int Hkv, int dq, int dv, int nthreads) {
    int G = H / Hkv, pairs = B * Hkv;
    int64_t parts = pairs < nthreads ? (int64_t)(2 * nthreads + pairs) * G * (dv + 2) * 4 : 0;
    return 64 + dec_align(parts) + (int64_t)nthreads * dec_stride(G, dq, dv);
}

/* out [B, H, dv] = decode attention (spec block). Returns 0; 1 + b when context[b]
 * is outside [1, ldslots]; -1 - i when slots.flat[i] is outside [0, S). The caller
 * checks shapes (H % Hkv == 0, positive sizes). */
static int64_t decode_attention(const float *q, int64_t q_ld, int64_t q_hs, kv_operand k,
                                kv_operand v, const int64_t *slots, int64_t ldslots,
                                const int64_t *context, int64_t S, int B, int H, int Hkv,
                                int dq, int dv, float scale, float *out, uint8_t *workspace,
                                int nthreads) {
    int64_t work = 0;
    for (int b = 0; b < B; b++) {
        if (context[b] < 1 || context[b] > ldslots) return 1 + b;
        work += context[b];
    }
    work *= (int64_t)H * (dq + dv);
    if (work < DEC_SMALL || nthreads < 1) nthreads = 1;
    dec_job j;
    memset(&j, 0, sizeof(j));
    j.q = q; j.q_ld = q_ld; j.q_hs = q_hs; j.k = k; j.v = v;
    j.slots = slots; j.context = context; j.ldslots = ldslots; j.S = S;
    j.B = B; j.H = H; j.Hkv = Hkv; j.G = H / Hkv; j.dq = dq; j.dv = dv;
    j.scale = scale; j.out = out;
    j.v_in_k = k.p == v.p && k.ld == v.ld && k.hs == v.hs && k.bf16 == v.bf16 && dv <= dq;
    int pairs = B * Hkv;
    int64_t Lmax = dec_max_context(context, B);
    j.nsplit = dec_splits(pairs, Lmax, nthreads);
    if (j.nsplit > 2 * nthreads / pairs + 1) j.nsplit = 2 * nthreads / pairs + 1;  /* workspace bound */
    j.chunk = (int)(((Lmax + j.nsplit - 1) / j.nsplit + DEC_BN - 1) / DEC_BN * DEC_BN);
    j.items = pairs * j.nsplit;
    uint8_t *ws = (uint8_t *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    j.part = (float *)ws;
    int64_t parts = pairs < nthreads ? (int64_t)(2 * nthreads + pairs) * j.G * (dv + 2) * 4 : 0;
    j.scratch = ws + dec_align(parts);
    j.stride = dec_stride(j.G, dq, dv);
    atomic_init(&j.next, 0);
    atomic_init(&j.error, 0);
    pool_run(dec_worker, &j, j.items < nthreads ? j.items : nthreads);
    int64_t err = atomic_load(&j.error);
    if (err) return err;
    if (j.nsplit > 1) dec_merge(&j);
    return 0;
}

/* ====================================================== KV store */
/* torch's float -> bfloat16 (its vectorised conversion, the one .to() and index_put
 * run): round to nearest even, any NaN -> 0xffff. */
static inline uint16_t dec_bf16(float f) {
    return f != f ? (uint16_t)0xffff : f32_to_bf16(f);
}

static void dec_store_row(const kv_operand *c, int64_t slot, int g, const float *src, int n) {
    int64_t off = slot * c->ld + g * c->hs;
    if (!c->bf16) { memcpy((float *)c->p + off, src, 4 * (size_t)n); return; }
    uint16_t *dst = (uint16_t *)c->p + off;
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {          /* NaN lanes fixed up by the scalar pass */
        __m512 x = _mm512_loadu_ps(src + i);
        if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) break;
        _mm256_storeu_si256((__m256i *)(dst + i), bf16x16(x));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(src + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) break;
        _mm_storeu_si128((__m128i *)(dst + i), bf16x8(x));
    }
#endif
    for (; i < n; i++) dst[i] = dec_bf16(src[i]);
}

/* cache rows slot_mapping[n] <- k[n] (and v[n] when v_src is not NULL), every kv head.
 * Returns 0, or -1 - n for the first slot_mapping[n] outside [0, S) (nothing written). */
static int64_t kv_store(kv_operand kc, kv_operand vc, const float *k, int64_t k_ld, int64_t k_hs,
                        const float *v, int64_t v_ld, int64_t v_hs, const int64_t *slot_mapping,
                        int N, int64_t S, int Hkv, int dk, int dv) {
    for (int n = 0; n < N; n++)
        if (slot_mapping[n] < 0 || slot_mapping[n] >= S) return -1 - (int64_t)n;
    for (int n = 0; n < N; n++)
        for (int g = 0; g < Hkv; g++) {
            dec_store_row(&kc, slot_mapping[n], g, k + n * k_ld + g * k_hs, dk);
            if (v) dec_store_row(&vc, slot_mapping[n], g, v + n * v_ld + g * v_hs, dv);
        }
    return 0;
}
