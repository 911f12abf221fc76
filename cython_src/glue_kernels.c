/* Per-head RMS norm and rotary embedding of attention's q and k in one pass
 * (the glue between the fused q/k/v projection and the KV cache).
 *
 * SHAPES (N tokens, R = heads of q and k together, d head dim, h = d / 2)
 *   x      [N, R, d] FP32, token stride ldx (a column view of the fused q/k/v
 *          projection output), head stride d
 *   w      [R, d] FP32 per-head norm weights, or NULL: rotary only (no norm)
 *   cs, sn [N, h] FP32 cos and sin of each token's position (attention
 *          scaling folded in), token stride ldcs
 *   out    [N, R, d] FP32, contiguous
 *
 * DEFINITION (rotate-half convention; the torch path in moed/model/layers.py)
 *   y = w ? w * x / sqrt(mean(x^2) + eps) : x           per (token, head) row
 *   out[j]     = y[j] * cs[j] - y[j + h] * sn[j]        j < h
 *   out[j + h] = y[j + h] * cs[j] + y[j] * sn[j]
 *
 * REGULARITIES  decode: N = 1..64 (a few rows: one thread); prefill chunks:
 *   N = 512 -> 18K rows of 128 that torch runs as ~10 full passes over
 *   9 MB tensors; here one read and one write, split by rows over the pool.
 *   Plain C: the compiler vectorises the loops for each ISA build.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "thread_pool.h"
#include "vec.h"

#define GLUE_PARALLEL_ROWS 256      /* fewer (token, head) rows: the caller's thread */
#define NORM_LANES 16               /* independent sums: every ISA build vectorises them */
#define ROUTER_LANES 32             /* two vector chains: one left a dot FMA-latency bound */

typedef struct {
    const float *x, *w, *cs, *sn;
    float *out;
    int64_t ldx, ldcs;
    int N, R, d;
    float eps;
} qk_job;

static void qk_rows(const qk_job *j, int64_t r0, int64_t r1) {
    const int d = j->d, h = d / 2;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t t = r / j->R;
        const int head = (int)(r % j->R);
        const float *x = j->x + t * j->ldx + (int64_t)head * d;
        const float *c = j->cs + t * j->ldcs, *s = j->sn + t * j->ldcs;
        float *o = j->out + r * d;
        float inv = 1.0f;
        const float *w = NULL;
        if (j->w) {
            float ss = 0.0f;
            for (int i = 0; i < d; i++) ss += x[i] * x[i];
            inv = 1.0f / sqrtf(ss / (float)d + j->eps);
            w = j->w + (int64_t)head * d;
        }
        for (int i = 0; i < h; i++) {
            float a = x[i] * inv, b = x[i + h] * inv;
            if (w) {
                a *= w[i];
                b *= w[i + h];
            }
            o[i] = a * c[i] - b * s[i];
            o[i + h] = b * c[i] + a * s[i];
        }
    }
}

static void qk_worker(void *arg, int tid, int n) {
    const qk_job *j = (const qk_job *)arg;
    const int64_t rows = (int64_t)j->N * j->R;
    qk_rows(j, rows * tid / n, rows * (tid + 1) / n);
}

static void qk_norm_rope(const float *x, int64_t ldx, int N, int R, int d, const float *w,
                         float eps, const float *cs, const float *sn, int64_t ldcs, float *out,
                         int nthreads) {
    qk_job j = {.x = x, .w = w, .cs = cs, .sn = sn, .out = out, .ldx = ldx, .ldcs = ldcs,
                .N = N, .R = R, .d = d, .eps = eps};
    if ((int64_t)N * R < GLUE_PARALLEL_ROWS || nthreads <= 1)
        qk_rows(&j, 0, (int64_t)N * R);
    else
        pool_run(qk_worker, &j, nthreads);
}

/* Softmax routing (Mixtral, Qwen-MoE) for T tokens over E experts: logits
 * x . W^T in FP32 (like the torch path's float32 matmul, another summation
 * order), softmax, the k largest (lowest id first on ties), optionally
 * renormalised to sum 1.
 *
 * SHAPES  x [T, D] FP32, W [E, D] FP32, or BF16 (w_bf16: the checkpoint's own
 *         router weight; widening BF16 to FP32 is exact, so the products are
 *         those of the upcast matrix, from half the bytes) -> ids [T, k] int64,
 *         wts [T, k] FP32; logits [T, E] FP32 scratch from the caller.
 * PARALLEL PLAN  the T x E dot products split in equal flat ranges over the
 *   pool (decode: one token, the experts split); softmax and selection per
 *   token on the caller (E values a token). Each dot runs in 32 independent
 *   lanes, which every ISA build vectorises into two FMA chains (one chain
 *   left the [128, 2048] decode router latency bound: 36 us warm).
 */
typedef struct {
    const float *x;
    const void *w;
    float *logits;
    int T, D, E, w_bf16;
} router_job;

static float router_dot(const float *x, const void *wv, int bf16, int D) {
    float acc[ROUTER_LANES] = {0};
    int i = 0;
    if (bf16) {
        const uint16_t *w = (const uint16_t *)wv;
        for (; i + ROUTER_LANES <= D; i += ROUTER_LANES)
            for (int l = 0; l < ROUTER_LANES; l++) {
                const uint32_t bits = (uint32_t)w[i + l] << 16;
                float f;
                memcpy(&f, &bits, 4);
                acc[l] += x[i + l] * f;
            }
        for (; i < D; i++) {
            const uint32_t bits = (uint32_t)w[i] << 16;
            float f;
            memcpy(&f, &bits, 4);
            acc[0] += x[i] * f;
        }
    } else {
        const float *w = (const float *)wv;
        for (; i + ROUTER_LANES <= D; i += ROUTER_LANES)
            for (int l = 0; l < ROUTER_LANES; l++) acc[l] += x[i + l] * w[i + l];
        for (; i < D; i++) acc[0] += x[i] * w[i];
    }
    float s = 0.0f;
    for (int l = 0; l < ROUTER_LANES; l++) s += acc[l];
    return s;
}

static void router_dots(const router_job *j, int64_t f0, int64_t f1) {
    const int64_t wsz = j->w_bf16 ? 2 : 4;
    for (int64_t f = f0; f < f1; f++)
        j->logits[f] = router_dot(j->x + (f / j->E) * j->D,
                                  (const uint8_t *)j->w + (f % j->E) * j->D * wsz, j->w_bf16,
                                  j->D);
}

static void router_worker(void *arg, int tid, int n) {
    const router_job *j = (const router_job *)arg;
    const int64_t all = (int64_t)j->T * j->E;
    router_dots(j, all * tid / n, all * (tid + 1) / n);
}

/* logits [T, E] = x W^T: each dot in the one order above, whichever thread takes it
 * (a token's logits do not depend on the batch). */
static void router_logits(const float *x, const void *w, int w_bf16, int T, int D, int E,
                          float *logits, int nthreads) {
    router_job j = {.x = x, .w = w, .logits = logits, .T = T, .D = D, .E = E, .w_bf16 = w_bf16};
    if ((int64_t)T * E * D < (1 << 16) || nthreads <= 1) router_dots(&j, 0, (int64_t)T * E);
    else pool_run(router_worker, &j, nthreads);
}

static void router_softmax_topk(const float *x, const void *w, int w_bf16, int T, int D, int E,
                                int k, int renorm, float *logits, int64_t *ids, float *wts,
                                int nthreads) {
    router_logits(x, w, w_bf16, T, D, E, logits, nthreads);
    for (int t = 0; t < T; t++) {
        float *l = logits + (int64_t)t * E;
        float mx = l[0], sum = 0.0f;
        for (int e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        for (int e = 0; e < E; e++) sum += (l[e] = expf(l[e] - mx));
        float picked = 0.0f;
        for (int s = 0; s < k; s++) {          /* k scans: k is small (2..8) */
            int best = -1;
            for (int e = 0; e < E; e++)
                if (l[e] >= 0.0f && (best < 0 || l[e] > l[best])) best = e;
            if (best < 0) {                      /* NaN logits: a valid id, NaN weight */
                ids[(int64_t)t * k + s] = s % E;
                wts[(int64_t)t * k + s] = NAN;
                picked = NAN;
                continue;
            }
            ids[(int64_t)t * k + s] = best;
            wts[(int64_t)t * k + s] = l[best] / sum;
            picked += l[best] / sum;
            l[best] = -1.0f;                     /* taken (probabilities are >= 0) */
        }
        if (renorm)
            for (int s = 0; s < k; s++) wts[(int64_t)t * k + s] /= picked;
    }
}

/* Residual add and RMS norm in one pass (the glue around every decoder layer).
 *
 * SHAPES  x [N, D] FP32 (token stride ldx): the residual stream, updated in place
 *         when delta is given; delta [N, D] FP32 (token stride ldd) or NULL;
 *         w [D] FP32; out [N, D] FP32 contiguous.
 * DEFINITION (moed/model/layers.py RMSNorm.add / __call__)
 *   x   <- x + delta                                   (when delta)
 *   out  = w * (x * (1 / sqrt(mean(x^2) + eps)))        per token
 * REGULARITIES  decode: N = 1..64 rows of D = 2K..7K (caller's thread, one read
 *   of x and delta, one write each of x and out, where torch runs 7 ops with a
 *   temporary each); prefill chunks split by rows over the pool. The sum of
 *   squares runs in 16 independent lanes so that every ISA build vectorises it
 *   (a plain serial sum would not be reordered without -ffast-math).
 */
#define NORM_PARALLEL_ELEMS (1 << 16)   /* fewer elements: the caller's thread */

typedef struct {
    float *x, *out;
    const float *delta, *w;
    int64_t ldx, ldd;
    int N, D;
    float eps;
} norm_job;

static void norm_rows(const norm_job *j, int t0, int t1) {
    const int D = j->D;
    for (int t = t0; t < t1; t++) {
        float *x = j->x + (int64_t)t * j->ldx, *o = j->out + (int64_t)t * D;
        float acc[NORM_LANES] = {0};
        int i = 0;
        if (j->delta) {
            const float *dl = j->delta + (int64_t)t * j->ldd;
            for (; i + NORM_LANES <= D; i += NORM_LANES)
                for (int l = 0; l < NORM_LANES; l++) {
                    float v = x[i + l] + dl[i + l];
                    x[i + l] = v;
                    acc[l] += v * v;
                }
            for (; i < D; i++) {
                x[i] += dl[i];
                acc[0] += x[i] * x[i];
            }
        } else {
            for (; i + NORM_LANES <= D; i += NORM_LANES)
                for (int l = 0; l < NORM_LANES; l++) acc[l] += x[i + l] * x[i + l];
            for (; i < D; i++) acc[0] += x[i] * x[i];
        }
        float ss = 0.0f;
        for (int l = 0; l < NORM_LANES; l++) ss += acc[l];
        const float inv = 1.0f / sqrtf(ss / (float)D + j->eps);
        for (i = 0; i < D; i++) o[i] = j->w[i] * (x[i] * inv);
    }
}

static void norm_worker(void *arg, int tid, int n) {
    const norm_job *j = (const norm_job *)arg;
    norm_rows(j, (int)((int64_t)j->N * tid / n), (int)((int64_t)j->N * (tid + 1) / n));
}

static void add_rms_norm(float *x, int64_t ldx, const float *delta, int64_t ldd, int N, int D,
                         const float *w, float eps, float *out, int nthreads) {
    norm_job j = {.x = x, .out = out, .delta = delta, .w = w, .ldx = ldx, .ldd = ldd,
                  .N = N, .D = D, .eps = eps};
    if ((int64_t)N * D < NORM_PARALLEL_ELEMS || nthreads <= 1 || N < 2)
        norm_rows(&j, 0, N);
    else
        pool_run(norm_worker, &j, nthreads < N ? nthreads : N);
}

/* Greedy sampling: the index of each row's largest value (the first on ties;
 * the first NaN when a row has one, like torch.argmax).
 *
 * SHAPES  x [B, V] FP32, row stride ldx -> ids [B] int64.
 * REGULARITIES  V = 32K..256K logits a row, read twice from cache-warm memory:
 *   a vector max (NaNs flagged aside: max_ps(v, m) keeps m when v is NaN),
 *   then the first block holding it. Explicit intrinsics: the compiler leaves
 *   the NaN-aware max loop scalar (~70 us a 150K row; this is ~10 us).
 */
static int64_t argmax_row(const float *x, int64_t V) {
    int64_t i = 0;
    int nan = 0;
    float m = -INFINITY;
#ifdef VL
    vf mv = vf_set1(-INFINITY);
    vf_nans nv = vf_nans_none();
    for (; i + VL <= V; i += VL) {
        const vf v = vf_load(x + i);
        nv = vf_nans_add(nv, v);
        mv = vf_max(v, mv);
    }
    m = vf_hmax(mv);
    nan = vf_nans_any(nv);
#endif
    for (; i < V; i++) {
        nan |= x[i] != x[i];
        m = x[i] > m ? x[i] : m;
    }
    i = 0;
#ifdef VL
    const vf target = vf_set1(m);
    for (; i + VL <= V; i += VL) {
        const vf v = vf_load(x + i);
        const unsigned hit = nan ? vf_nan_bits(v) : vf_eq_bits(v, target);
        if (hit) return i + __builtin_ctz(hit);
    }
#endif
    for (; i < V; i++)
        if (nan ? x[i] != x[i] : x[i] == m) return i;
    return 0;                                  /* all -inf: the first, like torch */
}

static void argmax_rows(const float *x, int64_t ldx, int B, int64_t V, int64_t *ids) {
    for (int b = 0; b < B; b++) ids[b] = argmax_row(x + (int64_t)b * ldx, V);
}
