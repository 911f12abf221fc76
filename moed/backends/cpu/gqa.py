"""Grouped-query attention's operations on the compiled CPU kernels: the reference's
(moed.backends.torch.GQAOps) with the kernels where they take the step.

- q, k and v from one fused projection, and q/k per-head norm + rotary of q and k as
  one tensor in one pass (cython_src/glue_kernels.c);
- the step's new keys and values stored in one call; decodes read K/V in place from the
  paged cache through each sequence's slot row (cython_src/decode_kernels.c);
- prefill chunks through the flash-attention kernel (cython_src/attention_kernels.c),
  never a [n, L] score matrix.
With the flash kernel for every prefill and the paged kernel for every decode, a
position's per-query arithmetic is one whichever computes it (the decode kernel runs
the prefill's): its logits do not depend on the batch, the chunking or preemption.
Shape legend: N new tokens, H query heads, Hkv kv heads, d head dim.
"""
import functools

import torch

from moed.backends.cpu.attention import causal_attention
from moed.backends.cpu.decode_attention import (compiled_cache_step, paged_decode_attention,
                                                store_kv)
from moed.backends.cpu.glue import norm_rope
from moed.backends.torch import GQAOps
from moed.model.layers import Rotary


class CPUGQAOps(GQAOps):
    """For one GQAttention. What the compiled decode stack reads of a layer is here,
    public: `qkv`, `spans`, `qk_weight`, `eps` and the kernels' bound calls."""

    def __init__(self, attn, kernels, threads, qkv=None, flash=True, paged=True):
        super().__init__(attn)
        self.kernels, self.threads = kernels, threads
        # the fused q/k/v projection (moed.backends.cpu.linears.CPUFusedLinear) or None
        self.qkv = qkv
        # the kernels' calls, bound once (a lookup per layer per step is ~2 us); None:
        # torch's arithmetic
        bind = functools.partial
        self.rope = bind(norm_rope, kernels=kernels, threads=threads)
        self.store = bind(store_kv, kernels=kernels)
        self.prefill = bind(causal_attention, kernels=kernels, threads=threads) if flash else None
        self.decode = bind(paged_decode_attention, kernels=kernels, threads=threads) \
            if paged else None
        # q/k norm weights as one [H + Hkv, d] tensor (q's for the query heads, k's for
        # the key heads): the same products as two calls. None without norms, or when
        # their eps differ (then q and k are not normed as one)
        self.qk_weight, self.eps = None, 0.0
        if attn.q_norm is not None and attn.q_norm.eps == attn.k_norm.eps:
            self.qk_weight = torch.cat([attn.q_norm.weight.expand(attn.heads, attn.head_dim),
                                        attn.k_norm.weight.expand(attn.kv_heads,
                                                                  attn.head_dim)])
            self.eps = attn.q_norm.eps
        # ((q's first column, k's last + 1), (v's first, last + 1)) of the fused output
        # when q and k sit side by side in it, else None
        self.spans = None
        parts = getattr(qkv, "spans", None)
        if parts is not None and len(parts) == 3 and parts[0][1] == parts[1][0] and \
                (attn.q_norm is None or self.qk_weight is not None):
            self.spans = ((parts[0][0], parts[1][1]), parts[2])

    def project(self, x, cos_sin):
        if self.spans is None:
            if self.qkv is None:
                return super().project(x, cos_sin)
            return self.heads(*self.qkv(x), cos_sin)
        a, N = self.attn, x.shape[0]
        y = self.qkv.fused(x)                                       # [N, q + k + v columns]
        (s, e), (c, f) = self.spans
        qk = y[:, s:e].view(N, a.heads + a.kv_heads, a.head_dim)
        v = y[:, c:f].view(N, a.kv_heads, a.head_dim)
        if self.rope is not None and not a.rotary.interleaved:
            qk = self.rope(qk, *Rotary.halves(cos_sin), self.qk_weight, self.eps)
        else:
            if a.q_norm is not None:
                qk = a.q_norm.normalize(qk) * self.qk_weight
            qk = a.rotary(qk, *cos_sin)
        return qk[:, :a.heads], qk[:, a.heads:], v

    def store_kv(self, kv_cache, slot_mapping, k, v):
        if not compiled_cache_step(kv_cache, k):
            return super().store_kv(kv_cache, slot_mapping, k, v)
        self.store(kv_cache, slot_mapping, k, v)

    def attend_prefill(self, q, k, v, mask, out):
        if self.prefill is None or q.dtype != torch.float32:
            return super().attend_prefill(q, k, v, mask, out)
        self.prefill(q, k, v, self.attn.scale, out=out)

    def attend_decodes(self, q, batch, kv_cache):
        if self.decode is None or batch.decode_context is None or \
                not compiled_cache_step(kv_cache, q):
            return super().attend_decodes(q, batch, kv_cache)
        return self.decode(q, kv_cache, batch.decode_slots, batch.decode_context,
                           self.attn.scale)
