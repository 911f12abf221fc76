/* Fused routed-experts forward on the CPU: one call per MoE layer.
 *
 * SHAPES (T tokens, k experts per token, E experts, H hidden, I intermediate;
 *         Hp, Ip = H, I rounded up to 128; S = T*k routed slots)
 *   x        [T, H]   FP32 or BF16 activations
 *   ids      [T, k]   int64 expert ids;   wts [T, k] FP32 routing weights
 *   gate, up [E] x packed [Ip/64 row tiles][Hp/128 k blocks] units, scales [E][Ip/64][Hp/128]
 *            (units FP8, BF16 or INT4 with their group scales inside: `fp8` is the
 *            format code of expert_units.h)
 *   down     [E] x packed [Hp/64 row tiles][Ip/128 k blocks] units, scales [E][Hp/64][Ip/128]
 *   y        [T, H]   FP32
 *
 * DEFINITION
 *   y[t] = sum_j wts[t,j] * down_e (silu(gate_e x[t]) * up_e x[t]),  e = ids[t,j]
 *
 * REGULARITIES  decode: T = 1..64 with k = 8 -> 1..8 tokens per expert;
 *   prefill chunks: T = 512 -> tens of tokens per expert. Experts 8..384.
 *
 * EXAMPLE  Qwen3-30B-A3B: H 2048, I 768, E 128, k 8: a decode token reads
 *   8 x 3 x 1.5 MiB of FP8 units = 37.7 MB per layer.
 *
 * PARALLEL PLAN  (all threads of the persistent pool, one atomic task cursor)
 *   tasks [0, A*Tgu):       (active expert a, row tile of I): gate and up
 *                            together, then h = silu(g) * u as BF16
 *   tasks [A*Tgu, +A*Td):   (a, row tile of H): down for a's slots; waits only
 *                            for a's gate/up tiles (per-expert barrier), then
 *                            adds into y in expert order (per-tile turn), so
 *                            the sum is deterministic and never races.
 *   Tasks are claimed in order, so every wait is on a task already claimed by
 *   a running thread: no deadlock, no global barrier. Each thread claims a
 *   few tasks ahead (two consecutive tiles per claim in decode) and prefetches
 *   PF_BYTES ahead along its own claimed tiles (moe_worker).
 *   Decode: thread i's shares (thread_pool.h, work shares) are rows
 *   i/n..(i+1)/n of every active expert's gate/up, expert by expert, and the
 *   same rows of every down: each thread streams runs of contiguous tiles,
 *   and the per-row-tile turn of the down sums stays within one share. A
 *   thread done with its gate/up share takes the others' next ones from their
 *   fronts; only once every gate/up task is claimed does it claim downs (own
 *   share first, then the others' fronts). So every task still waits only on
 *   tasks claimed before it, as with the one cursor. Measured with the dense
 *   decode's shares (dense_kernels.c), 12-layer Qwen3-30B-A3B-shaped FP8 model,
 *   2 threads, same process, alternating: a token in 21.8-23.3 ms against
 *   23.4-24.7 ms with one cursor each when the machine read ~80 GB/s; 31-34
 *   against 32-35 ms at ~48 GB/s.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"
#include "expert_units.h"

#define SLOT_BLOCK 128          /* slots per pass over a row tile: bounds scratch */
#define DIRECT_MAX 8            /* <= this many slots: widen FP8 in registers */

typedef struct {
    const uint8_t *w;           /* layer base: [E][tiles][kblocks] units */
    const float *scale;         /* [E][tiles][kblocks] */
    int64_t w_stride;           /* bytes per expert */
    int64_t s_stride;           /* floats per expert */
    int tiles, kblocks;
} packed_matrix;

typedef struct {
    packed_matrix gate, up, down;
    int fp8, H, I, Hp, Ip, E, T, k;
    /* routing (built by the caller) */
    int n_active;
    int claim;                  /* consecutive tasks taken per cursor bump */
    const int *active;          /* [A] expert ids */
    const int *offs;            /* [A+1] slot offsets */
    const int *slot_tok;        /* [S] token of each slot, grouped by expert */
    const float *slot_w;        /* [S] routing weight */
    /* activations */
    const uint16_t *xb;         /* [T, Hp] BF16 */
    uint16_t *hb;               /* [S, Ip] BF16 */
    float *y;                   /* [T, H] */
    /* synchronisation */
    atomic_int next;            /* task cursor (no shares) */
    _Atomic uint64_t *shares;   /* decode: each thread's gate/up range of positions in
                                   order[], then each thread's down range */
    int *order;                 /* [n_all] task at each position, share after share */
    int nshares;                /* threads (2 * nshares shares) */
    atomic_int *gu_done;        /* [A] finished gate/up tiles */
    atomic_int *turn;           /* [Hp/64] expert whose down may add next */
    /* per-thread scratch */
    uint8_t *scratch;
    int64_t scratch_stride;
} moe_job;

/* The bytes a thread streams next, in order: the tiles of its current task and
 * of the tasks it has already claimed. Decode prefetches PF_BYTES ahead along
 * this plan, so the lines fetched are ones this thread will read itself. */
#ifndef CLAIM_DECODE
#define CLAIM_DECODE 2          /* tasks per cursor bump in decode */
#endif
#define PLAN_TASKS (2 * CLAIM_DECODE)
#define PLAN_SEGS (2 * PLAN_TASKS)
typedef struct {
    const uint8_t *seg[PLAN_SEGS];
    int64_t len[PLAN_SEGS];
    int n;
} stream_plan;

/* The unit PF_BYTES after byte `off` of the plan, or NULL past its end. */
static inline const uint8_t *plan_ahead(const stream_plan *p, int64_t off) {
    off += PF_BYTES;
    for (int i = 0; i < p->n; i++) {
        if (off < p->len[i]) return p->seg[i] + off;
        off -= p->len[i];
    }
    return NULL;
}

static inline const uint8_t *tile_base(const packed_matrix *m, int e, int rt, int fp8) {
    return m->w + e * m->w_stride + (int64_t)rt * m->kblocks * unit_bytes_of(fp8);
}

/* out[n][64] += unit . (rows[q] + off), q < n: up to WIDE_NT tokens a pass where the
 * ISA has those bodies and the unit is BF16 or widened INT4 (prefill), else groups of
 * MAX_NT. pf (or NULL) is fetched during the first pass; pf_fmt its format. */
static void unit_token_passes(const uint8_t *u, int ufp8, const uint16_t *const *rows,
                              int64_t off, int n, float scale, float *out, const uint8_t *pf,
                              int pf_fmt) {
#ifdef WIDE_NT
    if (n > DIRECT_MAX && wide_rows_fmt(ufp8)) {        /* prefill: up to 5 tokens a pass */
        for (int q = 0, nt; q < n; q += nt) {
            const uint16_t *xk[WIDE_NT];
            nt = wide_take(n - q);
            for (int t = 0; t < nt; t++) xk[t] = rows[q + t] + off;
            unit_body_wide_any(u, ufp8, xk, nt, scale, out + q * UNIT_ROWS, q == 0 ? pf : NULL,
                               pf_fmt);
        }
        return;
    }
#endif
    for (int q = 0; q < n; q += MAX_NT) {
        const uint16_t *xk[MAX_NT];
        int nt = n - q < MAX_NT ? n - q : MAX_NT;
        for (int t = 0; t < nt; t++) xk[t] = rows[q + t] + off;
        float *o = out + q * UNIT_ROWS;
        /* constant nt per branch: the body unrolls into registers */
        const uint8_t *p = q == 0 ? pf : NULL;      /* fetch each line once */
        if (wf_int4(ufp8)) {
            switch (nt) {
            case 1: unit_body_pf(u, ufp8, xk, 1, scale, o, p, pf_fmt); break;
            case 2: unit_body_pf(u, ufp8, xk, 2, scale, o, p, pf_fmt); break;
            case 3: unit_body_pf(u, ufp8, xk, 3, scale, o, p, pf_fmt); break;
            default: unit_body_pf(u, ufp8, xk, 4, scale, o, p, pf_fmt); break;
            }
        } else if (ufp8) {
            switch (nt) {
            case 1: unit_body_pf(u, 1, xk, 1, scale, o, p, pf_fmt); break;
            case 2: unit_body_pf(u, 1, xk, 2, scale, o, p, pf_fmt); break;
            case 3: unit_body_pf(u, 1, xk, 3, scale, o, p, pf_fmt); break;
            default: unit_body_pf(u, 1, xk, 4, scale, o, p, pf_fmt); break;
            }
        } else {
            switch (nt) {
            case 1: unit_body_pf(u, 0, xk, 1, scale, o, p, pf_fmt); break;
            case 2: unit_body_pf(u, 0, xk, 2, scale, o, p, pf_fmt); break;
            case 3: unit_body_pf(u, 0, xk, 3, scale, o, p, pf_fmt); break;
            default: unit_body_pf(u, 0, xk, 4, scale, o, p, pf_fmt); break;
            }
        }
    }
}

/* out[n][64] += W-tile(rt) . x rows, over all k blocks. The tile starts at
 * byte `at` of the thread's stream plan (NULL: no prefetch). */
static void tile_matmul(const packed_matrix *m, int e, int rt, int fp8,
                        const uint16_t *const *rows, int n, float *out, uint16_t *wide,
                        const stream_plan *plan, int64_t at) {
    const int ub = unit_bytes_of(fp8);
    const uint8_t *tile = tile_base(m, e, rt, fp8);
    const float *sc = m->scale + e * m->s_stride + (int64_t)rt * m->kblocks;
    const int widen = wf_widens(fp8) && n > DIRECT_MAX;
    for (int kb = 0; kb < m->kblocks; kb++) {
        const uint8_t *pf = plan ? plan_ahead(plan, at + (int64_t)kb * ub) : NULL;
        const uint8_t *u = tile + (int64_t)kb * ub;
        int ufp8 = fp8;
#ifdef UNIT_WIDEN
        if (widen) {
            unit_widen(u, fp8, wide);
            u = (const uint8_t *)wide;
            ufp8 = unit_widen_fmt(fp8);
        }
#else
        (void)widen; (void)wide;
#endif
        unit_token_passes(u, ufp8, rows, kb * UNIT_K, n, sc[kb], out, pf, fp8);
    }
}

typedef struct { float *g, *u; uint16_t *wide; const uint16_t *rows[SLOT_BLOCK]; } thread_scratch;

static thread_scratch scratch_of(moe_job *job, int tid) {
    thread_scratch s;
    uint8_t *base = job->scratch + tid * job->scratch_stride;
    s.wide = (uint16_t *)base;                                 /* WIDE_UNIT_BYTES, 64-aligned */
    s.g = (float *)(base + WIDE_UNIT_BYTES);
    s.u = s.g + SLOT_BLOCK * UNIT_ROWS;
    return s;
}

static void gate_up_task(moe_job *job, int a, int rt, thread_scratch *s,
                         const stream_plan *plan) {
    const int64_t tile_bytes = (int64_t)job->gate.kblocks * unit_bytes_of(job->fp8);
    int e = job->active[a];
    for (int s0 = job->offs[a]; s0 < job->offs[a + 1]; s0 += SLOT_BLOCK) {
        int n = job->offs[a + 1] - s0 < SLOT_BLOCK ? job->offs[a + 1] - s0 : SLOT_BLOCK;
        for (int j = 0; j < n; j++) s->rows[j] = job->xb + (int64_t)job->slot_tok[s0 + j] * job->Hp;
        memset(s->g, 0, sizeof(float) * (size_t)n * UNIT_ROWS);
        memset(s->u, 0, sizeof(float) * (size_t)n * UNIT_ROWS);
        tile_matmul(&job->gate, e, rt, job->fp8, s->rows, n, s->g, s->wide, plan, 0);
        tile_matmul(&job->up, e, rt, job->fp8, s->rows, n, s->u, s->wide, plan, tile_bytes);
        for (int j = 0; j < n; j++)
            silu_mul_bf16(s->g + j * UNIT_ROWS, s->u + j * UNIT_ROWS,
                          job->hb + (int64_t)(s0 + j) * job->Ip + rt * UNIT_ROWS, UNIT_ROWS);
    }
}

static void down_task(moe_job *job, int a, int rt, thread_scratch *s,
                      const stream_plan *plan) {
    int e = job->active[a];
    int r0 = rt * UNIT_ROWS, nr = job->H - r0 < UNIT_ROWS ? job->H - r0 : UNIT_ROWS;
    spin_until_eq(&job->gu_done[a], job->gate.tiles);       /* per-expert barrier */
    int first = job->offs[a], total = job->offs[a + 1] - first;
    int single = total <= SLOT_BLOCK;
    if (!single) spin_until_eq(&job->turn[rt], a);          /* hold the turn for all blocks */
    for (int s0 = first; s0 < first + total; s0 += SLOT_BLOCK) {
        int n = first + total - s0 < SLOT_BLOCK ? first + total - s0 : SLOT_BLOCK;
        for (int j = 0; j < n; j++) s->rows[j] = job->hb + (int64_t)(s0 + j) * job->Ip;
        memset(s->g, 0, sizeof(float) * (size_t)n * UNIT_ROWS);
        tile_matmul(&job->down, e, rt, job->fp8, s->rows, n, s->g, s->wide, plan, 0);
        if (single) spin_until_eq(&job->turn[rt], a);
        for (int j = 0; j < n; j++) {
            float w = job->slot_w[s0 + j];
            float *yo = job->y + (int64_t)job->slot_tok[s0 + j] * job->H + r0;
            const float *d = s->g + j * UNIT_ROWS;
            for (int r = 0; r < nr; r++) yo[r] += w * d[r];
        }
    }
    atomic_store_explicit(&job->turn[rt], a + 1, memory_order_release);
}

/* Append task's weight tiles to the plan. */
static void plan_add(const moe_job *job, int task, stream_plan *p) {
    const int n_gu = job->n_active * job->gate.tiles, ub = unit_bytes_of(job->fp8);
    if (task < n_gu) {
        int a = task / job->gate.tiles, rt = task % job->gate.tiles;
        int64_t len = (int64_t)job->gate.kblocks * ub;
        p->seg[p->n] = tile_base(&job->gate, job->active[a], rt, job->fp8);
        p->len[p->n++] = len;
        p->seg[p->n] = tile_base(&job->up, job->active[a], rt, job->fp8);
        p->len[p->n++] = len;
    } else {
        task -= n_gu;
        int a = task / job->down.tiles, rt = task % job->down.tiles;
        p->seg[p->n] = tile_base(&job->down, job->active[a], rt, job->fp8);
        p->len[p->n++] = (int64_t)job->down.kblocks * ub;
    }
}

static inline int job_task_segs(const moe_job *job, int task) {
    return task < job->n_active * job->gate.tiles ? 2 : 1;
}

static void run_task(moe_job *job, int task, thread_scratch *s, const stream_plan *plan) {
    const int n_gu = job->n_active * job->gate.tiles;
    if (task < n_gu) {
        int a = task / job->gate.tiles;
        gate_up_task(job, a, task % job->gate.tiles, s, plan);
        atomic_fetch_add_explicit(&job->gu_done[a], 1, memory_order_release);
    } else {
        task -= n_gu;
        down_task(job, task / job->down.tiles, task % job->down.tiles, s, plan);
    }
}

/* Up to `want` tasks at consecutive positions, the first in *first: gate/up
 * from the thread's own share, else from the front of the next non-empty one;
 * then downs the same way (or from the one cursor when there are no shares).
 * -> how many (0: none left). */
static int moe_claim(moe_job *job, int tid, int want, int n_all, int *first) {
    if (!job->shares) {
        *first = atomic_fetch_add_explicit(&job->next, want, memory_order_relaxed);
        return *first >= n_all ? 0 : (n_all - *first < want ? n_all - *first : want);
    }
    const int n = job->nshares;
    for (int phase = 0; phase < 2; phase++)
        for (int k = 0; k < n; k++) {
            int got = share_take(&job->shares[(phase * n + (tid + k) % n) * SHARE_STRIDE], want,
                                 0, first);
            if (got) return got;
        }
    return 0;
}

/* Tasks are claimed from the shared cursor `claim` at a time (consecutive
 * tiles: contiguous weights, and half the contended atomics when a task is a
 * ~2 us decode tile), up to PLAN_TASKS ahead until the claimed tiles cover
 * the prefetch distance, and run in claim order. Waits stay deadlock-free:
 * the lowest unfinished claimed task is always running (a thread's queued
 * tasks are higher than its current one), and it waits only on
 * lower-numbered tasks, all finished or running. */
static void moe_worker(void *arg, int tid, int nthreads) {
    (void)nthreads;
    moe_job *job = (moe_job *)arg;
    thread_scratch s = scratch_of(job, tid);
    const int n_all = job->n_active * (job->gate.tiles + job->down.tiles);
    int queue[PLAN_TASKS], nq = 0, drained = 0;
    for (;;) {
        stream_plan plan = {.n = 0};
        int64_t ahead = 0;                 /* planned bytes after the current task */
        for (int i = 0; i < nq; i++) plan_add(job, queue[i], &plan);
        for (int i = job_task_segs(job, nq ? queue[0] : 0); i < plan.n; i++) ahead += plan.len[i];
        while (!drained && nq + job->claim <= PLAN_TASKS && (nq == 0 || ahead < PF_BYTES)) {
            int first, got = moe_claim(job, tid, job->claim, n_all, &first);
            if (!got) { drained = 1; break; }
            for (int pos = first; pos < first + got; pos++) {
                int task = job->order ? job->order[pos] : pos;
                int before = plan.n;
                plan_add(job, task, &plan);
                for (int i = before; i < plan.n; i++) ahead += plan.len[i];
                if (nq == 0) ahead = 0;    /* the first one is the current task */
                queue[nq++] = task;
            }
        }
        if (nq == 0) break;
        run_task(job, queue[0], &s, &plan);
        for (int i = 1; i < nq; i++) queue[i - 1] = queue[i];
        nq--;
    }
}

/* ------------------------------------------------------------- caller side */

/* Bytes of workspace moe_forward needs (routing, activations, scratch). */
static int64_t moe_workspace_bytes(int T, int k, int E, int Hp, int Ip, int nthreads) {
    int64_t S = (int64_t)T * k;
    int64_t b = 0;
    b += 64 + 4 * (int64_t)E * 3;                      /* counts, active, offs */
    b += 64 + 8 * S;                                   /* slot_tok, slot_w */
    b += 64 + 4 * ((int64_t)E + Hp / UNIT_ROWS + 2);   /* gu_done, turn */
    b += 64 + 2 * (int64_t)T * Hp;                     /* xb */
    b += 64 + 2 * S * Ip;                              /* hb */
    b += 64 + (int64_t)nthreads * (WIDE_UNIT_BYTES + 2 * 4 * SLOT_BLOCK * UNIT_ROWS + 64);
    int64_t A = S < E ? S : E;                         /* active experts, at most */
    b += 64 + 4 * A * (Ip / UNIT_ROWS + Hp / UNIT_ROWS);   /* order */
    b += 64 + 16 * (int64_t)nthreads * SHARE_STRIDE;       /* shares */
    return b;
}

/* Decode's shares: thread i takes row tiles [i/n, (i+1)/n) of every active
 * expert's gate/up, then of every down, each expert in turn (see the plan). */
static void moe_shares(moe_job *job, int n) {
    const int A = job->n_active, Tg = job->gate.tiles, Td = job->down.tiles;
    int pos = 0;
    for (int phase = 0; phase < 2; phase++)
        for (int i = 0; i < n; i++) {
            int start = pos, T = phase ? Td : Tg;
            for (int a = 0; a < A; a++)
                for (int rt = T * i / n; rt < T * (i + 1) / n; rt++)
                    job->order[pos++] = phase ? A * Tg + a * Td + rt : a * Tg + rt;
            atomic_init(&job->shares[(phase * n + i) * SHARE_STRIDE], share_range(start, pos));
        }
    job->nshares = n;
}

static void *carve(uint8_t **cur, int64_t bytes) {
    uint8_t *p = (uint8_t *)(((uintptr_t)*cur + 63) & ~(uintptr_t)63);
    *cur = p + bytes;
    return p;
}

/* Counting sort of the T*k slots by expert. Returns -1-index of a bad id. */
static int64_t route(moe_job *job, const int64_t *ids, const float *wts, int *counts,
                     int *active, int *offs, int *slot_tok, float *slot_w) {
    const int64_t S = (int64_t)job->T * job->k;
    memset(counts, 0, sizeof(int) * job->E);
    for (int64_t i = 0; i < S; i++) {
        if (ids[i] < 0 || ids[i] >= job->E) return -1 - i;
        counts[ids[i]]++;
    }
    int A = 0, off = 0;
    for (int e = 0; e < job->E; e++) {
        if (!counts[e]) continue;
        active[A] = e;
        offs[A++] = off;
        int c = counts[e];
        counts[e] = off;                               /* now: next free slot of e */
        off += c;
    }
    offs[A] = off;
    job->n_active = A;
    for (int64_t i = 0; i < S; i++) {
        int p = counts[ids[i]]++;
        slot_tok[p] = (int)(i / job->k);
        slot_w[p] = wts[i];
    }
    return 0;
}

static void convert_x(const void *x, int x_bf16, int T, int H, int Hp, uint16_t *xb) {
    for (int t = 0; t < T; t++) {
        uint16_t *dst = xb + (int64_t)t * Hp;
        if (x_bf16) memcpy(dst, (const uint16_t *)x + (int64_t)t * H, 2 * (size_t)H);
        else
            f32_row_to_bf16((const float *)x + (int64_t)t * H, dst, H);
        memset(dst + H, 0, 2 * (size_t)(Hp - H));      /* padded k: finite zeros */
    }
}

/* y = fused MoE(x). Returns 0, or -1-i when ids[i] is out of range. */
static int64_t moe_forward(packed_matrix gate, packed_matrix up, packed_matrix down, int fp8,
                           int E, int H, int I, const void *x, int x_bf16, int T, int k,
                           const int64_t *ids, const float *wts, float *y,
                           uint8_t *workspace, int nthreads) {
    moe_job job;
    memset(&job, 0, sizeof(job));
    job.gate = gate; job.up = up; job.down = down;
    job.fp8 = fp8; job.E = E; job.H = H; job.I = I; job.T = T; job.k = k;
    job.Hp = gate.kblocks * UNIT_K;
    job.Ip = down.kblocks * UNIT_K;
    int64_t S = (int64_t)T * k;
    uint8_t *cur = workspace;
    int *counts = carve(&cur, 4 * (int64_t)E), *active = carve(&cur, 4 * (int64_t)E);
    int *offs = carve(&cur, 4 * ((int64_t)E + 1));
    int *slot_tok = carve(&cur, 4 * S);
    float *slot_w = carve(&cur, 4 * S);
    job.gu_done = carve(&cur, 4 * (int64_t)E);
    job.turn = carve(&cur, 4 * (int64_t)down.tiles);
    uint16_t *xb = carve(&cur, 2 * (int64_t)T * job.Hp);
    job.hb = carve(&cur, 2 * S * job.Ip);
    job.scratch_stride = WIDE_UNIT_BYTES + 2 * 4 * SLOT_BLOCK * UNIT_ROWS + 64;
    job.scratch = carve(&cur, nthreads * job.scratch_stride);
    int *order = carve(&cur, 4 * (int64_t)(T * (int64_t)k < E ? T * (int64_t)k : E)
                               * (gate.tiles + down.tiles));
    _Atomic uint64_t *shares = carve(&cur, 16 * (int64_t)nthreads * SHARE_STRIDE);

    int64_t bad = route(&job, ids, wts, counts, active, offs, slot_tok, slot_w);
    if (bad) return bad;
    job.active = active; job.offs = offs; job.slot_tok = slot_tok; job.slot_w = slot_w;
    int most = 0;
    for (int a = 0; a < job.n_active; a++)
        if (offs[a + 1] - offs[a] > most) most = offs[a + 1] - offs[a];
    job.claim = most <= DIRECT_MAX ? CLAIM_DECODE : 1; /* decode: short tasks */
    if (most <= DIRECT_MAX && nthreads > 1) {
        job.order = order;
        job.shares = shares;
        moe_shares(&job, nthreads);
    }
    for (int a = 0; a < job.n_active; a++) atomic_init(&job.gu_done[a], 0);
    for (int r = 0; r < down.tiles; r++) atomic_init(&job.turn[r], 0);
    atomic_init(&job.next, 0);
    convert_x(x, x_bf16, T, H, job.Hp, xb);
    job.xb = xb;
    job.y = y;
    memset(y, 0, sizeof(float) * (size_t)T * H);
    pool_run(moe_worker, &job, nthreads);
    return 0;
}

/* Exposed for tests: one unit against nt token rows (the body this ISA runs); past
 * MAX_NT tokens, prefill's passes (unit_token_passes; the scalar twin MAX_NT at a time). */
static void unit_apply(const uint8_t *w, int fp8, const uint16_t *x, int ldx, int nt,
                       float scale, float *out, int scalar) {
    if (nt > MAX_NT) {
        const uint16_t *rows[SLOT_BLOCK];
        if (nt > SLOT_BLOCK) nt = SLOT_BLOCK;
        for (int t = 0; t < nt; t++) rows[t] = x + (int64_t)t * ldx;
        if (!scalar) { unit_token_passes(w, fp8, rows, 0, nt, scale, out, NULL, fp8); return; }
        for (int q = 0; q < nt; q += MAX_NT)
            unit_scalar(w, fp8, rows + q, nt - q < MAX_NT ? nt - q : MAX_NT, scale,
                        out + q * UNIT_ROWS);
        return;
    }
    const uint16_t *xk[MAX_NT];
    for (int t = 0; t < MAX_NT; t++) xk[t] = x + (int64_t)(t < nt ? t : 0) * ldx;
    if (scalar) { unit_scalar(w, fp8, xk, nt, scale, out); return; }
    if (wf_int4(fp8)) unit_body(w, fp8, xk, nt, scale, out);
    else if (fp8) unit_body(w, 1, xk, nt < 1 ? 1 : nt, scale, out);
    else unit_body(w, 0, xk, nt, scale, out);
}

/* Exposed for tests: the widening prefill uses (this ISA's, or the scalar twin's). */
static int unit_widen_apply(const uint8_t *w, int fmt, uint16_t *dst, int scalar) {
    if (wf_int4(fmt) && scalar) unit_widen_q4_scalar(w, fmt, dst);
#ifdef UNIT_WIDEN
    else unit_widen(w, fmt, dst);
#else
    else if (wf_int4(fmt)) unit_widen_q4_scalar(w, fmt, dst);
    else return -1;
#endif
    return unit_widen_fmt(fmt);
}

static void kernels_init(void) { fp8_tables_init(); }
