/* A decode step's decoder layers in one compiled call: GQA attention over the
 * paged cache and routed experts, layer after layer, with no Python between
 * the kernels (moed/backends/cpu/decode_stack.py decides which models and steps).
 *
 * Included after dense_kernels.c, expert_kernels.c, glue_kernels.c and
 * decode_kernels.c in the same translation unit (experts_ext.pxi declares them
 * in that order): it calls their entry points, nothing of its own but the loop.
 *
 * SHAPES (B decodes, D hidden, H query heads, Hkv kv heads, d head dim,
 *         R = H + Hkv, Q = rows of the fused q/k/v projection, E experts)
 *   x    [B, D] FP32 residual stream, updated in place
 *   h    [B, D] FP32: in, input_norm(x) of the first layer; out, the final
 *        norm of x (what the LM head reads)
 *   cs, sn [B, d/2] FP32 rotary tables, token stride ldcs
 *   slot_mapping [B] int64: the cache slot of each new token
 *   slots [B, ldslots] int64, context [B] int64: each decode's slot row
 *   routed [layers, B, k] int64 (or NULL): each layer's expert ids, kept for
 *        the caller (load statistics, the benchmarks' bytes per step)
 *
 * DEFINITION  per layer, what the Python path (moed/model/attention.py,
 *   moe.py, base.py with the compiled hooks) runs, call for call:
 *   y = qkv(h); qk = norm_rope(y[:, qk0 : qk0 + R d]); store k, v = y[:, v0 :];
 *   a = decode_attention(qk[:, :H]); x += o(a); h = post_norm(x);
 *   ids, w = router(h); x += experts(h, ids, w); h = next_norm(x).
 *   The same kernels, inputs and thread count, so the same bits.
 *
 * Per layer this saves the ~150 us of Python between its eight kernel calls
 * (Qwen3-30B-A3B shape, 2 cores): about 1.7 ms of a 24-30 ms decode step.
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    dense_matrix qkv, o;
    int qk0, v0;                /* columns of q (then k) and of v in qkv's output */
    int H, Hkv, d;
    const float *qk_w;          /* [R, d] per-head norm weights, or NULL (rotary only) */
    float qk_eps, scale;
    kv_operand kc, vc;          /* the layer's cache (set every step) */
    int64_t S;
    const float *post_w;
    float post_eps;
    const void *router_w;       /* [E, D] FP32 or BF16 */
    int router_bf16, E, topk, renorm;
    packed_matrix gate, up, down;
    int fp8, I;
    const float *next_w;        /* the next layer's input norm, or the final norm */
    float next_eps;
} stack_layer;

typedef struct {
    uint8_t *kernel_ws;
    float *y, *qk, *att, *o, *logits, *wts, *moe;
    int64_t *ids;
} stack_buffers;

static int64_t stack_align(int64_t b) { return (b + 63) & ~(int64_t)63; }

static int64_t stack_kernel_bytes(const stack_layer *L, int nl, int B, int nthreads) {
    int64_t most = 0, b;
    for (int l = 0; l < nl; l++) {
        const stack_layer *s = &L[l];
        b = dense_workspace_bytes(B, s->qkv.kblocks, nthreads); most = b > most ? b : most;
        b = dense_workspace_bytes(B, s->o.kblocks, nthreads); most = b > most ? b : most;
        b = moe_workspace_bytes(B, s->topk, s->E, s->gate.kblocks * UNIT_K,
                                s->down.kblocks * UNIT_K, nthreads);
        most = b > most ? b : most;
        b = decode_workspace_bytes(B, s->H, s->Hkv, s->d, s->d, nthreads); most = b > most ? b : most;
    }
    return stack_align(most + 64);
}

/* The largest per-token buffer sizes over the layers: q/k/v rows, q+k heads
 * x d, q heads x d, experts, experts per token. */
typedef struct { int64_t Q, R, A, E, K; } stack_dims;

static stack_dims stack_max_dims(const stack_layer *L, int nl) {
    stack_dims m = {0, 0, 0, 0, 0};
    for (int l = 0; l < nl; l++) {
        const stack_layer *s = &L[l];
        int64_t R = (int64_t)(s->H + s->Hkv) * s->d, A = (int64_t)s->H * s->d;
        m.Q = s->qkv.rows > m.Q ? s->qkv.rows : m.Q;
        m.R = R > m.R ? R : m.R;
        m.A = A > m.A ? A : m.A;
        m.E = s->E > m.E ? s->E : m.E;
        m.K = s->topk > m.K ? s->topk : m.K;
    }
    return m;
}

/* Carves the buffers from ws (NULL: only sizes them); -> bytes used. */
static int64_t stack_carve(const stack_layer *L, int nl, int B, int D, int nthreads,
                           uint8_t *ws, stack_buffers *b) {
    stack_dims m = stack_max_dims(L, nl);
    int64_t sizes[9] = {stack_kernel_bytes(L, nl, B, nthreads), 4 * B * m.Q, 4 * B * m.R,
                        4 * B * m.A, 4 * (int64_t)B * D, 4 * B * m.E, 8 * B * m.K,
                        4 * B * m.K, 4 * (int64_t)B * D};
    int64_t off[10] = {0};
    for (int i = 0; i < 9; i++) off[i + 1] = off[i] + stack_align(sizes[i]);
    if (ws) {
        uint8_t *p = (uint8_t *)(((uintptr_t)ws + 63) & ~(uintptr_t)63);
        b->kernel_ws = p;
        b->y = (float *)(p + off[1]);
        b->qk = (float *)(p + off[2]);
        b->att = (float *)(p + off[3]);
        b->o = (float *)(p + off[4]);
        b->logits = (float *)(p + off[5]);
        b->ids = (int64_t *)(p + off[6]);
        b->wts = (float *)(p + off[7]);
        b->moe = (float *)(p + off[8]);
    }
    return 64 + off[9];
}

/* Bytes of workspace stack_run needs for B decodes. */
static int64_t stack_workspace_bytes(const stack_layer *L, int nl, int B, int D, int nthreads) {
    return stack_carve(L, nl, B, D, nthreads, NULL, NULL);
}

/* Runs every layer. Returns 0; else the failing kernel's code (kv_store's -1 - n
 * for a bad slot_mapping[n]; decode_attention's 1 + b for a bad context[b] or
 * -1 - i for a bad slots.flat[i]) with *fail_layer and *fail_stage (1: store,
 * 2: attention, 3: experts) saying where; the layers before it have run. */
static int64_t stack_run(const stack_layer *L, int nl, float *x, float *h, int B, int D,
                         const float *cs, const float *sn, int64_t ldcs,
                         const int64_t *slot_mapping, const int64_t *slots, int64_t ldslots,
                         const int64_t *context, int64_t *routed, uint8_t *ws,
                         int nthreads, int *fail_layer, int *fail_stage) {
    stack_buffers b;
    stack_carve(L, nl, B, D, nthreads, ws, &b);
    for (int l = 0; l < nl; l++) {
        const stack_layer *s = &L[l];
        const int R = s->H + s->Hkv, Q = s->qkv.rows;
        int64_t rc;
        *fail_layer = l;
        dense_forward(s->qkv, h, 0, B, b.y, b.kernel_ws, nthreads, 0);
        qk_norm_rope(b.y + s->qk0, Q, B, R, s->d, s->qk_w, s->qk_eps, cs, sn, ldcs, b.qk,
                     nthreads);
        rc = kv_store(s->kc, s->vc, b.qk + (int64_t)s->H * s->d, (int64_t)R * s->d, s->d,
                      b.y + s->v0, Q, s->d, slot_mapping, B, s->S, s->Hkv, s->d, s->d);
        if (rc) { *fail_stage = 1; return rc; }
        rc = decode_attention(b.qk, (int64_t)R * s->d, s->d, s->kc, s->vc, slots, ldslots,
                              context, s->S, B, s->H, s->Hkv, s->d, s->d, s->scale, b.att,
                              b.kernel_ws, nthreads);
        if (rc) { *fail_stage = 2; return rc; }
        dense_forward(s->o, b.att, 0, B, b.o, b.kernel_ws, nthreads, 0);
        add_rms_norm(x, D, b.o, D, B, D, s->post_w, s->post_eps, h, nthreads);
        router_softmax_topk(h, s->router_w, s->router_bf16, B, D, s->E, s->topk, s->renorm,
                            b.logits, b.ids, b.wts, nthreads);
        if (routed) {
            memcpy(routed, b.ids, sizeof(int64_t) * (size_t)B * s->topk);
            routed += (int64_t)B * s->topk;
        }
        rc = moe_forward(s->gate, s->up, s->down, s->fp8, s->E, D, s->I, h, 0, B, s->topk,
                         b.ids, b.wts, b.moe, b.kernel_ws, nthreads);
        if (rc) { *fail_stage = 3; return rc; }
        add_rms_norm(x, D, b.moe, D, B, D, s->next_w, s->next_eps, h, nthreads);
    }
    return 0;
}
