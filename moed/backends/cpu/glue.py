"""The glue between the weight kernels on the compiled kernels
(cython_src/glue_kernels.c): per-head RMS norm and rotary of attention's q and k
together, one pass instead of torch's ~10 passes over the chunk; softmax
routing (logits, softmax, top-k) in one call; the residual add with the next
RMS norm in one pass; and greedy argmax over the logits.
Shape legend: N tokens, R heads of q and k together, d head dim, h = d / 2;
T tokens, E experts, D hidden.
"""
import torch

from moed.model.moe import grouped_sigmoid_topk

from moed.errors import InvalidRequestError
from moed.backends.cpu.runtime import default_threads


def norm_rope(qk, cos, sin, weight=None, eps=0.0, threads=None, kernels=None):
    """qk [N, R, d] float32 (any token stride; heads and dims contiguous), cos, sin
    [N, h] (token stride any, dims contiguous), weight [R, d] float32 or None (rotary
    only) -> [N, R, d] float32: rotate-half rotary of weight * qk / rms(qk).
    (The engine binds `threads` and `kernels` once: every layer calls this a step.)"""
    N, R, d = qk.shape
    h = d // 2
    f32 = torch.float32
    # one expression for the common case (every layer of every step); the reasons after
    if not (qk.dtype == f32 and qk.stride(2) == 1 and qk.stride(1) == d and not d % 2
            and cos.dtype == f32 and sin.dtype == f32 and cos.shape == (N, h)
            and sin.shape == (N, h) and cos.stride(1) == 1 and sin.stride(1) == 1
            and sin.stride(0) == cos.stride(0)
            and (weight is None or (weight.shape == (R, d) and weight.dtype == f32
                                    and weight.is_contiguous()))):
        _norm_rope_refusal(qk, cos, sin, weight)
    out = torch.empty(N, R, d, dtype=f32)
    if N:
        if kernels is None:
            from moed.backends.cpu.isa import load_kernels
            kernels = load_kernels()
        kernels.norm_rope(qk.data_ptr(), qk.stride(0), N, R, d,
                          0 if weight is None else weight.data_ptr(), float(eps),
                          cos.data_ptr(), sin.data_ptr(), cos.stride(0), out.data_ptr(),
                          threads or default_threads())
    return out


def _norm_rope_refusal(qk, cos, sin, weight):
    N, R, d = qk.shape
    if qk.dtype != torch.float32 or qk.stride(2) != 1 or qk.stride(1) != d or d % 2:
        raise InvalidRequestError(f"qk must be float32 [N, R, d] with contiguous heads and an "
                                  f"even d, got {qk.dtype} {tuple(qk.shape)} strides "
                                  f"{qk.stride()}", field="qk")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or tuple(t.shape) != (N, d // 2) or t.stride(1) != 1 \
                or t.stride(0) != cos.stride(0):
            raise InvalidRequestError(f"{name} must be float32 [{N}, {d // 2}] like cos, got "
                                      f"{t.dtype} {tuple(t.shape)}", field=name)
    raise InvalidRequestError(f"weight must be contiguous float32 [{R}, {d}]", field="weight")


class CPUGateLogits:
    """A gate Linear [E, D] (a router's, or Qwen2-MoE's shared-expert gate with E = 1)
    as the router kernel's per-row FP32 dots: torch's matmul picks its blocking by the
    number of rows, so a token's logits changed with the batch; these do not."""

    def __init__(self, linear, threads=None, kernels=None):
        from moed.backends.cpu.isa import load_kernels
        self.reference = linear
        w = linear.weight.dequantize().float()                             # [E, D]
        # BF16 when every weight is a BF16 value (a BF16 router, upcast exactly by the
        # reference): the kernel widens it exactly, same products from half the bytes
        half = w.bfloat16()
        self.weight = half.contiguous() if torch.equal(half.float(), w) else w.contiguous()
        self.kernels = kernels or load_kernels()
        self.threads = threads or default_threads()

    def takes(self, x):
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 \
                or self.reference.bias is not None:
            return False
        if x.shape[1] != self.weight.shape[1]:
            raise InvalidRequestError(f"x has shape {tuple(x.shape)}, expected "
                                      f"[T, {self.weight.shape[1]}]", field="x")
        return True

    def __call__(self, x):
        # x [T, D] float32 -> [T, E] float32
        if not self.takes(x):
            return self.reference(x)
        x = x.contiguous()
        logits = torch.empty(x.shape[0], self.weight.shape[0], dtype=torch.float32)
        if x.shape[0]:
            self.kernels.gate_logits(x.data_ptr(), self.weight.data_ptr(),
                                     self.weight.dtype == torch.bfloat16, x.shape[0],
                                     self.weight.shape[1], self.weight.shape[0],
                                     logits.data_ptr(), self.threads)
        return logits


class CPUSoftmaxRouter:
    """A softmax router (Mixtral, Qwen-MoE) on the compiled glue: FP32 logits, softmax
    and top-k in one call instead of five torch ops on a [T, E] tensor. The logits
    stay FP32 like the torch path's (only the summation order differs), so the
    selection is that of the reference but for exact near-ties."""

    def __init__(self, router, threads=None, kernels=None):
        self.reference = router                                   # moed.model.moe.SoftmaxRouter
        self.gate = CPUGateLogits(router.gate, threads, kernels)  # its float32 Linear [E, D]
        self.k, self.renorm = router.k, router.norm_topk_prob

    def __call__(self, x):
        # x [T, D] float32 -> ids [T, k] int64, weights [T, k] float32
        g = self.gate
        if not g.takes(x):
            return self.reference(x)
        x = x.contiguous()
        T, (E, D) = x.shape[0], g.weight.shape
        ids = torch.empty(T, self.k, dtype=torch.int64)
        wts = torch.empty(T, self.k, dtype=torch.float32)
        if T:
            logits = torch.empty(T, E, dtype=torch.float32)
            g.kernels.softmax_topk(x.data_ptr(), g.weight.data_ptr(),
                                   g.weight.dtype == torch.bfloat16, T, D, E, self.k,
                                   self.renorm, logits.data_ptr(), ids.data_ptr(),
                                   wts.data_ptr(), g.threads)
        return ids, wts


class CPUGroupedSigmoidRouter:
    """DeepSeek-V3's router with its logits from the compiled glue (the same per-row
    FP32 dots as CPUSoftmaxRouter), then the group-limited sigmoid top-k of the
    reference on them (batch-invariant: moed.model.moe.grouped_sigmoid_topk)."""

    def __init__(self, router, threads=None, kernels=None):
        self.reference = router                                   # GroupedSigmoidRouter
        self.gate = CPUGateLogits(router.gate, threads, kernels)

    def __call__(self, x):
        # x [T, D] float32 -> ids [T, k] int64, weights [T, k] float32
        if not self.gate.takes(x):
            return self.reference(x)
        r = self.reference
        return grouped_sigmoid_topk(self.gate(x), r.bias, r.k, r.n_group, r.topk_group,
                                    r.norm_topk_prob, r.scaling)


class CPURMSNorm:
    """RMSNorm on the compiled glue, with the residual add folded in: `add(x, delta)`
    updates the residual stream x in place and returns it with its norm, one pass
    where torch runs an add and six norm ops, each with a temporary (the glue of
    every decoder layer, twice). Same products as moed.model.layers.RMSNorm; the
    sum of squares is another summation order."""

    def __init__(self, norm, threads=None, kernels=None):
        from moed.backends.cpu.isa import load_kernels
        self.reference = norm                                     # moed.model.layers.RMSNorm
        self.weight, self.eps = norm.weight.contiguous(), float(norm.eps)   # [D] float32
        self.kernels = kernels or load_kernels()
        self.threads = threads or default_threads()

    def __call__(self, x):
        # x [N, D] float32 -> [N, D]
        if not self._fits(x):
            return self.reference(x)
        return self._run(x, None)

    def add(self, x, delta):
        # x [N, D] float32 (updated in place to x + delta), delta [N, D] -> (x, norm(x))
        if not (self._fits(x) and self._fits(delta)) or delta.shape != x.shape:
            return self.reference.add(x, delta)
        return x, self._run(x, delta)

    def _fits(self, x):
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
                and x.shape[1] == self.weight.shape[0] and x.stride(1) == 1)

    def _run(self, x, delta):
        N, D = x.shape
        out = torch.empty(N, D, dtype=torch.float32)
        if N:
            self.kernels.rms_norm(x.data_ptr(), x.stride(0),
                                  0 if delta is None else delta.data_ptr(),
                                  0 if delta is None else delta.stride(0), N, D,
                                  self.weight.data_ptr(), self.eps, out.data_ptr(), self.threads)
        return out


def argmax(logits, kernels=None):
    """logits [B, V] float32 on the CPU (rows contiguous) -> [B] int64 index of each row's
    largest value: torch.argmax's answer (first on ties, first NaN wins) in one
    vectorised pass, where torch takes ~0.1 ms a 150K-vocab row on one thread."""
    from moed.backends.cpu.isa import load_kernels
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2 \
            or logits.stride(1) != 1 or logits.shape[1] == 0:
        return logits.argmax(dim=-1)
    ids = torch.empty(logits.shape[0], dtype=torch.int64)
    (kernels or load_kernels()).argmax(logits.data_ptr(), logits.stride(0), logits.shape[0],
                                         logits.shape[1], ids.data_ptr())
    return ids
