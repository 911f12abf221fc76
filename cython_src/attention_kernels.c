/* Causal attention for one prompt chunk on the CPU, flash style: an online
 * softmax over key blocks, so no score matrix larger than one block per
 * thread ever exists.
 *
 * SHAPES (n chunk queries, L keys = cached + chunk, H query heads, Hkv kv
 *         heads, G = H / Hkv query heads per kv head, dq / dv head sizes)
 *   q    [n, H, dq]    FP32 or BF16; token stride q_ld, head stride q_hs
 *   k    [L, Hkv, dq]  FP32 or BF16; token stride k_ld, head stride k_hs
 *   v    [L, Hkv, dv]  FP32 or BF16; token stride v_ld, head stride v_hs
 *   out  [n, H, dv]    FP32, contiguous
 *   (the last dimension of q, k, v is contiguous)
 *
 * DEFINITION (query i sits at position L - n + i; head h reads kv head h / G)
 *   s[j]      = scale * sum_d q[i][h][d] * k[j][h/G][d]     j <= L - n + i
 *   out[i][h] = sum_j softmax(s)[j] * v[j][h/G]
 *
 * REGULARITIES  n == L for a plain prompt, n < L for a chunk after a cached
 *   prefix. G = 1 (MLA expanded, Mixtral-style MHA) .. 16 (Qwen3: 32 / 4 = 8).
 *   dq/dv 128/128 (Qwen3, Mixtral), 192/128 (DeepSeek MLA expanded),
 *   576/512 (MLA latent form). Prefill chunks are 512 .. 8K tokens.
 *
 * EXAMPLE  Qwen3-30B-A3B, 4K-token prompt: H 32, Hkv 4, d 128 -> 4 kv heads x
 *   256 row tiles of 16 queries x 8 heads = 128 query vectors per task;
 *   the last tile reads all 64 key blocks of 64 keys, the first reads one.
 *   Measured (2 AVX-512 EPYC cores, BF16 peak ~950 GFLOP/s): 512 tokens 3.5 ms,
 *   4096 tokens 185 ms (~750 GFLOP/s), 4.5-6x torch SDPA in FP32.
 *
 * PLAN  phase 1: every (kv head, key block of BN) is converted once into a
 *   shared store (BF16 pair layout below, or FP32), split over the threads.
 *   Phase 2: tasks (kv head, tile of bm query rows) claimed from an atomic
 *   cursor, last tiles first (a causal row's cost grows with its position,
 *   so the long tasks start early and the short ones fill the tail), one
 *   claimed ahead so its q and out rows are prefetched. A task holds all G
 *   query heads of its kv head for its rows (M = bm * G query vectors), so
 *   each converted K/V block is read by all M of them: that reuse lifts the
 *   arithmetic intensity to the dot-product units' rate. Key blocks past the
 *   tile's last position are skipped; only blocks that cross a row's
 *   position are masked, and there each register tile stops at the last key
 *   its rows see. Kv heads go in passes when the store would pass
 *   g_att_store_bytes. Each task owns its output rows: no reduction, the
 *   result does not depend on the thread count.
 *
 * PRECISION CONTRACT (README): Q and K rounded to BF16 before QK^T, the
 *   unnormalised probabilities and V rounded to BF16 before PV; scores, max,
 *   sums and the output accumulate in FP32. One reduction order per query:
 *   key blocks of BN from key 0, each score lane a vdpbf16ps chain over the
 *   head dims in order, the same online-softmax steps, whichever rows, heads,
 *   threads or chunk share the task; decodes run this arithmetic through the
 *   slot table (attention_paged), so a position's output does not depend on
 *   how the engine batched or chunked it.
 * AVX-512 (Zen 4, Sapphire Rapids and later): Q.K^T and P.V with vdpbf16ps on
 *   BF16 inputs (round to nearest even), FP32 accumulation; softmax statistics
 *   in FP32 with vf_exp (vec.h). Scratch layouts put a pair of
 *   adjacent reduction elements in one 32-bit word, so one broadcast word of
 *   the other operand feeds 16 lanes:
 *     Kb [dq/2 pairs][BN keys] words  (k[j][2p], k[j][2p+1])
 *     Vb [BN/2 key pairs][dvp] words  (v[2t][c], v[2t+1][c])
 *     Qb [M][dq/2] words, Pb [M][BN/2] words
 * AVX2: FP32 from the given inputs, K and V as rows, nothing transposed (see
 *   its section): a decode widens the cache's BF16 rows in registers where they
 *   lie, a prefill reads the FP32 rows of its converted store; a score is an
 *   8-lane FMA chain over the head dims and a fixed 8-lane sum, the softmax the
 *   AVX-512 body's steps in 8 lanes.
 * Generic: the same blocks as plain loops (the FP32 oracle's twin).
 */
#ifndef MOED_ATTENTION_KERNELS_C
#define MOED_ATTENTION_KERNELS_C
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"
#include "expert_units.h"

#define ATT_BN 64               /* keys per block: S row = 4 vectors of 16 */
#define ATT_ROWS 128            /* query vectors per task (rows x group heads) */
#define ATT_SLACK 8.0f          /* vector softmax: how far a score may pass the running
                                   max before the max moves (att_softmax_row) */
/* Converted K/V per pass: bounds the workspace (MLA expanded, 128 kv heads x
 * 320 dims, would need 320 MB at 4K tokens). Tests lower it to force passes. */
static int64_t g_att_store_bytes = 64ll << 20;

#if defined(__AVX512BF16__)
#define ATT_BF16_DOT 1
#elif defined(__AVX2__) && defined(__FMA__)
#define ATT_ROW_BLOCKS 1        /* AVX2: K/V read as rows in place (see its section) */
#endif

/* FP32 elements of a Q (and AVX2 K) scratch row: whole 8-lane chunks on AVX2. */
static inline int att_qs(int dq) {
#ifdef ATT_ROW_BLOCKS
    return (dq + 7) & ~7;
#else
    return dq;
#endif
}

typedef struct {
    const void *p;              /* base of the tensor */
    int64_t ld, hs;             /* elements between tokens / heads */
    int bf16;
} att_operand;

typedef struct {
    att_operand q, k, v;
    int n, L, H, Hkv, dq, dv, G;
    int bm, M, ntiles, ntasks;  /* query rows per tile, vectors per task */
    int qw, dvp;                /* dq rounded up to pairs (words), dv to 16 */
    int qs;                     /* FP32 paths: floats per Q row in scratch (att_qs) */
    float scale;
    float *out;                 /* [n, H, dv] */
    int nblocks;                /* key blocks of BN (the last may be partial) */
    int64_t kbytes, vbytes;     /* bytes of one converted K / V block */
    int g0, hc;                 /* this pass: kv heads [g0, g0 + hc) */
    uint8_t *kstore, *vstore;   /* [hc][nblocks] converted blocks (phase 1) */
    atomic_int next;
    uint8_t *scratch;
    int64_t stride;             /* scratch bytes per thread */
    /* paged (decodes): query row b attends keys 0..context[b]-1 read through its
     * slot table; each task converts its own key blocks (no shared store) */
    int paged;
    const int64_t *kslots;      /* [B][ldslots] cache slot of each key position */
    const int64_t *context;     /* [B] keys of each query row */
    int64_t ldslots;
    int hgroups, hn;            /* query heads of a kv head split into hgroups of hn */
    int direct;                 /* AVX2 paged: K/V read from the cache rows in place */
} att_job;

typedef struct {                /* one thread's scratch, carved 64-aligned */
    void *q;                    /* BF16 words [M][qw] | FP32 [M][dq] */
    const void *k;              /* this block in kstore: BF16 words [qw][BN] | FP32 [dq][BN] */
    const void *v;              /* this block in vstore: BF16 words [BN/2][dvp] | FP32 [BN][dvp] */
    float *s;                   /* [M][BN] scores */
    uint32_t *p;                /* BF16 words [M][BN/2] probabilities */
    float *o;                   /* [M][dvp] unnormalised output */
    float *mx, *alpha;          /* [M] running max, rescale of this block */
    float *l;                   /* [M][16] running sum, per lane (16 AVX-512, 8 AVX2) or in lane 0 */
    uint8_t *kblk, *vblk;       /* paged: this thread's converted K / V block */
    int G;                      /* query heads per row in the current task (vector m
                                   belongs to row m / G) */
#ifdef ATT_ROW_BLOCKS
    const void *krow[ATT_BN], *vrow[ATT_BN];    /* this block's rows (att_block) */
    int kbf, vbf;               /* those rows are BF16 (cache) or FP32 */
#endif
} att_scratch;

static int64_t att_align(int64_t b) { return (b + 63) & ~(int64_t)63; }

/* Per-thread scratch bytes: the FP32 sizes, which bound the BF16 ones; `blocks`
 * more for a paged job's own converted K/V block. */
static int64_t att_stride(int M, int qw, int dq, int dvp, int64_t blocks) {
    int64_t dq2 = 2 * (int64_t)qw > att_qs(dq) ? 2 * (int64_t)qw : att_qs(dq);
    return att_align(4 * (int64_t)M * dq2) + att_align(4 * (int64_t)M * ATT_BN)
         + att_align(2 * (int64_t)M * ATT_BN) + att_align(4 * (int64_t)M * dvp)
         + 3 * att_align(4 * (int64_t)M) + att_align(64 * (int64_t)M) + blocks;
}

static int att_bm(int G) { return G >= ATT_ROWS ? 1 : ATT_ROWS / G; }


static att_scratch att_carve(uint8_t *base, const att_job *j) {
    att_scratch s;
    int64_t dq2 = 2 * (int64_t)j->qw > j->qs ? 2 * (int64_t)j->qw : j->qs;
    uint8_t *cur = base;
    s.q = cur;  cur += att_align(4 * (int64_t)j->M * dq2);
    s.k = s.v = NULL;
    s.s = (float *)cur;  cur += att_align(4 * (int64_t)j->M * ATT_BN);
    s.p = (uint32_t *)cur;  cur += att_align(2 * (int64_t)j->M * ATT_BN);
    s.o = (float *)cur;  cur += att_align(4 * (int64_t)j->M * j->dvp);
    s.mx = (float *)cur;  cur += att_align(4 * (int64_t)j->M);
    s.l = (float *)cur;  cur += att_align(64 * (int64_t)j->M);
    s.alpha = (float *)cur;  cur += att_align(4 * (int64_t)j->M);
    s.kblk = s.vblk = NULL;
    if (j->paged) {
        s.kblk = cur;  cur += j->kbytes;
        s.vblk = cur;
    }
    s.G = 0;                    /* set per task (att_task) */
    return s;
}

/* Row (token t, head h) of an operand. */
static inline const void *att_row(const att_operand *x, int64_t t, int h) {
    int64_t off = t * x->ld + h * x->hs;
    return x->bf16 ? (const void *)((const uint16_t *)x->p + off)
                   : (const void *)((const float *)x->p + off);
}

/* Key position t's token row: through the slot table when paged. */
static inline int64_t att_key(const int64_t *slots, int64_t t) { return slots ? slots[t] : t; }

static inline float att_elem(const att_operand *x, const void *row, int d) {
    return x->bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

/* Keys j <= lim of a row are visible; the bits of 16 lanes starting at key j0. */
static inline uint32_t att_lane_mask(int lim, int j0) {
    if (lim >= j0 + 15) return 0xffff;
    if (lim < j0) return 0;
    return (1u << (lim - j0 + 1)) - 1;
}

#ifdef ATT_BF16_DOT
/* 8 rows of 8 32-bit words (floats, or BF16 pairs) -> 8 columns, stored BN apart (a register transpose: the
 * strided scalar stores made the conversion, not the dot products, the cost of a
 * decode's key block). Pure data movement: the values are the scalar loop's. */
static inline void att_t8x8(const float *const *rows, int d0, float *dst) {
    __m256 r[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows[i] + d0);
    for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            r[i + h] = _mm256_shuffle_ps(u[i + h], u[i + h + 2], 0x44);
            r[i + h + 2] = _mm256_shuffle_ps(u[i + h], u[i + h + 2], 0xee);
        }
    /* r[0..3]: rows 0-3, columns {0,4},{2,6},{1,5},{3,7} in 128-bit halves; r[4..7] rows 4-7 */
    const int col[4] = {0, 2, 1, 3};
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + col[i] * ATT_BN, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (col[i] + 4) * ATT_BN, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

/* 16 rows of 16 words -> 16 columns, stored BN apart: the same movement in zmm
 * registers, 64 shuffles for 256 words where the 8 x 8 takes 96. */
static inline void att_t16x16(const float *const *rows, int d0, float *dst) {
    __m512i r[16], a[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(rows[i] + d0);
    for (int i = 0; i < 16; i += 2) {            /* (r_2i, r_2i+1) words 2x, 2x+1 of a lane */
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) {            /* rows q..q+3 of lane element e in r[q+e] */
        r[q] = _mm512_unpacklo_epi64(a[q], a[q + 2]);
        r[q + 1] = _mm512_unpackhi_epi64(a[q], a[q + 2]);
        r[q + 2] = _mm512_unpacklo_epi64(a[q + 1], a[q + 3]);
        r[q + 3] = _mm512_unpackhi_epi64(a[q + 1], a[q + 3]);
    }
    for (int e = 0; e < 4; e++) {                /* word 4L + e: lane L of r[e], r[4+e], .. */
        __m512i c = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
        __m512i d = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xdd);
        __m512i c2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
        __m512i d2 = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xdd);
        _mm512_storeu_si512(dst + e * ATT_BN, _mm512_shuffle_i32x4(c, c2, 0x88));
        _mm512_storeu_si512(dst + (8 + e) * ATT_BN, _mm512_shuffle_i32x4(c, c2, 0xdd));
        _mm512_storeu_si512(dst + (4 + e) * ATT_BN, _mm512_shuffle_i32x4(d, d2, 0x88));
        _mm512_storeu_si512(dst + (12 + e) * ATT_BN, _mm512_shuffle_i32x4(d, d2, 0xdd));
    }
}
#endif

/* ====================================================== AVX-512 BF16 path */
#ifdef ATT_BF16_DOT
/* The tiles' operands: BF16 pair words, a dot step is one vdpbf16ps. */
#define ATT_R 6                 /* query vectors per register tile: 6 x 4 accumulators */
#define ATT_PW 2                /* keys per word of P */
typedef uint32_t att_word;
typedef __m512bh vpair;
ALWAYS_INLINE vpair att_vload(const att_word *p) { return (__m512bh)_mm512_loadu_si512(p); }
ALWAYS_INLINE vpair att_bcast(const att_word *w) { return (__m512bh)_mm512_set1_epi32((int)*w); }
ALWAYS_INLINE vf att_dot(vf acc, vpair x, vpair b) { return _mm512_dpbf16_ps(acc, x, b); }
#define ATT_P(s) ((const att_word *)(s)->p)

/* A row of d elements as BF16, zero padded to 2 * words. */
static void att_row_bf16(const att_operand *x, const void *row, int d, uint16_t *dst, int words) {
    if (x->bf16) memcpy(dst, row, 2 * (size_t)d);
    else f32_row_to_bf16((const float *)row, dst, d);
    for (int i = d; i < 2 * words; i++) dst[i] = 0;
}

static void att_load_q(const att_job *j, att_scratch *s, int h0, int i0, int rows) {
    uint16_t *q = (uint16_t *)s->q;
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < s->G; h++)
            att_row_bf16(&j->q, att_row(&j->q, i0 + r, h0 + h), j->dq,
                         q + (int64_t)(r * s->G + h) * 2 * j->qw, j->qw);
}

/* Kb [qw][BN] words: a 64 x qw word transpose of the BF16 rows (the pairs
 * are already adjacent in a row); keys past nk are zero. */
static int64_t att_kblock_bytes(int qw, int dq) {
    (void)dq;
    return att_align(4 * (int64_t)qw * ATT_BN);
}
static int64_t att_vblock_bytes(int dvp) { return att_align(2 * (int64_t)ATT_BN * dvp); }

/* K rows as pair words: a BF16 row of even length in place, else converted. */
static inline int att_k_words(const att_job *j) { return j->qw; }
static inline int att_k_in_place(const att_job *j) { return j->k.bf16 && !(j->dq & 1); }
static inline void att_k_convert(const att_job *j, const void *src, att_word *dst) {
    att_row_bf16(&j->k, src, j->dq, (uint16_t *)dst, j->qw);
}

/* 16 FP32 (or BF16) elements of a row -> 16 BF16 in the low halves of 32-bit lanes. */
static inline __m512i att_v16(const att_operand *x, const void *row, int c, int dv) {
    int left = dv - c;
    __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
    if (x->bf16)
        return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c));
    return _mm512_cvtepu16_epi32(bf16x16(_mm512_maskz_loadu_ps(m, (const float *)row + c)));
}

/* 32 BF16 of row a and of row b -> 32 (a, b) pair words in order: vpunpck*wd
 * interleave within 128-bit lanes, one two-source permute per half puts the lanes
 * back in order (pure data movement: the words att_v16's path builds). */
static inline void att_pairs32(const uint16_t *a, const uint16_t *b, uint32_t *dst) {
    const __m512i x = _mm512_loadu_si512(a), y = _mm512_loadu_si512(b);
    const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(dst + 16, _mm512_permutex2var_epi64(lo, second, hi));
}

/* Vb [BN/2][dvp] words: rows 2t and 2t+1 interleaved; keys past nk are zero. */
static void att_load_v(const att_job *j, void *dst_block, int g, int k0, int nk,
                       const int64_t *slots) {
    uint32_t *vb = (uint32_t *)dst_block;
    const int whole = j->v.bf16 ? j->dv & ~31 : 0;      /* columns by att_pairs32 */
    for (int t = 0; t < ATT_BN / 2; t++) {
        uint32_t *dst = vb + (int64_t)t * j->dvp;
        int a = 2 * t < nk, b = 2 * t + 1 < nk;
        const void *ra = a ? att_row(&j->v, att_key(slots, k0 + 2 * t), g) : NULL;
        const void *rb = b ? att_row(&j->v, att_key(slots, k0 + 2 * t + 1), g) : NULL;
        int c = 0;
        if (a && b)
            for (; c < whole; c += 32)
                att_pairs32((const uint16_t *)ra + c, (const uint16_t *)rb + c, dst + c);
        for (; c < j->dvp; c += 16) {
            __m512i lo = a ? att_v16(&j->v, ra, c, j->dv) : _mm512_setzero_si512();
            __m512i hi = b ? att_v16(&j->v, rb, c, j->dv) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* Online softmax over one block for row m: keys j <= lim are visible.
 * Lazy rescaling: the running max moves only when a score exceeds it by more
 * than ATT_SLACK (so probabilities stay <= e^8, far inside FP32 and BF16
 * range); after the first blocks that almost never happens, which skips the
 * horizontal max and the rescale. The sum stays a 16-lane vector until the
 * end: no horizontal add per block either. */
static void att_softmax_row(att_scratch *s, int m, int lim, int masked, float scale) {
    const float *sr = s->s + m * ATT_BN;
    __m512 x[4];
    __mmask16 k[4], over = 0;
    const float m_old = s->mx[m];
    const __m512 bar = _mm512_set1_ps(m_old + ATT_SLACK);     /* -inf on the first block */
    for (int v = 0; v < 4; v++) {
        k[v] = masked ? (__mmask16)att_lane_mask(lim, 16 * v) : (__mmask16)0xffff;
        x[v] = _mm512_mul_ps(_mm512_loadu_ps(sr + 16 * v), _mm512_set1_ps(scale));
        over |= _mm512_mask_cmp_ps_mask(k[v], x[v], bar, _CMP_GT_OQ);
    }
    float m_new = m_old, alpha = 1.0f;
    if (over) {
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int v = 0; v < 4; v++) mv = _mm512_mask_max_ps(mv, k[v], mv, x[v]);
        m_new = _mm512_reduce_max_ps(mv);
        alpha = expf(m_old - m_new);                          /* m_old = -inf: 0 */
    }
    __m512 mb = _mm512_set1_ps(m_new), sum = _mm512_setzero_ps();
    uint16_t *pr = (uint16_t *)(s->p + m * (ATT_BN / 2));
    for (int v = 0; v < 4; v++) {
        /* masked lanes are exactly 0 (vf_exp clamps, it never returns 0) */
        __m512 e = _mm512_maskz_mov_ps(k[v], vf_exp(_mm512_sub_ps(x[v], mb)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(pr + 16 * v), bf16x16(e));
    }
    float *l = s->l + 16 * m;
    _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), _mm512_set1_ps(alpha), sum));
    s->mx[m] = m_new;
    s->alpha[m] = alpha;
}

static float att_row_sum(const att_scratch *s, int m) {
    return _mm512_reduce_add_ps(_mm512_loadu_ps(s->l + 16 * m));
}


/* ====================================================== FP32 path */
#else

/* Q [M][qs] FP32, zero past dq (AVX2 reads whole 8-lane chunks). */
static void att_load_q(const att_job *j, att_scratch *s, int h0, int i0, int rows) {
    float *q = (float *)s->q;
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < s->G; h++) {
            const void *src = att_row(&j->q, i0 + r, h0 + h);
            float *dst = q + (int64_t)(r * s->G + h) * j->qs;
            for (int d = 0; d < j->dq; d++) dst[d] = att_elem(&j->q, src, d);
            for (int d = j->dq; d < j->qs; d++) dst[d] = 0.0f;
        }
}

/* Generic: Kt [dq][BN], key-major inner rows so the score loop runs over keys.
 * AVX2: K rows [BN][qs], zero past dq. Either fits 4 qs BN bytes. */
static int64_t att_kblock_bytes(int qw, int dq) {
    (void)qw;
    return att_align(4 * (int64_t)att_qs(dq) * ATT_BN);
}
static int64_t att_vblock_bytes(int dvp) { return att_align(4 * (int64_t)ATT_BN * dvp); }

/* V rows [BN][dvp] FP32, zero past dv; keys past nk are zero. */
static void att_load_v(const att_job *j, void *dst_block, int g, int k0, int nk,
                       const int64_t *slots) {
    float *vt = (float *)dst_block;
    for (int t = 0; t < ATT_BN; t++) {
        const void *src = t < nk ? att_row(&j->v, att_key(slots, k0 + t), g) : NULL;
        float *dst = vt + (int64_t)t * j->dvp;
        int c = 0;
        if (src && !j->v.bf16) { memcpy(dst, src, 4 * (size_t)j->dv); c = j->dv; }
        else if (src)
            for (; c < j->dv; c++) dst[c] = bf16_to_f32(((const uint16_t *)src)[c]);
        for (; c < j->dvp; c++) dst[c] = 0.0f;
    }
}

#ifdef ATT_ROW_BLOCKS
/* ------------------------------------------------------ AVX2: rows in place
 * A key block is 64 K rows and 64 V rows named by pointer: in a decode the cache
 * rows themselves (BF16 widened in registers, two exact operations per 8), in a
 * prefill chunk the FP32 rows of the converted store. Nothing is transposed.
 *   score s[m][t]: lane l of one FP32 accumulator chains q[8i + l] k[t][8i + l]
 *     over the chunks i in order, then the 8 lanes add as
 *     ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) (att_hsum4);
 *   output o[m][c] = alpha o[m][c] + sum_t p[m][t] v[t][c], t in order.
 * Which tile shape, thread or path (store or cache rows) computes a query does
 * not enter those orders. */
#define ATT_VR 4                /* query vectors per output tile: 4 x 2 accumulators */
#ifndef ATT_PF_LOC
#define ATT_PF_LOC 3            /* into L1: locality 2 and 4 or 16 keys ahead measured the same */
#endif
#ifndef ATT_PF_AHEAD
#define ATT_PF_AHEAD 8
#endif
#define ATT_VN 2                /* (8 x 1 and 6 x 2 measured the same at G = 8) */

/* Elements [d, d + 8) of a row, as FP32. */
ALWAYS_INLINE __m256 att_row8(const void *row, int d, const int BF) {
    if (BF)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + d))),
            16));
    return _mm256_loadu_ps((const float *)row + d);
}

/* The 8-lane sums of a, b, c, d: ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). */
ALWAYS_INLINE __m128 att_hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 z = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
}

/* K rows [BN][qs] FP32 of a block (the store, or a ragged paged block). */
static void att_load_k(const att_job *j, void *dst, int g, int k0, int nk, const int64_t *slots) {
    float *kr = (float *)dst;
    for (int t = 0; t < nk; t++) {
        const void *src = att_row(&j->k, att_key(slots, k0 + t), g);
        float *row = kr + (int64_t)t * j->qs;
        for (int d = 0; d < j->dq; d++) row[d] = att_elem(&j->k, src, d);
        for (int d = j->dq; d < j->qs; d++) row[d] = 0.0f;
    }
}

/* The task's block of keys [k0, k0 + nk). A decode reads the cache rows where
 * they lie (head sizes in whole chunks: dq % 8, dv % 16 zero). A task reads one
 * head's 256 bytes of each 2 KiB cache slot, slots scattered in blocks of 16: no
 * hardware prefetcher follows that, and left to demand misses (one key's row at a
 * time in flight) the cache was read at ~2-3 GB/s, warm or cold. So the scores
 * fetch each key's K row ATT_PF_AHEAD keys ahead and its V row for att_values,
 * and att_fetch_rows the next block's first keys: 2-3x (a head-major cache
 * layout would let the prefetchers stream it). */
static void att_block(const att_job *j, att_scratch *s, int g, int k0, int nk,
                      const int64_t *slots) {
    if (j->paged && j->direct) {
        for (int t = 0; t < nk; t++) {
            int64_t key = slots[k0 + t];
            s->krow[t] = att_row(&j->k, key, g);
            s->vrow[t] = att_row(&j->v, key, g);
        }
        s->kbf = j->k.bf16;
        s->vbf = j->v.bf16;
        return;
    }
    const float *kb, *vb;
    if (j->paged) {
        att_load_k(j, s->kblk, g, k0, nk, slots);
        att_load_v(j, s->vblk, g, k0, nk, slots);
        kb = (const float *)s->kblk;
        vb = (const float *)s->vblk;
    } else {
        int64_t b = (int64_t)(g - j->g0) * j->nblocks + k0 / ATT_BN;
        kb = (const float *)(j->kstore + b * j->kbytes);
        vb = (const float *)(j->vstore + b * j->vbytes);
    }
    for (int t = 0; t < ATT_BN; t++) {
        s->krow[t] = kb + (int64_t)t * j->qs;
        s->vrow[t] = vb + (int64_t)t * j->dvp;
    }
    s->kbf = s->vbf = 0;
}

/* S[R][C keys] = Q[R] . K: each K chunk is loaded (and widened) once for R rows.
 * BF16 rows (a decode's cache): 8 rows x 1 key, so no chunk is widened twice (3
 * rows x 4 keys measured 1.2x slower at G = 8). FP32 rows (the prefill store):
 * 4 rows x 3 keys, 7 loads per 12 FMAs (8 x 1 measured 1.3-1.6x slower there). */
#define ATT_QK_MAX 16           /* accumulator room: the largest tile has 12 (room for 16 measured 1.1x faster) */
ALWAYS_INLINE void att_qk_tile(const float *q, int qs, const void *const *krow, float *s,
                               const int R, const int C, const int BF) {
    __m256 acc[ATT_QK_MAX + 3];
    for (int i = 0; i < R * C + 3; i++) acc[i] = _mm256_setzero_ps();
    for (int d = 0; d < qs; d += 8) {
        __m256 kv[4];
        for (int c = 0; c < C; c++) kv[c] = att_row8(krow[c], d, BF);
        for (int r = 0; r < R; r++) {
            const __m256 qv = _mm256_loadu_ps(q + (int64_t)r * qs + d);
            for (int c = 0; c < C; c++) acc[r * C + c] = _mm256_fmadd_ps(kv[c], qv, acc[r * C + c]);
        }
    }
    for (int i = 0; i < R * C; i += 4) {
        float sum[4];
        _mm_storeu_ps(sum, att_hsum4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
        for (int u = 0; u < 4 && i + u < R * C; u++)
            s[(i + u) / C * ATT_BN + (i + u) % C] = sum[u];
    }
}

#define ATT_QK_T(R, C, BF) att_qk_tile(q + (int64_t)m * j->qs, j->qs, s->krow + t, \
                                       s->s + m * ATT_BN + t, R, C, BF)
#define ATT_QK_BF16() do { switch (R) {                                      \
    case 1: ATT_QK_T(1, 1, 1); break;  case 2: ATT_QK_T(2, 1, 1); break;      \
    case 3: ATT_QK_T(3, 1, 1); break;  case 4: ATT_QK_T(4, 1, 1); break;      \
    case 5: ATT_QK_T(5, 1, 1); break;  case 6: ATT_QK_T(6, 1, 1); break;      \
    case 7: ATT_QK_T(7, 1, 1); break;  default: ATT_QK_T(8, 1, 1); break;     \
    } } while (0)
#define ATT_QK_F32_C(C) do { switch (R) {                                    \
    case 1: ATT_QK_T(1, C, 0); break;  case 2: ATT_QK_T(2, C, 0); break;      \
    case 3: ATT_QK_T(3, C, 0); break;  default: ATT_QK_T(4, C, 0); break;     \
    } } while (0)
#define ATT_QK_F32() do { switch (C) {                                       \
    case 1: ATT_QK_F32_C(1); break;  case 2: ATT_QK_F32_C(2); break;          \
    default: ATT_QK_F32_C(3); break; } } while (0)

/* Scores of the keys each tile's rows can see: on a masked block a query tile
 * stops at the last key its last row sees; lanes left unwritten are masked by
 * the softmax. Query tiles outermost, so a tile's Q rows stay in L1 while the
 * block's K rows come from L1 or L2 (keys outermost streamed every Q row from L2
 * per key: MLA's 64-128 latent heads a task ran 1.4-2x slower). */
static void att_scores(const att_job *j, att_scratch *s, int M, int lim0, int masked, int nk) {
    const float *q = (const float *)s->q;
    const int QR = s->kbf ? 8 : 4, KT = s->kbf ? 1 : 3;
    const int kl = ((s->kbf ? 2 : 4) * j->dq + 63) / 64, vl = ((s->vbf ? 2 : 4) * j->dv + 63) / 64;
    const int fetch = j->paged && j->direct;           /* the cache's rows (att_block) */
    for (int m = 0; m < M; m += QR) {
        const int R = M - m < QR ? M - m : QR;
        int seen = masked ? lim0 + (m + R - 1) / s->G + 1 : ATT_BN;   /* its last row's */
        if (seen > nk) seen = nk;
        for (int t = 0; t < seen; t += KT) {
            const int C = seen - t < KT ? seen - t : KT;
            if (fetch && m == 0) {      /* K rows ahead, V rows for att_values */
                if (t + ATT_PF_AHEAD < nk)
                    for (int l = 0; l < kl; l++)
                        __builtin_prefetch((const char *)s->krow[t + ATT_PF_AHEAD] + 64 * l, 0, ATT_PF_LOC);
                for (int l = 0; l < vl; l++)
                    __builtin_prefetch((const char *)s->vrow[t] + 64 * l, 0, ATT_PF_LOC);
            }
            if (s->kbf) ATT_QK_BF16();
            else ATT_QK_F32();
        }
    }
}

/* Online softmax over one block for row m (keys j <= lim visible), the AVX-512
 * body's steps in 8 lanes: the running max moves only when a score passes it by
 * ATT_SLACK, the sum stays an 8-lane vector until the end. */
static void att_softmax_row(att_scratch *s, int m, int lim, int masked, float scale) {
    float *sr = s->s + m * ATT_BN;
    __m256 x[8], k[8];
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const float m_old = s->mx[m];
    const __m256 bar = _mm256_set1_ps(m_old + ATT_SLACK);      /* -inf on the first block */
    int over = 0;
    for (int v = 0; v < 8; v++) {
        k[v] = masked ? _mm256_cmp_ps(lane, _mm256_set1_ps((float)(lim - 8 * v)), _CMP_LE_OQ)
                      : _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        x[v] = _mm256_mul_ps(_mm256_loadu_ps(sr + 8 * v), _mm256_set1_ps(scale));
        over |= _mm256_movemask_ps(_mm256_and_ps(k[v], _mm256_cmp_ps(x[v], bar, _CMP_GT_OQ)));
    }
    float m_new = m_old, alpha = 1.0f;
    if (over) {
        __m256 mv = _mm256_set1_ps(-INFINITY);
        for (int v = 0; v < 8; v++) mv = _mm256_max_ps(mv, _mm256_blendv_ps(mv, x[v], k[v]));
        m_new = vf_hmax(mv);
        alpha = expf(m_old - m_new);                           /* m_old = -inf: 0 */
    }
    __m256 mb = _mm256_set1_ps(m_new), sum = _mm256_setzero_ps();
    for (int v = 0; v < 8; v++) {
        /* masked lanes are exactly 0 (vf_exp clamps, it never returns 0) */
        __m256 e = _mm256_and_ps(k[v], vf_exp(_mm256_sub_ps(x[v], mb)));
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(sr + 8 * v, e);
    }
    float *l = s->l + 16 * m;
    _mm256_storeu_ps(l, _mm256_fmadd_ps(_mm256_loadu_ps(l), _mm256_set1_ps(alpha), sum));
    s->mx[m] = m_new;
    s->alpha[m] = alpha;
}


static float att_row_sum(const att_scratch *s, int m) {
    const float *l = s->l + 16 * m;
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* O[R][c0, c0 + 8 ATT_VN) = alpha O + P . V over keys [0, np). */
ALWAYS_INLINE void att_pv_tile(const float *p, const void *const *vrow, int np, float *o,
                               int dvp, const float *alpha, int c0, const int R, const int BF) {
    __m256 acc[ATT_VR][ATT_VN];
    for (int r = 0; r < R; r++) {
        __m256 a = _mm256_set1_ps(alpha[r]);
        for (int v = 0; v < ATT_VN; v++)
            acc[r][v] = _mm256_mul_ps(a, _mm256_loadu_ps(o + (int64_t)r * dvp + c0 + 8 * v));
    }
    for (int t = 0; t < np; t++) {
        __m256 vv[ATT_VN];
        for (int v = 0; v < ATT_VN; v++) vv[v] = att_row8(vrow[t], c0 + 8 * v, BF);
        for (int r = 0; r < R; r++) {
            __m256 pb = _mm256_broadcast_ss(p + r * ATT_BN + t);
            for (int v = 0; v < ATT_VN; v++) acc[r][v] = _mm256_fmadd_ps(pb, vv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < ATT_VN; v++)
            _mm256_storeu_ps(o + (int64_t)r * dvp + c0 + 8 * v, acc[r][v]);
}

#define ATT_PV_R(R, BF) att_pv_tile(s->s + m * ATT_BN, s->vrow, nk, s->o + (int64_t)m * j->dvp, \
                                    j->dvp, s->alpha + m, c0, R, BF)
#define ATT_PV(BF) do { switch (R) {                                         \
    case 1: ATT_PV_R(1, BF); break;  case 2: ATT_PV_R(2, BF); break;          \
    case 3: ATT_PV_R(3, BF); break;  default: ATT_PV_R(ATT_VR, BF); break;    \
    } } while (0)

/* Every key of the block, as the scalar twin (0 x a non-finite value is NaN). */
static void att_values(const att_job *j, att_scratch *s, int M, int nk, int lim0, int masked) {
    (void)lim0; (void)masked;
    for (int c0 = 0; c0 < j->dvp; c0 += 8 * ATT_VN)
        for (int m = 0; m < M; m += ATT_VR) {
            const int R = M - m < ATT_VR ? M - m : ATT_VR;
            if (s->vbf) ATT_PV(1);
            else ATT_PV(0);
        }
}

#else
/* ------------------------------------------------------ generic: plain loops */
static void att_load_k(const att_job *j, void *dst, int g, int k0, int nk, const int64_t *slots) {
    float *kt = (float *)dst;
    for (int t = 0; t < ATT_BN; t++) {
        const void *src = t < nk ? att_row(&j->k, att_key(slots, k0 + t), g) : NULL;
        for (int d = 0; d < j->dq; d++) kt[d * ATT_BN + t] = src ? att_elem(&j->k, src, d) : 0.0f;
    }
}

static void att_scores(const att_job *j, att_scratch *s, int M, int lim0, int masked, int nk) {
    (void)lim0; (void)masked; (void)nk;
    const float *q = (const float *)s->q, *kt = (const float *)s->k;
    for (int m = 0; m < M; m++) {
        float acc[ATT_BN] = {0};
        const float *qm = q + (int64_t)m * j->qs;
        for (int d = 0; d < j->dq; d++)
            for (int t = 0; t < ATT_BN; t++) acc[t] += qm[d] * kt[d * ATT_BN + t];
        memcpy(s->s + m * ATT_BN, acc, sizeof(acc));
    }
}

/* Online softmax over one block (P kept FP32 in the S rows). */
static void att_softmax(const att_job *j, att_scratch *s, int M, int lim0, int masked) {
    for (int m = 0; m < M; m++) {
        float *sr = s->s + m * ATT_BN;
        int lim = masked ? lim0 + m / s->G : ATT_BN - 1;
        int nv = lim + 1 < ATT_BN ? lim + 1 : ATT_BN;     /* visible keys: [0, nv) */
        float mx = -INFINITY;
        for (int t = 0; t < nv; t++) { sr[t] *= j->scale; mx = fmaxf(mx, sr[t]); }
        float m_new = fmaxf(s->mx[m], mx);
        float alpha = m_new == s->mx[m] ? 1.0f : expf(s->mx[m] - m_new);
        for (int t = 0; t < nv; t++) sr[t] = expf(sr[t] - m_new);
        float sum = 0.0f;
        for (int t = 0; t < nv; t++) sum += sr[t];
        for (int t = nv < 0 ? 0 : nv; t < ATT_BN; t++) sr[t] = 0.0f;
        s->l[16 * m] = s->l[16 * m] * alpha + sum;
        s->mx[m] = m_new;
        s->alpha[m] = alpha;
    }
}

static float att_row_sum(const att_scratch *s, int m) { return s->l[16 * m]; }

static void att_values(const att_job *j, att_scratch *s, int M, int nk, int lim0, int masked) {
    (void)lim0; (void)masked;
    const float *vt = (const float *)s->v;
    for (int m = 0; m < M; m++) {
        float *o = s->o + (int64_t)m * j->dvp;
        const float *pr = s->s + m * ATT_BN, a = s->alpha[m];
        for (int c = 0; c < j->dvp; c++) o[c] *= a;
        for (int t = 0; t < nk; t++)
            for (int c = 0; c < j->dvp; c++) o[c] += pr[t] * vt[(int64_t)t * j->dvp + c];
    }
}
#endif

#endif

/* ====================================================== register tiles
 * AVX-512 (BF16 pair words, vdpbf16ps) and AVX2 (FP32, FMA): one body over the
 * path's att_word / vpair / att_dot and vec.h's VL-lane vf. */
#ifdef ATT_BF16_DOT

/* The K block transposed to [words][BN]: 8 x 8 in registers, the tail words by
 * the scalar loop; keys past nk are zero. */
static void att_load_k(const att_job *j, void *dst, int g, int k0, int nk, const int64_t *slots) {
    att_word *kb = (att_word *)dst;
    const int n = att_k_words(j), in_place = att_k_in_place(j);
    att_word zero[n + 16], conv[in_place ? 1 : ATT_BN][in_place ? 1 : n + 1];
    memset(zero, 0, sizeof(zero));
    const float *rows[ATT_BN];
    for (int t = 0; t < ATT_BN; t++) {
        const void *src = t < nk ? att_row(&j->k, att_key(slots, k0 + t), g) : NULL;
        if (!src) rows[t] = (const float *)zero;
        else if (in_place) rows[t] = (const float *)src;
        else {
            att_k_convert(j, src, conv[t]);
            rows[t] = (const float *)conv[t];
        }
    }
    int p0 = 0;
#ifdef ATT_BF16_DOT
    for (; p0 + 16 <= n; p0 += 16)
        for (int t0 = 0; t0 < ATT_BN; t0 += 16)
            att_t16x16(rows + t0, p0, (float *)(kb + (int64_t)p0 * ATT_BN + t0));
#endif
    const int n8 = n & ~7;
    for (; p0 < n8; p0 += 8)
        for (int t0 = 0; t0 < ATT_BN; t0 += 8)
            att_t8x8(rows + t0, p0, (float *)(kb + (int64_t)p0 * ATT_BN + t0));
    for (int t = 0; t < ATT_BN; t++)
        for (int p = n8; p < n; p++)
            ((uint32_t *)kb)[p * ATT_BN + t] = ((const uint32_t *)rows[t])[p];
}

/* R (1 .. ATT_R) as a constant per case: the tile unrolls into registers. */
#define ATT_BY_R(CALL, NV) do { switch (R) {                                 \
    case 1: CALL(1, NV); break;  case 2: CALL(2, NV); break;                  \
    case 3: CALL(3, NV); break;  case 4: CALL(4, NV); break;                  \
    case 5: CALL(5, NV); break;  default: CALL(ATT_R, NV); break;             \
    } } while (0)

/* S[R][VL NV keys] = Q[R] . Kb (qn words a row): one K load feeds R rows. */
ALWAYS_INLINE void att_qk_tile(const att_word *q, int qn, const att_word *kb, float *s,
                               const int R, const int NV) {
    vf acc[ATT_R][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = vf_zero();
    for (int p = 0; p < qn; p++) {
        vpair kv[4];
        for (int v = 0; v < NV; v++) kv[v] = att_vload(kb + p * ATT_BN + VL * v);
        for (int r = 0; r < R; r++) {
            vpair qb = att_bcast(q + (int64_t)r * qn + p);
            for (int v = 0; v < NV; v++) acc[r][v] = att_dot(acc[r][v], kv[v], qb);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) vf_store(s + r * ATT_BN + VL * v, acc[r][v]);
}

#define ATT_QK(R, NV) att_qk_tile(q + (int64_t)m * qn, qn, kb + VL * v0, \
                                  s->s + m * ATT_BN + VL * v0, R, NV)

/* Scores of the visible key vectors only: on a masked (diagonal) block a
 * register tile stops at the last key its last row sees; the lanes left
 * unwritten are masked by the softmax. */
static void att_scores(const att_job *j, att_scratch *s, int M, int lim0, int masked, int nk) {
    (void)nk;
    const att_word *q = (const att_word *)s->q, *kb = (const att_word *)s->k;
    const int qn = att_k_words(j);
    for (int m = 0; m < M; m += ATT_R) {
        const int R = M - m < ATT_R ? M - m : ATT_R;
        int nv = ATT_BN / VL;
        if (masked) {
            int lim = lim0 + (m + R - 1) / s->G;        /* the tile's last row sees most */
            nv = lim < 0 ? 0 : lim / VL + 1 < nv ? lim / VL + 1 : nv;
        }
        for (int v0 = 0; v0 < nv; v0 += 4)
            switch (nv - v0) {
            case 1: ATT_BY_R(ATT_QK, 1); break;
            case 2: ATT_BY_R(ATT_QK, 2); break;
            case 3: ATT_BY_R(ATT_QK, 3); break;
            default: ATT_BY_R(ATT_QK, 4); break;
            }
    }
}

/* O[R][c0 + VL NV) = alpha O + P . Vb over the P words [0, np). */
ALWAYS_INLINE void att_pv_tile(const att_word *p, const att_word *vb, int dvp, int np, float *o,
                               const float *alpha, int c0, const int R, const int NV) {
    vf acc[ATT_R][4];
    for (int r = 0; r < R; r++) {
        vf a = vf_set1(alpha[r]);
        for (int v = 0; v < NV; v++)
            acc[r][v] = vf_mul(a, vf_load(o + (int64_t)r * dvp + c0 + VL * v));
    }
    for (int t = 0; t < np; t++) {
        vpair vv[4];
        for (int v = 0; v < NV; v++) vv[v] = att_vload(vb + (int64_t)t * dvp + c0 + VL * v);
        for (int r = 0; r < R; r++) {
            vpair pb = att_bcast(p + r * (ATT_BN / ATT_PW) + t);
            for (int v = 0; v < NV; v++) acc[r][v] = att_dot(acc[r][v], vv[v], pb);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) vf_store(o + (int64_t)r * dvp + c0 + VL * v, acc[r][v]);
}

#define ATT_PV(R, NV) att_pv_tile(p, vb, j->dvp, np, o, al, c0, R, NV)

static void att_values(const att_job *j, att_scratch *s, int M, int nk, int lim0, int masked) {
    const att_word *vb = (const att_word *)s->v;
    for (int m = 0; m < M; m += ATT_R) {
        const int R = M - m < ATT_R ? M - m : ATT_R;
        /* like the scores, a tile stops at the last key pair its last row sees (P is
         * 0 past it) */
        int seen = masked ? lim0 + (m + R - 1) / s->G + 1 : nk;
        const int np = ((seen < nk ? seen : nk) + 1) / 2;
        const att_word *p = ATT_P(s) + m * (ATT_BN / ATT_PW);
        float *o = s->o + (int64_t)m * j->dvp;
        const float *al = s->alpha + m;
        int c0 = 0;
        for (; c0 + 4 * VL <= j->dvp; c0 += 4 * VL) ATT_BY_R(ATT_PV, 4);
        for (; c0 < j->dvp; c0 += VL) ATT_BY_R(ATT_PV, 1);
    }
}
#endif

/* ====================================================== shared driver */
#if defined(ATT_BF16_DOT) || defined(ATT_ROW_BLOCKS)
static void att_softmax(const att_job *j, att_scratch *s, int M, int lim0, int masked) {
    for (int m = 0; m < M; m++) att_softmax_row(s, m, lim0 + m / s->G, masked, j->scale);
}
#endif

/* One task: query rows [qrow, qrow + rows) of heads [h0, h0 + hn) (of kv head g),
 * the first at position pos0, against keys [0, L) (through `slots` when paged). */
typedef struct { int g, h0, hn, qrow, rows, pos0, L; const int64_t *slots; } att_tile;

/* Task t of a pass: last tiles first (they cost the most), kv heads side by side.
 * Paged: t -> (query row b, kv head g, head group), every row one task per group. */
static att_tile att_tile_of(const att_job *j, int t) {
    att_tile a;
    if (j->paged) {
        int per_row = j->Hkv * j->hgroups, b = t / per_row, hg = t % j->hgroups;
        a.g = t % per_row / j->hgroups;
        a.h0 = a.g * j->G + hg * j->hn;
        a.hn = j->G - hg * j->hn < j->hn ? j->G - hg * j->hn : j->hn;
        a.qrow = b; a.rows = 1;
        a.L = (int)j->context[b]; a.pos0 = a.L - 1;
        a.slots = j->kslots + (int64_t)b * j->ldslots;
        return a;
    }
    int tile = j->ntiles - 1 - t / j->hc;
    a.g = j->g0 + t % j->hc;
    a.h0 = a.g * j->G; a.hn = j->G;
    a.qrow = tile * j->bm;
    a.rows = j->n - a.qrow < j->bm ? j->n - a.qrow : j->bm;
    a.L = j->L; a.pos0 = j->L - j->n + a.qrow;
    a.slots = NULL;
    return a;
}

/* The next task's q rows (read) and out rows (written), fetched a slice per
 * key block of the current task: at 512 tokens the q read and out write-allocate
 * are ~16 MB, a fifth of the time when left to demand misses. */
typedef struct {
    const uint8_t *q; int64_t q_ld; int q_lines;    /* per token: G heads of q */
    uint8_t *o; int64_t o_ld; int o_lines;          /* per token: G heads of out */
    int rows, done, total;
} att_prefetch;

static att_prefetch att_prefetch_for(const att_job *j, int t) {
    att_prefetch p;
    memset(&p, 0, sizeof(p));
    if (t >= j->ntasks || j->paged) return p;
    att_tile a = att_tile_of(j, t);
    int es = j->q.bf16 ? 2 : 4;
    p.rows = a.rows;
    p.q = (const uint8_t *)att_row(&j->q, a.qrow, a.h0);
    p.q_ld = j->q.ld * es;
    /* heads contiguous: one span per token; otherwise leave q to demand misses */
    p.q_lines = j->q.hs == j->dq ? (int)((4 + (int64_t)a.hn * j->dq * es + 63) / 64) : 0;
    p.o = (uint8_t *)(j->out + ((int64_t)a.qrow * j->H + a.h0) * j->dv);
    p.o_ld = 4 * (int64_t)j->H * j->dv;
    p.o_lines = (int)((4 + 4 * (int64_t)a.hn * j->dv + 63) / 64);
    p.total = p.rows * (p.q_lines + p.o_lines);
    return p;
}

static void att_prefetch_some(att_prefetch *p, int count) {
    int end = p->done + count < p->total ? p->done + count : p->total;
    for (int i = p->done; i < end; i++) {
        int qn = p->rows * p->q_lines;
        if (i < qn)
            __builtin_prefetch(p->q + (i / p->q_lines) * p->q_ld + 64 * (i % p->q_lines), 0, 2);
        else {
            int k = i - qn;
            __builtin_prefetch(p->o + (k / p->o_lines) * p->o_ld + 64 * (k % p->o_lines), 1, 2);
        }
    }
    p->done = end;
}

/* One task. A query's arithmetic depends on its position and its keys only:
 * key blocks of ATT_BN from key 0, each lane's products in one order, the same
 * online-softmax steps, whichever rows, heads or threads share the task, and
 * whether the rows are a prefill chunk or decodes (paged). So a position's
 * output is bit-identical however the engine batches or chunks it. (A masked
 * block's tile may run past a row's last key; there its probabilities are
 * exact zeros, which add nothing.) */
#ifdef ATT_ROW_BLOCKS
/* The cache rows (K and V, every line) of the first ATT_PF_AHEAD keys of the block
 * at k0, fetched while the block before it runs (see att_block). */
static void att_fetch_rows(const att_job *j, int g, int k0, const int64_t *slots, int L) {
    const int nk = L - k0 < ATT_PF_AHEAD ? L - k0 : ATT_PF_AHEAD;
    const int kl = (j->dq * (j->k.bf16 ? 2 : 4) + 63) / 64, vl = (j->dv * (j->v.bf16 ? 2 : 4) + 63) / 64;
    for (int t = 0; t < nk; t++) {
        const char *kr = (const char *)att_row(&j->k, slots[k0 + t], g);
        const char *vr = (const char *)att_row(&j->v, slots[k0 + t], g);
        for (int l = 0; l < kl; l++) __builtin_prefetch(kr + 64 * l, 0, ATT_PF_LOC);
        for (int l = 0; l < vl; l++) __builtin_prefetch(vr + 64 * l, 0, ATT_PF_LOC);
    }
}
#endif

static void att_task(const att_job *j, att_scratch *s, att_tile a, att_prefetch *pf) {
    const int g = a.g, i0 = a.qrow, rows = a.rows, M = rows * a.hn;
    const int pos0 = a.pos0, last = pos0 + rows - 1;
    const int per_block = (pf->total + last / ATT_BN) / (last / ATT_BN + 1);
    s->G = a.hn;
    att_load_q(j, s, a.h0, i0, rows);
    for (int m = 0; m < M; m++) s->mx[m] = -INFINITY;
    memset(s->l, 0, 64 * (size_t)M);
    memset(s->o, 0, 4 * (size_t)M * j->dvp);
    /* block 0 shows key 0 to every row, so each running max is finite after it */
    for (int k0 = 0; k0 <= last; k0 += ATT_BN) {
        const int nk_all = a.L - k0 < ATT_BN ? a.L - k0 : ATT_BN;
        const int masked = k0 + ATT_BN - 1 > pos0;    /* crosses some row's position */
        /* P is 0 past last */
        const int nk = masked && last + 1 - k0 < nk_all ? last + 1 - k0 : nk_all;
#ifdef ATT_ROW_BLOCKS
        att_block(j, s, g, k0, nk_all, a.slots);
        if (j->paged && j->direct && k0 + ATT_BN <= last) att_fetch_rows(j, g, k0 + ATT_BN, a.slots, a.L);
#else
        if (j->paged) {
            att_load_k(j, s->kblk, g, k0, nk_all, a.slots);
            att_load_v(j, s->vblk, g, k0, nk_all, a.slots);
            s->k = s->kblk;
            s->v = s->vblk;
        } else {
            int64_t b = (int64_t)(g - j->g0) * j->nblocks + k0 / ATT_BN;
            s->k = j->kstore + b * j->kbytes;
            s->v = j->vstore + b * j->vbytes;
        }
#endif
        att_prefetch_some(pf, per_block);
        att_scores(j, s, M, pos0 - k0, masked, nk);
        att_softmax(j, s, M, pos0 - k0, masked);
        att_values(j, s, M, nk, pos0 - k0, masked);
    }
    for (int m = 0; m < M; m++) {
        int r = m / a.hn, h = a.h0 + m % a.hn;
        float inv = 1.0f / att_row_sum(s, m);
        float *dst = j->out + ((int64_t)(i0 + r) * j->H + h) * j->dv;
        const float *o = s->o + (int64_t)m * j->dvp;
        for (int c = 0; c < j->dv; c++) dst[c] = o[c] * inv;
    }
}

/* Phase 1: every (kv head, key block) converted once into the stores; all
 * tasks of that kv head then read it (the conversion is a strided gather,
 * transpose and rounding: done per task it cost a third of the kernel). */
static void att_convert_worker(void *arg, int tid, int nthreads) {
    att_job *j = (att_job *)arg;
    int all = j->hc * j->nblocks;
    for (int b = tid; b < all; b += nthreads) {
        int g = j->g0 + b / j->nblocks, k0 = (b % j->nblocks) * ATT_BN;
        int nk = j->L - k0 < ATT_BN ? j->L - k0 : ATT_BN;
        att_load_k(j, j->kstore + b * j->kbytes, g, k0, nk, NULL);
        att_load_v(j, j->vstore + b * j->vbytes, g, k0, nk, NULL);
    }
}

static void att_worker(void *arg, int tid, int nthreads) {
    (void)nthreads;
    att_job *j = (att_job *)arg;
    att_scratch s = att_carve(j->scratch + tid * j->stride, j);
    /* one task claimed ahead, so its rows can be prefetched during this one */
    int t = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
    while (t < j->ntasks) {
        int ahead = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        att_prefetch pf = att_prefetch_for(j, ahead);
        att_task(j, &s, att_tile_of(j, t), &pf);
        t = ahead;
    }
}

/* kv heads converted and attended per pass: all of them unless their
 * converted K/V would pass g_att_store_bytes. */
static int att_heads_per_pass(int Hkv, int64_t nblocks, int64_t block_bytes) {
    int64_t hc = g_att_store_bytes / (nblocks * block_bytes);
    return hc < 1 ? 1 : hc > Hkv ? Hkv : (int)hc;
}

/* Bytes of workspace attention_forward needs: the converted K/V blocks of one
 * pass, then per-thread scratch. */
static int64_t attention_workspace_bytes(int n, int L, int H, int Hkv, int dq, int dv,
                                         int nthreads) {
    int G = H / Hkv, bm = att_bm(G), qw = (dq + 1) / 2, dvp = (dv + 15) & ~15;
    int64_t nblocks = (L + ATT_BN - 1) / ATT_BN;
    int64_t block = att_kblock_bytes(qw, dq) + att_vblock_bytes(dvp);
    if (bm > n) bm = n;
    return 64 + att_heads_per_pass(Hkv, nblocks, block) * nblocks * block
         + (int64_t)nthreads * att_stride(bm * G, qw, dq, dvp, 0);
}

/* out [n, H, dv] = causal attention of the chunk (see the spec block). The
 * caller checks the shapes: H % Hkv == 0, 1 <= n <= L, positive sizes. */
static void attention_forward(att_operand q, att_operand k, att_operand v, int n, int L, int H,
                              int Hkv, int dq, int dv, float scale, float *out,
                              uint8_t *workspace, int nthreads) {
    att_job j;
    memset(&j, 0, sizeof(j));
    j.q = q; j.k = k; j.v = v;
    j.n = n; j.L = L; j.H = H; j.Hkv = Hkv; j.dq = dq; j.dv = dv; j.G = H / Hkv;
    j.scale = scale; j.out = out;
    j.bm = att_bm(j.G);
    if (j.bm > n) j.bm = n;
    j.M = j.bm * j.G;
    j.qw = (dq + 1) / 2;
    j.qs = att_qs(dq);
    j.dvp = (dv + 15) & ~15;
    j.ntiles = (n + j.bm - 1) / j.bm;
    j.stride = att_stride(j.M, j.qw, dq, j.dvp, 0);
    j.nblocks = (L + ATT_BN - 1) / ATT_BN;
    j.kbytes = att_kblock_bytes(j.qw, dq);
    j.vbytes = att_vblock_bytes(j.dvp);
    int hc = att_heads_per_pass(Hkv, j.nblocks, j.kbytes + j.vbytes);
    j.kstore = (uint8_t *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    j.vstore = j.kstore + (int64_t)hc * j.nblocks * j.kbytes;
    j.scratch = j.vstore + (int64_t)hc * j.nblocks * j.vbytes;
    for (j.g0 = 0; j.g0 < Hkv; j.g0 += hc) {
        j.hc = Hkv - j.g0 < hc ? Hkv - j.g0 : hc;
        j.ntasks = j.ntiles * j.hc;
        atomic_init(&j.next, 0);
        int conv = j.hc * j.nblocks;
        pool_run(att_convert_worker, &j, conv < nthreads ? conv : nthreads);
        pool_run(att_worker, &j, j.ntasks < nthreads ? j.ntasks : nthreads);
    }
}

/* Set the per-pass store limit (bytes > 0); returns the previous one. */
static int64_t attention_store_limit(int64_t bytes) {
    int64_t old = g_att_store_bytes;
    if (bytes > 0) g_att_store_bytes = bytes;
    return old;
}

/* ====================================================== paged (decodes)
 * Query row b (one decode: q [B, H, dq]) attends keys 0 .. context[b] - 1, read
 * through its slot table: key t of kv head g is the row at
 * k.p + slots[b][t] * k.ld + g * k.hs (the same for v). The same per-query
 * arithmetic as attention_forward (att_task): a decode's output equals the
 * prefill's at that position, bit for bit. Tasks are (row, kv head, head
 * group), each converting its own key blocks into per-thread scratch (every
 * block is read by one task); a kv head's query heads are split into groups
 * only when there are fewer (row, kv head) pairs than threads (MLA's one
 * latent head). */
static int att_hgroups(int B, int Hkv, int G, int nthreads) {
    int pairs = B * Hkv, want = (nthreads + pairs - 1) / pairs;
    return want < 1 ? 1 : want > G ? G : want;
}

static int64_t attention_paged_workspace_bytes(int B, int H, int Hkv, int dq, int dv,
                                               int nthreads) {
    int G = H / Hkv, hg = att_hgroups(B, Hkv, G, nthreads), hn = (G + hg - 1) / hg;
    int qw = (dq + 1) / 2, dvp = (dv + 15) & ~15;
    int64_t blocks = att_kblock_bytes(qw, dq) + att_vblock_bytes(dvp);
    return 64 + (int64_t)nthreads * att_stride(hn, qw, dq, dvp, blocks);
}

/* Multiply-adds below which no thread is woken (a pool wake-up costs more). */
#define ATT_PAGED_SMALL (1024 * 1024)

/* out [B, H, dv] (contiguous) = each row's attention over its context. Returns 0;
 * 1 + b when context[b] is outside [1, ldslots]; -1 - i when slots.flat[i] (a
 * position some row reads) is outside [0, S). Nothing is read before the checks. */
static int64_t attention_paged(att_operand q, att_operand k, att_operand v,
                               const int64_t *slots, int64_t ldslots, const int64_t *context,
                               int64_t S, int B, int H, int Hkv, int dq, int dv, float scale,
                               float *out, uint8_t *workspace, int nthreads) {
    int64_t work = 0;
    for (int b = 0; b < B; b++) {
        if (context[b] < 1 || context[b] > ldslots) return 1 + b;
        const int64_t *row = slots + (int64_t)b * ldslots;
        for (int64_t t = 0; t < context[b]; t++)
            if (row[t] < 0 || row[t] >= S) return -1 - ((int64_t)b * ldslots + t);
        work += context[b];
    }
    work *= (int64_t)H * (dq + dv);
    if (work < ATT_PAGED_SMALL || nthreads < 1) nthreads = 1;
    att_job j;
    memset(&j, 0, sizeof(j));
    j.q = q; j.k = k; j.v = v;
    j.n = B; j.H = H; j.Hkv = Hkv; j.dq = dq; j.dv = dv; j.G = H / Hkv;
    j.scale = scale; j.out = out;
    j.paged = 1; j.kslots = slots; j.context = context; j.ldslots = ldslots;
    j.hgroups = att_hgroups(B, Hkv, j.G, nthreads);
    j.hn = (j.G + j.hgroups - 1) / j.hgroups;
    j.bm = 1; j.M = j.hn;
    j.qw = (dq + 1) / 2;
    j.qs = att_qs(dq);
    j.dvp = (dv + 15) & ~15;
    j.direct = dq % 8 == 0 && dv % 16 == 0;
    j.kbytes = att_kblock_bytes(j.qw, dq);
    j.vbytes = att_vblock_bytes(j.dvp);
    j.stride = att_stride(j.M, j.qw, dq, j.dvp, j.kbytes + j.vbytes);
    j.scratch = (uint8_t *)(((uintptr_t)workspace + 63) & ~(uintptr_t)63);
    j.ntasks = B * Hkv * j.hgroups;
    atomic_init(&j.next, 0);
    pool_run(att_worker, &j, j.ntasks < nthreads ? j.ntasks : nthreads);
    return 0;
}
#endif
