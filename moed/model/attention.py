"""Grouped-query attention over the paged KV cache (Qwen3-MoE, Mixtral, Qwen2-MoE).

Cache entry per token: [2, Hkv, d] (key after rotary, value).
Shape legend: N new tokens, H query heads, Hkv key/value heads, d head dim.
"""
import torch

from moed.model.layers import sdpa


class GQAttention:
    def __init__(self, q, k, v, o, rotary, heads, kv_heads, head_dim, q_norm=None, k_norm=None):
        self.q, self.k, self.v, self.o = q, k, v, o       # Linear
        self.rotary = rotary
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_norm, self.k_norm = q_norm, k_norm         # per-head RMSNorm [d] (Qwen3)
        self.scale = head_dim ** -0.5

    def __call__(self, x, cos_sin, batch, kv_cache):
        # x [N, D] -> [N, D]; kv_cache [S, 2, Hkv, d]
        N = x.shape[0]
        q = self.q(x).view(N, self.heads, self.head_dim)
        k = self.k(x).view(N, self.kv_heads, self.head_dim)
        v = self.v(x).view(N, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, *cos_sin), self.rotary(k, *cos_sin)
        kv_cache[batch.slot_mapping, 0] = k.to(kv_cache.dtype)
        kv_cache[batch.slot_mapping, 1] = v.to(kv_cache.dtype)
        return self.o(self.attend(q, batch, kv_cache).view(N, -1))

    def attend(self, q, batch, kv_cache):
        # q [N, H, d] -> [N, H, d]
        out = torch.empty_like(q)
        if batch.decode_rows is not None:
            kv = kv_cache[batch.decode_slots]                      # [B, Lmax, 2, Hkv, d]
            out[batch.decode_rows] = sdpa(q[batch.decode_rows, None], kv[:, :, 0], kv[:, :, 1],
                                          batch.decode_mask, self.scale)[:, 0]
        for p in batch.prefills:
            kv = kv_cache[p.slots][None]                           # [1, L, 2, Hkv, d]
            out[p.rows] = sdpa(q[None, p.rows], kv[:, :, 0], kv[:, :, 1], p.mask[None],
                               self.scale)[0]
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
