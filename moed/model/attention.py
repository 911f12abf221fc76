"""Grouped-query attention over the paged KV cache (Qwen3-MoE, Mixtral, Qwen2-MoE).

Cache entry per token: [2, Hkv, d] (key after rotary, value).
Shape legend: N new tokens, H query heads, Hkv key/value heads, d head dim.
"""
import torch

from moed.model.base import CausalLM, require_divisible
from moed.model.layers import (Rotary, batched_mask, compiled_cache_step, decode_attention,
                               sdpa)


class GQAttention:
    def __init__(self, q, k, v, o, rotary, heads, kv_heads, head_dim, q_norm=None, k_norm=None):
        self.q, self.k, self.v, self.o = q, k, v, o       # Linear
        self.qkv = None          # q, k, v in one call when the CPU kernels fuse them
        self._spans_of, self._spans = None, None        # _qk_spans' answer, and for which qkv
        # prefill chunks through the compiled flash-attention kernel when installed:
        # fn(q [n, H, d], k [L, Hkv, d], v [L, Hkv, d], scale, out=) (causal, offset L - n)
        self.prefill_kernel = None
        # decodes read K/V in place from the paged cache when installed (no gathered copy):
        # fn(q [B, H, d] float32, kv_cache, slots [B, Lmax], context [B], scale, out=)
        self.decode_kernel = None
        # the step's new k/v written into their slots in one call when installed:
        # fn(kv_cache, slot_mapping [N], k [N, Hkv, d], v [N, Hkv, d]) (float32 k, v)
        self.kv_store = None
        # q/k norm + rotary in one compiled pass when installed (moed.backends.cpu.glue.norm_rope)
        self.norm_rope = None
        self.rotary = rotary
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_norm, self.k_norm = q_norm, k_norm         # per-head RMSNorm [d] (Qwen3)
        self.scale = head_dim ** -0.5
        # both norms' weights for q and k normed as one tensor [H + Hkv, d] (None: they
        # cannot be, their eps differ; or there are no norms)
        self._qk_weight = None
        if q_norm is not None and q_norm.eps == k_norm.eps:
            self._qk_weight = torch.cat([q_norm.weight.expand(heads, head_dim),
                                         k_norm.weight.expand(kv_heads, head_dim)])

    def __call__(self, x, cos_sin, batch, kv_cache):
        # x [N, D] -> [N, D]; kv_cache [S, 2, Hkv, d]
        N = x.shape[0]
        q, k, v = self.project(x, cos_sin)
        if self.kv_store is not None and compiled_cache_step(kv_cache, k):
            self.kv_store(kv_cache, batch.slot_mapping, k, v)
        else:
            kv_cache[batch.slot_mapping, 0] = k.to(kv_cache.dtype)
            kv_cache[batch.slot_mapping, 1] = v.to(kv_cache.dtype)
        return self.o(self.attend(q, batch, kv_cache).view(N, -1))

    def project(self, x, cos_sin):
        # x [N, D] -> q [N, H, d], k [N, Hkv, d] (normed, rotated), v [N, Hkv, d]
        N = x.shape[0]
        spans = self._qk_spans()
        if spans is not None:       # q and k side by side: norm and rotate them as one
            y = self.qkv.fused(x)                                   # [N, q + k + v columns]
            (a, b), (c, e) = spans
            qk = y[:, a:b].view(N, self.heads + self.kv_heads, self.head_dim)
            v = y[:, c:e].view(N, self.kv_heads, self.head_dim)
            if self.norm_rope is not None and not self.rotary.interleaved:
                norm = self.q_norm is not None
                qk = self.norm_rope(qk, *Rotary.halves(cos_sin),
                                    self._qk_weight if norm else None,
                                    self.q_norm.eps if norm else 0.0)
            else:
                if self.q_norm is not None:
                    qk = self.q_norm.normalize(qk) * self._qk_weight
                qk = self.rotary(qk, *cos_sin)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
        else:
            q, k, v = self.qkv(x) if self.qkv is not None else (self.q(x), self.k(x), self.v(x))
            v = v.view(N, self.kv_heads, self.head_dim)
            q = q.view(N, self.heads, self.head_dim)
            k = k.view(N, self.kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(q, *cos_sin), self.rotary(k, *cos_sin)
        return q, k, v

    def _qk_spans(self):
        """((q's first, k's last + 1), (v's first, last + 1)) columns of the fused q/k/v
        output (`qkv.fused(x)`, the fused CPU projection) when q and k sit side by side
        in it, else None; worked out once per qkv object. Per-head norms then use one
        weight [H + Hkv, d] (q's for the query heads, k's for the key heads): the same
        products as two calls, in half the torch ops of a decode step."""
        if self._spans_of is not self.qkv:
            self._spans_of, self._spans = self.qkv, None
            parts = getattr(self.qkv, "spans", None)
            if parts is not None and len(parts) == 3 and parts[0][1] == parts[1][0] \
                    and hasattr(self.qkv, "fused") \
                    and (self.q_norm is None or self._qk_weight is not None):
                self._spans = ((parts[0][0], parts[1][1]), parts[2])
        return self._spans

    def attend(self, q, batch, kv_cache):
        # q [N, H, d] -> [N, H, d]
        if not batch.prefills:       # decode-only step: rows are the decodes, in order
            return self.attend_decodes(q, batch, kv_cache)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)      # contiguous
        if batch.decode_rows is not None:
            out[batch.decode_rows] = self.attend_decodes(q[batch.decode_rows], batch, kv_cache)
        for p in batch.prefills:
            kv = p.cached(kv_cache)[None]                          # [1, L, 2, Hkv, d]
            if self.prefill_kernel is not None and q.dtype == torch.float32:
                self.prefill_kernel(q[p.rows], kv[0, :, 0], kv[0, :, 1], self.scale,
                                    out=out[p.rows])
            else:
                out[p.rows] = sdpa(q[None, p.rows], kv[:, :, 0], kv[:, :, 1],
                                   batched_mask(p.mask), self.scale)[0]
        return out

    def attend_decodes(self, q, batch, kv_cache):
        # q [B, H, d] (the decodes' rows) -> [B, H, d]
        if self.decode_kernel is not None and batch.decode_context is not None and \
                compiled_cache_step(kv_cache, q):
            return self.decode_kernel(q, kv_cache, batch.decode_slots, batch.decode_context,
                                      self.scale)
        kv = kv_cache[batch.decode_slots]                          # [B, Lmax, 2, Hkv, d]
        return decode_attention(q, kv[:, :, 0], kv[:, :, 1], batch.decode_mask, self.scale)


def load_gqa(load, prefix, rotary, hidden, heads, kv_heads, head_dim, qkv_bias=False,
             o_bias=False, qk_norm_eps=None):
    q_norm = k_norm = None
    if qk_norm_eps is not None:
        q_norm = load.norm(f"{prefix}.q_norm.weight", head_dim, qk_norm_eps)
        k_norm = load.norm(f"{prefix}.k_norm.weight", head_dim, qk_norm_eps)
    return GQAttention(load.linear(f"{prefix}.q_proj", heads * head_dim, hidden, qkv_bias),
                       load.linear(f"{prefix}.k_proj", kv_heads * head_dim, hidden, qkv_bias),
                       load.linear(f"{prefix}.v_proj", kv_heads * head_dim, hidden, qkv_bias),
                       load.linear(f"{prefix}.o_proj", hidden, heads * head_dim, o_bias),
                       rotary, heads, kv_heads, head_dim, q_norm, k_norm)


class GQACausalLM(CausalLM):
    """A decoder whose attention is GQA with a [2, Hkv, d] cache entry per token."""
    qkv_bias = o_bias = False
    qk_norm = False

    def read_attention_config(self, c):
        self.heads = c.positive("num_attention_heads")
        self.kv_heads = c.positive("num_key_value_heads", self.heads)
        require_divisible(c, "num_attention_heads", self.heads, self.kv_heads,
                          "num_key_value_heads")
        self.head_dim = c.positive("head_dim", None) or c.positive("hidden_size") // self.heads

    def build_rotary(self):
        return Rotary(self.cfg.rope(self.head_dim))

    def kv_token_shape(self):
        return (2, self.kv_heads, self.head_dim)

    def build_attention(self, i):
        return load_gqa(self.load, f"model.layers.{i}.self_attn", self.rotary,
                        self.hidden_size, self.heads, self.kv_heads, self.head_dim,
                        self.qkv_bias, self.o_bias, self.eps if self.qk_norm else None)
