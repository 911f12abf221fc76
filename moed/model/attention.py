"""Grouped-query attention over the paged KV cache (Qwen3-MoE, Mixtral, Qwen2-MoE).

Cache entry per token: [2, Hkv, d] (key after rotary, value).
Shape legend: N new tokens, H query heads, Hkv key/value heads, d head dim.
"""
import torch

from moed.backends.torch import GQAOps
from moed.model.base import CausalLM, require_divisible
from moed.model.kv_dtype import readable
from moed.model.layers import Rotary


class GQAttention:
    """Projections, per-head q/k norms and rotary of one layer; the arithmetic over the
    cache is its backend's (`ops`: moed.backends.torch.GQAOps unless one is installed)."""

    LINEARS = ("q", "k", "v", "o")      # what a backend may swap for its own linears

    def __init__(self, q, k, v, o, rotary, heads, kv_heads, head_dim, q_norm=None, k_norm=None):
        self.q, self.k, self.v, self.o = q, k, v, o       # Linear
        self.rotary = rotary
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_norm, self.k_norm = q_norm, k_norm         # per-head RMSNorm [d] (Qwen3)
        self.scale = head_dim ** -0.5
        self.ops = self.reference_ops()

    def reference_ops(self):
        return GQAOps(self)

    def __call__(self, x, cos_sin, batch, kv_cache):
        # x [N, D] -> [N, D]; kv_cache [S, 2, Hkv, d]
        N = x.shape[0]
        q, k, v = self.ops.project(x, cos_sin)
        self.ops.store_kv(kv_cache, batch.slot_mapping, k, v)
        return self.o(self.attend(q, batch, kv_cache).view(N, -1))

    def attend(self, q, batch, kv_cache):
        # q [N, H, d] -> [N, H, d]
        if not batch.prefills:       # decode-only step: rows are the decodes, in order
            return self.ops.attend_decodes(q, batch, kv_cache)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)      # contiguous
        if batch.decode_rows is not None:
            out[batch.decode_rows] = self.ops.attend_decodes(q[batch.decode_rows], batch,
                                                             kv_cache)
        for p in batch.prefills:
            kv = readable(p.cached(kv_cache))                      # [L, 2, Hkv, d]
            self.ops.attend_prefill(q[p.rows], kv[:, 0], kv[:, 1], p.mask, out[p.rows])
        return out


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
