# The Cython side of one ISA's expert extension: declares the C entry points
# and hands them raw pointers with the GIL released. Included by
# _kernels_avx512.pyx, _kernels_avx2.pyx and _kernels_generic.pyx, which differ
# only in the compiler flags setup.py gives them.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uintptr_t

cdef extern from "expert_kernels.c" nogil:
    const char *UNIT_ISA
    int FP8_UNIT_BYTES
    int BF16_UNIT_BYTES
    ctypedef struct packed_matrix:
        const uint8_t *w
        const float *scale
        int64_t w_stride
        int64_t s_stride
        int tiles
        int kblocks
    void kernels_init()
    int64_t moe_workspace_bytes(int T, int k, int E, int Hp, int Ip, int nthreads)
    int64_t moe_forward(packed_matrix gate, packed_matrix up, packed_matrix down, int fp8,
                        int E, int H, int I, const void *x, int x_bf16, int T, int k,
                        const int64_t *ids, const float *wts, float *y,
                        uint8_t *workspace, int nthreads)
    void unit_apply(const uint8_t *w, int fp8, const uint16_t *x, int ldx, int nt,
                    float scale, float *out, int scalar)
    int unit_widen_apply(const uint8_t *w, int fmt, uint16_t *dst, int scalar)
    int WIDE_UNIT_BYTES
    int pool_size()
    void pool_configure(int pin, int64_t spin_ns)

cdef extern from "probe_kernels.c" nogil:
    double probe_read(const uint8_t *buf, int64_t bytes, int n)
    double probe_peak(int64_t iters, int n)

kernels_init()

ISA = UNIT_ISA.decode()
UNIT_BYTES = {"fp8": FP8_UNIT_BYTES, "bf16": BF16_UNIT_BYTES}
WIDE_BYTES = WIDE_UNIT_BYTES


cdef packed_matrix _matrix(tuple m):
    # m = (weights ptr, scales ptr, bytes per expert, floats per expert, row tiles, k blocks)
    cdef packed_matrix p
    p.w = <const uint8_t *><uintptr_t>m[0]
    p.scale = <const float *><uintptr_t>m[1]
    p.w_stride = m[2]
    p.s_stride = m[3]
    p.tiles = m[4]
    p.kblocks = m[5]
    return p


def workspace_bytes(int T, int k, int E, int Hp, int Ip, int nthreads):
    return moe_workspace_bytes(T, k, E, Hp, Ip, nthreads)


def forward(tuple gate, tuple up, tuple down, int fp8, int E, int H, int I,
            uintptr_t x, bint x_bf16, int T, int k, uintptr_t ids, uintptr_t wts,
            uintptr_t y, uintptr_t workspace, int nthreads):
    """Fused MoE forward over raw pointers (fp8: the weights' format code, see
    moed/backends/cpu/layout.py); returns 0 or -1-i for a bad ids[i]."""
    cdef packed_matrix g = _matrix(gate), u = _matrix(up), d = _matrix(down)
    cdef int64_t rc
    with nogil:
        rc = moe_forward(g, u, d, fp8, E, H, I, <const void *>x, x_bf16, T, k,
                         <const int64_t *>ids, <const float *>wts, <float *>y,
                         <uint8_t *>workspace, nthreads)
    return rc


def apply_unit(uintptr_t w, int fp8, uintptr_t x, int ldx, int nt, float scale,
               uintptr_t out, bint scalar=False):
    """out[nt, 64] += scale * unit . x[nt, 128] (tests: the SIMD body vs its scalar twin);
    fp8: the unit's format code."""
    with nogil:
        unit_apply(<const uint8_t *>w, fp8, <const uint16_t *>x, ldx, nt, scale,
                   <float *>out, scalar)


def widen_unit(uintptr_t w, int fmt, uintptr_t dst, bint scalar=False):
    """The unit widened as prefill widens it into dst (WIDE_UNIT_BYTES, 64-aligned) ->
    the widened unit's format code, or -1 where this ISA does not widen (tests)."""
    return unit_widen_apply(<const uint8_t *>w, fmt, <uint16_t *>dst, scalar)


def threads_started():
    return pool_size()


def configure_pool(bint pin=True, int64_t spin_ns=-1):
    pool_configure(pin, spin_ns)


def read_seconds(uintptr_t buf, int64_t nbytes, int nthreads):
    """Seconds for a plain streaming read of buf (64-byte aligned) on nthreads."""
    cdef double s
    with nogil:
        s = probe_read(<const uint8_t *>buf, nbytes, nthreads)
    return s


def peak_flops(int64_t iters, int nthreads):
    """Flop/s of a register-only multiply-accumulate loop on nthreads."""
    cdef double f
    with nogil:
        f = probe_peak(iters, nthreads)
    return f


# ---------------------------------------------------------------- dense linears
# y = x @ W^T over one packed matrix (cython_src/dense_kernels.c), on the same
# pool and unit bodies as the experts.
cdef extern from "dense_kernels.c" nogil:
    ctypedef struct dense_matrix:
        const uint8_t *w
        const float *scale
        int rows
        int cols
        int tiles
        int kblocks
        int fp8
    int64_t dense_workspace_bytes(int T, int kblocks, int nthreads)
    void dense_forward(dense_matrix m, const void *x, int x_bf16, int T, float *y,
                       uint8_t *workspace, int nthreads, int scalar)


cdef dense_matrix _dense(tuple m):
    # m = (weights ptr, scales ptr, rows, cols, row tiles, k blocks, fp8): CPULinear's args
    cdef dense_matrix d
    d.w = <const uint8_t *><uintptr_t>m[0]
    d.scale = <const float *><uintptr_t>m[1]
    d.rows = m[2]
    d.cols = m[3]
    d.tiles = m[4]
    d.kblocks = m[5]
    d.fp8 = m[6]
    return d


def dense_workspace(int T, int kblocks, int nthreads):
    return dense_workspace_bytes(T, kblocks, nthreads)


def dense(tuple m, uintptr_t x, bint x_bf16, int T, uintptr_t y, uintptr_t workspace,
          int nthreads, bint scalar=False):
    """y[T, rows] = x[T, cols] @ W^T; m = (weights ptr, scales ptr, rows, cols, row tiles,
    k blocks, fp8). `scalar` runs the scalar twin (tests)."""
    cdef dense_matrix d = _dense(m)
    with nogil:
        dense_forward(d, <const void *>x, x_bf16, T, <float *>y, <uint8_t *>workspace,
                      nthreads, scalar)


# ---------------------------------------------------------------- attention
# Causal flash attention of one prompt chunk (cython_src/attention_kernels.c).
cdef extern from "attention_kernels.c" nogil:
    ctypedef struct att_operand:
        const void *p
        int64_t ld
        int64_t hs
        int bf16
    int64_t attention_workspace_bytes(int n, int L, int H, int Hkv, int dq, int dv,
                                      int nthreads)
    void attention_forward(att_operand q, att_operand k, att_operand v, int n, int L, int H,
                           int Hkv, int dq, int dv, float scale, float *out,
                           uint8_t *workspace, int nthreads)
    int64_t attention_store_limit(int64_t nbytes)


cdef att_operand _operand(tuple x):
    # x = (data ptr, BF16?, elements between tokens, elements between heads)
    cdef att_operand o
    o.p = <const void *><uintptr_t>x[0]
    o.bf16 = x[1]
    o.ld = x[2]
    o.hs = x[3]
    return o


def attention_workspace(int n, int L, int H, int Hkv, int dq, int dv, int nthreads):
    return attention_workspace_bytes(n, L, H, Hkv, dq, dv, nthreads)


def attention(tuple q, tuple k, tuple v, int n, int L, int H, int Hkv, int dq, int dv,
              float scale, uintptr_t out, uintptr_t workspace, int nthreads):
    """out[n, H, dv] = causal attention; q/k/v = (ptr, bf16, token stride, head stride).
    Shapes are checked by the caller (moed/backends/cpu/attention.py)."""
    cdef att_operand qo = _operand(q), ko = _operand(k), vo = _operand(v)
    with nogil:
        attention_forward(qo, ko, vo, n, L, H, Hkv, dq, dv, scale, <float *>out,
                          <uint8_t *>workspace, nthreads)


def attention_store(int64_t nbytes=0):
    """Bytes of converted K/V one pass may hold (kv heads are split into passes
    past it); nbytes > 0 sets it. Returns the previous value."""
    return attention_store_limit(nbytes)


cdef extern from "glue_kernels.c" nogil:
    void qk_norm_rope(const float *x, int64_t ldx, int N, int R, int d, const float *w,
                      float eps, const float *cs, const float *sn, int64_t ldcs, float *out,
                      int nthreads)
    void router_logits(const float *x, const void *w, int w_bf16, int T, int D, int E,
                       float *logits, int nthreads)
    void router_softmax_topk(const float *x, const void *w, int w_bf16, int T, int D, int E,
                             int k, int renorm, float *logits, int64_t *ids, float *wts,
                             int nthreads)
    void add_rms_norm(float *x, int64_t ldx, const float *delta, int64_t ldd, int N, int D,
                      const float *w, float eps, float *out, int nthreads)
    void argmax_rows(const float *x, int64_t ldx, int B, int64_t V, int64_t *ids)


def norm_rope(uintptr_t x, int64_t ldx, int N, int R, int d, uintptr_t w, float eps,
              uintptr_t cos, uintptr_t sin, int64_t ldcs, uintptr_t out, int nthreads):
    """out[N, R, d] = rotary(w * x / rms(x)) per (token, head) row; w == 0: rotary only.
    Pointers and strides are checked by the caller (moed/backends/cpu/glue.py)."""
    with nogil:
        qk_norm_rope(<const float *>x, ldx, N, R, d, <const float *>w, eps,
                     <const float *>cos, <const float *>sin, ldcs, <float *>out, nthreads)


def gate_logits(uintptr_t x, uintptr_t w, bint w_bf16, int T, int D, int E, uintptr_t logits,
                int nthreads):
    """logits[T, E] = x @ w^T (FP32 dots in one order per row); w FP32 or BF16. Pointers
    and shapes are checked by the caller (moed/backends/cpu/glue.py)."""
    with nogil:
        router_logits(<const float *>x, <const void *>w, w_bf16, T, D, E, <float *>logits,
                      nthreads)


def softmax_topk(uintptr_t x, uintptr_t w, bint w_bf16, int T, int D, int E, int k,
                 bint renorm, uintptr_t logits, uintptr_t ids, uintptr_t wts, int nthreads):
    """ids[T, k], wts[T, k] = top-k of softmax(x @ w^T) (renormalised when asked); w FP32
    or BF16. Pointers and shapes are checked by the caller (moed/backends/cpu/glue.py)."""
    with nogil:
        router_softmax_topk(<const float *>x, <const void *>w, w_bf16, T, D, E, k, renorm,
                            <float *>logits, <int64_t *>ids, <float *>wts, nthreads)


def rms_norm(uintptr_t x, int64_t ldx, uintptr_t delta, int64_t ldd, int N, int D,
             uintptr_t w, float eps, uintptr_t out, int nthreads):
    """x += delta (delta != 0), then out[N, D] = w * x / rms(x) per row.
    Pointers and strides are checked by the caller (moed/backends/cpu/glue.py)."""
    with nogil:
        add_rms_norm(<float *>x, ldx, <const float *>delta, ldd, N, D, <const float *>w, eps,
                     <float *>out, nthreads)


def argmax(uintptr_t x, int64_t ldx, int B, int64_t V, uintptr_t ids):
    """ids[B] = index of each row's largest value (first on ties, first NaN wins)."""
    with nogil:
        argmax_rows(<const float *>x, ldx, B, V, <int64_t *>ids)


# ---------------------------------------------------------------- MLA absorbed decode
# kv_b's per-head products in its checkpoint format (cython_src/mla_kernels.c).
cdef extern from "mla_kernels.c" nogil:
    int mla_absorb(const void *w, int fp8, const float *scale, int64_t scale_ld, int H,
                   int dn, int dv, int r, const float *x, int64_t x_ld, int64_t x_hs, int B,
                   float *out, int mode, int nthreads)


def mla_absorb_rows(uintptr_t w, bint fp8, uintptr_t scale, int64_t scale_ld, int H, int dn,
                    int dv, int r, uintptr_t x, int64_t x_ld, int64_t x_hs, int B,
                    uintptr_t out, int mode, int nthreads):
    """mode 0: out[B, H, r] = x[B, H, dn] W_uk; mode 1: out[B, H, dv] = x[B, H, r] W_uv^T
    (cython_src/mla_kernels.c). Returns 0, or -1 when r is too wide. Pointers, shapes
    and strides are checked by the caller (moed/backends/cpu/mla.py)."""
    cdef int rc
    with nogil:
        rc = mla_absorb(<const void *>w, fp8, <const float *>scale, scale_ld, H, dn, dv, r,
                        <const float *>x, x_ld, x_hs, B, <float *>out, mode, nthreads)
    return rc


# ---------------------------------------------------------------- decode attention
# Paged decode attention and the KV cache store (cython_src/decode_kernels.c).
cdef extern from "decode_kernels.c" nogil:
    ctypedef struct kv_operand:
        const void *p
        int64_t ld
        int64_t hs
        int bf16
    int64_t decode_workspace_bytes(int B, int H, int Hkv, int dq, int dv, int nthreads)
    int64_t decode_attention(const float *q, int64_t q_ld, int64_t q_hs, kv_operand k,
                             kv_operand v, const int64_t *slots, int64_t ldslots,
                             const int64_t *context, int64_t S, int B, int H, int Hkv,
                             int dq, int dv, float scale, float *out, uint8_t *workspace,
                             int nthreads)
    int64_t kv_store(kv_operand kc, kv_operand vc, const float *k, int64_t k_ld, int64_t k_hs,
                     const float *v, int64_t v_ld, int64_t v_hs, const int64_t *slot_mapping,
                     int N, int64_t S, int Hkv, int dk, int dv)


cdef kv_operand _kv_operand(tuple x):
    # x = (data ptr, BF16?, elements between slots, elements between kv heads)
    cdef kv_operand o
    o.p = <const void *><uintptr_t>x[0]
    o.bf16 = x[1]
    o.ld = x[2]
    o.hs = x[3]
    return o


def decode_workspace(int B, int H, int Hkv, int dq, int dv, int nthreads):
    return decode_workspace_bytes(B, H, Hkv, dq, dv, nthreads)


def paged_decode(uintptr_t q, int64_t q_ld, int64_t q_hs, tuple k, tuple v, uintptr_t slots,
                 int64_t ldslots, uintptr_t context, int64_t S, int B, int H, int Hkv, int dq,
                 int dv, float scale, uintptr_t out, uintptr_t workspace, int nthreads):
    """out[B, H, dv] = decode attention through the slot table; k/v = (ptr, bf16, slot
    stride, head stride). Returns 0, 1 + b for a bad context[b], -1 - i for a bad
    slots.flat[i]. Shapes are checked by the caller (moed/backends/cpu/decode_attention.py)."""
    cdef kv_operand ko = _kv_operand(k), vo = _kv_operand(v)
    cdef int64_t rc
    with nogil:
        rc = decode_attention(<const float *>q, q_ld, q_hs, ko, vo, <const int64_t *>slots,
                              ldslots, <const int64_t *>context, S, B, H, Hkv, dq, dv, scale,
                              <float *>out, <uint8_t *>workspace, nthreads)
    return rc


def store_kv(tuple kc, tuple vc, uintptr_t k, int64_t k_ld, int64_t k_hs, uintptr_t v,
             int64_t v_ld, int64_t v_hs, uintptr_t slot_mapping, int N, int64_t S, int Hkv,
             int dk, int dv):
    """Cache rows slot_mapping[n] <- k[n] (and v[n] when v != 0), FP32 in, FP32 or BF16
    out. Returns 0, or -1 - n for a bad slot_mapping[n] (nothing written then)."""
    cdef kv_operand ko = _kv_operand(kc), vo = _kv_operand(vc)
    cdef int64_t rc
    with nogil:
        rc = kv_store(ko, vo, <const float *>k, k_ld, k_hs, <const float *>v, v_ld, v_hs,
                      <const int64_t *>slot_mapping, N, S, Hkv, dk, dv)
    return rc


# ---------------------------------------------------------------- decode stack
# A decode step's decoder layers in one call (cython_src/decode_stack.c); the
# Python side (moed/backends/cpu/decode_stack.py) decides which models and steps.
from libc.stdlib cimport calloc, free

cdef extern from "decode_stack.c" nogil:
    ctypedef struct stack_layer:
        dense_matrix qkv
        dense_matrix o
        int qk0
        int v0
        int H
        int Hkv
        int d
        const float *qk_w
        float qk_eps
        float scale
        kv_operand kc
        kv_operand vc
        int64_t S
        const float *post_w
        float post_eps
        const void *router_w
        int router_bf16
        int E
        int topk
        int renorm
        packed_matrix gate
        packed_matrix up
        packed_matrix down
        int fp8
        int I
        const float *next_w
        float next_eps
    int64_t stack_workspace_bytes(const stack_layer *L, int nl, int B, int D, int nthreads)
    int64_t stack_run(const stack_layer *L, int nl, float *x, float *h, int B, int D,
                      const float *cs, const float *sn, int64_t ldcs,
                      const int64_t *slot_mapping, const int64_t *slots, int64_t ldslots,
                      const int64_t *context, int64_t *routed, uint8_t *ws,
                      int nthreads, int *fail_layer, int *fail_stage)


cdef class DecodeStack:
    """The layer table of a decode stack: one C struct per layer, filled once
    from `layers` (tuples, see moed/backends/cpu/decode_stack.py) and, each step,
    the caches' operands (`caches`)."""
    cdef stack_layer *L
    cdef int n
    cdef readonly int hidden

    def __cinit__(self, list layers, int hidden):
        self.n = len(layers)
        self.hidden = hidden
        self.L = <stack_layer *>calloc(max(self.n, 1), sizeof(stack_layer))
        if self.L == NULL:
            raise MemoryError()
        cdef stack_layer *s
        for i, t in enumerate(layers):
            s = &self.L[i]
            (qkv, o, s.qk0, s.v0, s.H, s.Hkv, s.d, qk_w, s.qk_eps, s.scale, post_w,
             s.post_eps, router_w, s.router_bf16, s.E, s.topk, s.renorm, gate, up, down,
             s.fp8, s.I, next_w, s.next_eps) = t
            s.qkv = _dense(qkv)
            s.o = _dense(o)
            s.qk_w = <const float *><uintptr_t>qk_w
            s.post_w = <const float *><uintptr_t>post_w
            s.router_w = <const void *><uintptr_t>router_w
            s.gate = _matrix(gate)
            s.up = _matrix(up)
            s.down = _matrix(down)
            s.next_w = <const float *><uintptr_t>next_w

    def __dealloc__(self):
        free(self.L)

    def set_caches(self, list caches):
        """caches: per layer ((k operand), (v operand), slots S), operands as paged_decode's."""
        for i, (k, v, S) in enumerate(caches):
            self.L[i].kc = _kv_operand(k)
            self.L[i].vc = _kv_operand(v)
            self.L[i].S = S

    def workspace_bytes(self, int B, int nthreads):
        return stack_workspace_bytes(self.L, self.n, B, self.hidden, nthreads)

    def run(self, uintptr_t x, uintptr_t h, int B, uintptr_t cos, uintptr_t sin, int64_t ldcs,
            uintptr_t slot_mapping, uintptr_t slots, int64_t ldslots, uintptr_t context,
            uintptr_t routed, uintptr_t workspace, int nthreads):
        """-> (0, -1, 0), or (the failing kernel's code, layer, stage: 1 store,
        2 attention, 3 experts). routed: [layers, B, k] int64 for each layer's expert
        ids, or 0. Pointers and shapes are checked by the caller."""
        cdef int layer = -1, stage = 0
        cdef int64_t rc
        with nogil:
            rc = stack_run(self.L, self.n, <float *>x, <float *>h, B, self.hidden,
                           <const float *>cos, <const float *>sin, ldcs,
                           <const int64_t *>slot_mapping, <const int64_t *>slots, ldslots,
                           <const int64_t *>context, <int64_t *>routed,
                           <uint8_t *>workspace, nthreads, &layer, &stage)
        return rc, (layer if rc else -1), stage
