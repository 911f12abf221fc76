/* Dense linear on the CPU: y = x @ W^T over one packed matrix (the experts'
 * tile layout), for every linear outside the routed experts: attention
 * projections, dense MLPs, shared experts, the LM head.
 *
 * SHAPES (T tokens; R rows = out features; K = in features; Rp, Kp = R, K
 *         rounded up to 128)
 *   x      [T, K]   FP32 or BF16 activations
 *   W      packed [Rp/64 row tiles][Kp/128 k blocks] units (FP8, BF16 or INT4: `fp8`
 *          is the format code of expert_units.h), scales [Rp/64][Kp/128] FP32
 *          beside them (1.0 for BF16 and INT4, whose group scales are in its units)
 *   y      [T, R]   FP32 (no bias: the caller adds it)
 *
 * DEFINITION (unit_scalar in expert_units.h is the inner loop of the twin)
 *   y[t][r] = sum_kb scale[r/64][kb] * sum_{k in kb} W[r][k] * bf16(x[t][k])
 *
 * REGULARITIES  decode: T = 1..64 (the decode batch), every weight byte read
 *   once per step -> GEMV, memory bound: one task per row tile, FP8 widened in
 *   registers; at T <= DENSE_DECODE_MAX (8 on AVX-512 and AVX2, else 2) each thread claims its
 *   next tile one ahead and
 *   prefetches PF_BYTES ahead along its own stream (measured against a fixed
 *   distance past the current unit, which lands in another thread's tile:
 *   cold FP8 attention projections x1.1-1.5, the BF16 LM head x1.02-1.06).
 *   Each thread streams its own contiguous share of the row tiles front to
 *   back and, once done, takes the others' remaining tiles from their back
 *   ends (thread_pool.h, work shares). Against one cursor dealing tiles
 *   alternately, cold, 2 threads, as fractions of the read measured beside:
 *   at ~80 GB/s the LM head 88-92% (was 80-87%), FP8 q/k/v and o_proj 76-80%
 *   (66-73%); at ~50 GB/s 92-98% (87-90%) and 86-89% (82-85%).
 *   Prefill chunks: T = 256..4096 -> GEMM, compute
 *   bound: tasks are (row tile, block of 128 tokens); an FP8 unit is widened
 *   once into a BF16 scratch unit and reused by every group of 4 tokens.
 *
 * EXAMPLE  Qwen3-30B-A3B q_proj: R 4096, K 2048 -> 64 row tiles x 16 k blocks,
 *   8 MiB of FP8 units; the LM head (BF16): R 151936, K 2048 -> 2374 row tiles,
 *   622 MB, the largest single read of a decode step.
 *
 * PARALLEL PLAN  the experts' persistent pool; phase 1 converts x to BF16 rows
 *   (split by token rows), phase 2 claims tasks from one atomic cursor, row
 *   tile major so threads working on neighbouring tasks share the tile in L3.
 *   Each task owns its rows of y: no reduction, deterministic.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"
#include "expert_units.h"

#define DENSE_TOK_BLOCK 128     /* tokens per task: accumulators 128 x 64 FP32 = 32 KiB */
/* <= DENSE_DIRECT_MAX tokens: widen FP8 in registers, once per token pair; more: once
 * into a BF16 scratch unit that every pair reads from L1 (the same bits). Batched
 * decode on the 8-layer Qwen3-30B-A3B shape (AVX-512), paired: batch 4 x1.03, batch
 * 8 x1.03-1.07 against widening in registers up to 8 tokens.
 * <= DENSE_DECODE_MAX tokens: decode (each thread streams its own share of the row
 * tiles, prefetching along it, one tile claimed ahead). On AVX2 both are
 * UNIT_DIRECT_DECODE: the FP8 shift bodies beat widening up to 8 tokens (q_proj
 * FP8 3 / 4 / 8 tokens 15.7 / 12.7 / 6.6 GB/s against 6.3 / 5.9 / 4.2; BF16
 * q_proj 4 tokens 23.5 against 16.7-21 GB/s streamed as decode). On AVX-512
 * DENSE_DECODE_MAX is 8 and DENSE_DIRECT_MAX 4 (UNIT_DIRECT_TOKENS): Zen 4, cold,
 * paired against 2 and 2, the FP8 LM head at 4 tokens x1.35-2.2, the BF16 one at 8
 * x1.1-1.9; FP8 o_proj at 8 tokens was x0.7-0.8 widened in registers twice. */
#ifdef UNIT_DIRECT_DECODE
#define DENSE_DECODE_MAX UNIT_DIRECT_DECODE
#ifdef UNIT_DIRECT_TOKENS
#define DENSE_DIRECT_MAX UNIT_DIRECT_TOKENS
#else
#define DENSE_DIRECT_MAX UNIT_DIRECT_DECODE
#endif
#else
#define DENSE_DIRECT_MAX 2
#define DENSE_DECODE_MAX 2
#endif

typedef struct {
    const uint8_t *w;           /* [tiles][kblocks] units */
    const float *scale;         /* [tiles][kblocks] */
    int rows, cols, tiles, kblocks;
    int fp8;
} dense_matrix;

typedef struct {
    dense_matrix m;
    int T, Kp, ntb, scalar;
    int live_tiles;             /* row tiles holding real rows (the last 64 of a
                                   128-row pad may hold none) */
    const void *x;              /* [T, cols] FP32 or BF16 */
    int x_bf16;
    uint16_t *xb;               /* [T, Kp] BF16, zero padded */
    float *y;                   /* [T, rows] */
    atomic_int next;
    /* decode: thread i's share of the row tiles, (first << 32) | end, one per
     * cache line; claimed from the front by its owner, from the back by others */
    _Atomic uint64_t *shares;
    int nshares;
    uint8_t *scratch;           /* per thread: wide unit + accumulators */
    int64_t scratch_stride;
} dense_job;

static int64_t dense_scratch_stride(void) {
    return WIDE_UNIT_BYTES + 4 * (int64_t)DENSE_TOK_BLOCK * UNIT_ROWS + 64;
}

/* Bytes of workspace dense_forward needs for T tokens of K inputs. */
static int64_t dense_workspace_bytes(int T, int kblocks, int nthreads) {
    return 192 + 2 * (int64_t)T * kblocks * UNIT_K + (int64_t)nthreads * dense_scratch_stride()
        + (int64_t)nthreads * SHARE_STRIDE * 8;
}

/* Decode: the next tile of thread tid's own share, else the last one left of
 * the next non-empty share after it; -1 when every share is empty. */
static int dense_claim(dense_job *j, int tid) {
    int t;
    if (share_take(&j->shares[(tid % j->nshares) * SHARE_STRIDE], 1, 0, &t)) return t;
    for (int k = 1; k < j->nshares; k++)
        if (share_take(&j->shares[((tid + k) % j->nshares) * SHARE_STRIDE], 1, 1, &t)) return t;
    return -1;
}

static uint8_t *dense_carve(uint8_t **cur, int64_t bytes) {
    uint8_t *p = (uint8_t *)(((uintptr_t)*cur + 63) & ~(uintptr_t)63);
    *cur = p + bytes;
    return p;
}

/* ------------------------------------------------------------- phase 1 */
static void dense_convert_rows(dense_job *j, int t0, int t1) {
    const int K = j->m.cols;
    for (int t = t0; t < t1; t++) {
        uint16_t *dst = j->xb + (int64_t)t * j->Kp;
        if (j->x_bf16) memcpy(dst, (const uint16_t *)j->x + (int64_t)t * K, 2 * (size_t)K);
        else {
            const float *src = (const float *)j->x + (int64_t)t * K;
            for (int i = 0; i < K; i++) dst[i] = f32_to_bf16(src[i]);
        }
        memset(dst + K, 0, 2 * (size_t)(j->Kp - K));      /* padded k: finite zeros */
    }
}

static void dense_convert_worker(void *arg, int tid, int n) {
    dense_job *j = (dense_job *)arg;
    int per = (j->T + n - 1) / n, t0 = tid * per, t1 = t0 + per < j->T ? t0 + per : j->T;
    if (t0 < t1) dense_convert_rows(j, t0, t1);
}

/* ------------------------------------------------------------- phase 2 */
/* acc[n][64] += unit . x rows q.., groups of MAX_NT (constant nt per branch:
 * the body unrolls into registers). */
static void dense_unit_rows(const uint8_t *u, int fp8, const uint16_t *x, int ldx, int n,
                            float scale, float *acc, int scalar, const uint8_t *pf, int pf_fp8) {
#ifdef WIDE_NT
    if (!scalar && n > DENSE_DECODE_MAX && wide_rows_fmt(fp8)) {   /* prefill: up to 5 a pass */
        for (int q = 0, nt; q < n; q += nt) {
            const uint16_t *xk[WIDE_NT];
            nt = wide_take(n - q);
            for (int t = 0; t < nt; t++) xk[t] = x + (int64_t)(q + t) * ldx;
            unit_body_wide_any(u, fp8, xk, nt, scale, acc + q * UNIT_ROWS, q == 0 ? pf : NULL,
                               pf_fp8);
        }
        return;
    }
#endif
    for (int q = 0; q < n; q += MAX_NT) {
        const uint16_t *xk[MAX_NT];
        int nt = n - q < MAX_NT ? n - q : MAX_NT;
        for (int t = 0; t < nt; t++) xk[t] = x + (int64_t)(q + t) * ldx;
        float *o = acc + q * UNIT_ROWS;
        const uint8_t *p = q == 0 ? pf : NULL;           /* fetch each line once */
        if (scalar) { unit_scalar(u, fp8, xk, nt, scale, o); continue; }
        if (wf_int4(fp8)) {
            switch (nt) {
            case 1: unit_body_pf(u, fp8, xk, 1, scale, o, p, pf_fp8); break;
            case 2: unit_body_pf(u, fp8, xk, 2, scale, o, p, pf_fp8); break;
            case 3: unit_body_pf(u, fp8, xk, 3, scale, o, p, pf_fp8); break;
            default: unit_body_pf(u, fp8, xk, 4, scale, o, p, pf_fp8); break;
            }
        } else if (fp8) {
            switch (nt) {
            case 1: unit_body_pf(u, 1, xk, 1, scale, o, p, pf_fp8); break;
            case 2: unit_body_pf(u, 1, xk, 2, scale, o, p, pf_fp8); break;
            case 3: unit_body_pf(u, 1, xk, 3, scale, o, p, pf_fp8); break;
            default: unit_body_pf(u, 1, xk, 4, scale, o, p, pf_fp8); break;
            }
        } else {
            switch (nt) {
            case 1: unit_body_pf(u, 0, xk, 1, scale, o, p, pf_fp8); break;
            case 2: unit_body_pf(u, 0, xk, 2, scale, o, p, pf_fp8); break;
            case 3: unit_body_pf(u, 0, xk, 3, scale, o, p, pf_fp8); break;
            default: unit_body_pf(u, 0, xk, 4, scale, o, p, pf_fp8); break;
            }
        }
    }
}

static const uint8_t *dense_tile(const dense_matrix *m, int rt) {
    return m->w + (int64_t)rt * m->kblocks * unit_bytes_of(m->fp8);
}

/* The line PF_BYTES past byte `off` of this thread's stream: the rest of the
 * current tile, then the tile it claimed next (NULL: none, or past it). */
static const uint8_t *dense_ahead(const uint8_t *tile, const uint8_t *next, int64_t off,
                                  int64_t tile_bytes) {
    off += PF_BYTES;
    if (off < tile_bytes) return tile + off;
    off -= tile_bytes;
    return next && off < tile_bytes ? next + off : NULL;
}

/* Rows [64 rt, +64) of y for tokens [t0, t0 + n). `next` (decode: the tile this
 * thread claimed next, or NULL) is where the prefetch runs on to past this tile. */
static void dense_task(dense_job *j, int rt, int t0, int n, uint16_t *wide, float *acc,
                       const uint8_t *next) {
    const dense_matrix *m = &j->m;
    const int ub = unit_bytes_of(m->fp8);
    const uint8_t *tile = dense_tile(m, rt);
    const int stream = n <= DENSE_DECODE_MAX;    /* decode: prefetch along the own stream */
    const float *sc = m->scale + (int64_t)rt * m->kblocks;
    const uint16_t *x = j->xb + (int64_t)t0 * j->Kp;
    const int widen = wf_widens(m->fp8) && n > DENSE_DIRECT_MAX && !j->scalar;
    memset(acc, 0, sizeof(float) * (size_t)n * UNIT_ROWS);
    for (int kb = 0; kb < m->kblocks; kb++) {
        const uint8_t *u = tile + (int64_t)kb * ub;
        int ufp8 = m->fp8;
#ifdef UNIT_WIDEN
        if (widen) { unit_widen(u, m->fp8, wide); u = (const uint8_t *)wide; ufp8 = unit_widen_fmt(m->fp8); }
#else
        (void)widen; (void)wide;
#endif
        const uint8_t *pf = stream ? dense_ahead(tile, next, (int64_t)kb * ub,
                                                 (int64_t)m->kblocks * ub) : NULL;
        dense_unit_rows(u, ufp8, x + kb * UNIT_K, j->Kp, n, sc[kb], acc, j->scalar, pf, m->fp8);
    }
    int r0 = rt * UNIT_ROWS, nr = m->rows - r0 < UNIT_ROWS ? m->rows - r0 : UNIT_ROWS;
    for (int t = 0; t < n; t++)
        memcpy(j->y + (int64_t)(t0 + t) * m->rows + r0, acc + t * UNIT_ROWS, sizeof(float) * nr);
}

static void dense_worker(void *arg, int tid, int nthreads) {
    (void)nthreads;
    dense_job *j = (dense_job *)arg;
    uint8_t *s = j->scratch + tid * j->scratch_stride;
    uint16_t *wide = (uint16_t *)s;                             /* 64-aligned */
    float *acc = (float *)(s + WIDE_UNIT_BYTES);
    const int n_all = j->live_tiles * j->ntb;
    if (j->T <= DENSE_DECODE_MAX) {
        /* decode: one token block; each tile claimed one ahead, so the prefetch
         * past the current tile lands in the next one this thread reads (a fixed
         * distance past the current tile lands in the one another thread owns:
         * measured, small FP8 projections then stream at ~75% of the read rate) */
        int cur = dense_claim(j, tid);
        while (cur >= 0) {
            int nxt = dense_claim(j, tid);
            dense_task(j, cur, 0, j->T, wide, acc, nxt >= 0 ? dense_tile(&j->m, nxt) : NULL);
            cur = nxt;
        }
        return;
    }
    for (;;) {
        int task = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (task >= n_all) break;
        int rt = task / j->ntb, tb = task % j->ntb;
        int t0 = tb * DENSE_TOK_BLOCK;
        int n = j->T - t0 < DENSE_TOK_BLOCK ? j->T - t0 : DENSE_TOK_BLOCK;
        dense_task(j, rt, t0, n, wide, acc, NULL);
    }
}

/* ------------------------------------------------------------- caller side */
/* y[T, rows] = x[T, cols] @ W^T. `scalar` runs the scalar twin (tests). */
static void dense_forward(dense_matrix m, const void *x, int x_bf16, int T, float *y,
                          uint8_t *workspace, int nthreads, int scalar) {
    dense_job j;
    memset(&j, 0, sizeof(j));
    j.m = m; j.T = T; j.x = x; j.x_bf16 = x_bf16; j.y = y; j.scalar = scalar;
    j.Kp = m.kblocks * UNIT_K;
    j.ntb = (T + DENSE_TOK_BLOCK - 1) / DENSE_TOK_BLOCK;
    uint8_t *cur = workspace;
    j.xb = (uint16_t *)dense_carve(&cur, 2 * (int64_t)T * j.Kp);
    j.scratch_stride = dense_scratch_stride();
    j.scratch = dense_carve(&cur, nthreads * j.scratch_stride);
    j.shares = (_Atomic uint64_t *)dense_carve(&cur, (int64_t)nthreads * SHARE_STRIDE * 8);
    atomic_init(&j.next, 0);
    /* converting a decode row costs less than waking the pool */
    if (T >= 2 * nthreads && nthreads > 1) pool_run(dense_convert_worker, &j, nthreads);
    else dense_convert_rows(&j, 0, T);
    j.live_tiles = (m.rows + UNIT_ROWS - 1) / UNIT_ROWS;
    int tasks = j.live_tiles * j.ntb;
    int n = tasks < nthreads ? tasks : nthreads;
    j.nshares = n > 0 ? n : 1;
    for (int i = 0; i < j.nshares; i++)         /* decode: contiguous shares of the tiles */
        atomic_init(&j.shares[i * SHARE_STRIDE],
                    share_range((int64_t)j.live_tiles * i / j.nshares,
                                (int64_t)j.live_tiles * (i + 1) / j.nshares));
    pool_run(dense_worker, &j, n);
}
