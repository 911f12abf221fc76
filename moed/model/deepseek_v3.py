"""DeepSeek-V3 / R1: multi-head latent attention (MLA), sigmoid group-limited
routing with a correction bias, shared experts, dense first layers.

The KV cache holds the compressed latent per token — kv_lora_rank normalized
latent + qk_rope_head_dim rotated key — not full K/V (576 floats per token
per layer for V3 instead of 2 x 128 heads x 192/128).
Shape legend: N new tokens, L cached tokens, H heads, r kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.
"""
import torch

from moed.backends.torch import MLAOps
from moed.model.base import CausalLM, require_divisible
from moed.model.layers import Rotary
from moed.model.model_config import yarn_mscale
from moed.model.moe import GroupedSigmoidRouter, MoE, load_experts


class MLAttention:
    """Projections, norms and rotary of one MLA layer; the arithmetic over the latent
    cache is its backend's (`ops`: moed.backends.torch.MLAOps unless one is installed)."""

    # what a backend may swap for its own linears (kv_b is read whole, as w_kv or as
    # stored by the absorbed products, never called)
    LINEARS = ("q_a", "q_b", "q_proj", "kv_a", "o")

    def __init__(self, q_a, q_a_norm, q_b, q_proj, kv_a, kv_a_norm, kv_b, o, rotary, dims, scale):
        self.q_a, self.q_a_norm, self.q_b, self.q_proj = q_a, q_a_norm, q_b, q_proj
        self.kv_a, self.kv_a_norm, self.kv_b, self.o = kv_a, kv_a_norm, kv_b, o
        self.rotary = rotary
        self.H, self.r, self.dn, self.dr, self.dv = dims
        self.scale = scale
        # kv_b read whole every step by both attention forms: dequantized once
        self.w_kv = kv_b.weight.dequantize().view(self.H, self.dn + self.dv, self.r)  # [H, dn+dv, r]
        self.ops = self.reference_ops()

    def reference_ops(self):
        return MLAOps(self)

    def queries(self, x):
        # x [N, D] -> q [N, H, dn + dr]
        q = self.q_proj(x) if self.q_proj is not None else self.q_b(self.q_a_norm(self.q_a(x)))
        return q.view(x.shape[0], self.H, self.dn + self.dr)

    def __call__(self, x, cos_sin, batch, kv_cache):
        # x [N, D] -> [N, D]; kv_cache [S, r + dr]
        N, r, dn = x.shape[0], self.r, self.dn
        q = self.queries(x)
        q = torch.cat((q[..., :dn], self.rotary(q[..., dn:], *cos_sin)), dim=-1)
        kv = self.kv_a(x)                                                 # [N, r + dr]
        latent = self.kv_a_norm(kv[:, :r])                                # [N, r]
        k_rot = self.rotary(kv[:, None, r:], *cos_sin)[:, 0]              # [N, dr]
        self.ops.store(kv_cache, batch.slot_mapping, torch.cat((latent, k_rot), -1))
        return self.o(self.attend(q, batch, kv_cache).reshape(N, self.H * self.dv))

    def attend(self, q, batch, kv_cache):
        # q [N, H, dn + dr] -> [N, H, dv]
        out = q.new_empty(q.shape[0], self.H, self.dv)
        if batch.decode_rows is not None:
            out[batch.decode_rows] = self.ops.attend_decodes(q[batch.decode_rows], batch,
                                                             kv_cache)
        for p in batch.prefills:
            out[p.rows] = self.ops.attend_prefill(q[p.rows], p.cached(kv_cache).float(), p.mask)
        return out


class DeepseekV3ForCausalLM(CausalLM):
    architecture = "DeepseekV3ForCausalLM"

    def read_config(self, c):
        self.heads = c.positive("num_attention_heads")
        self.q_lora_rank = c.positive("q_lora_rank", None)
        self.kv_lora_rank = c.positive("kv_lora_rank")
        self.dn = c.positive("qk_nope_head_dim")
        self.dr = c.positive("qk_rope_head_dim")
        self.dv = c.positive("v_head_dim")
        self.attention_bias = c.get("attention_bias", bool, False)
        self.num_experts = c.positive("n_routed_experts")
        self.shared_experts = c.get("n_shared_experts", int, 0) or 0
        self.top_k = c.positive("num_experts_per_tok")
        self.n_group = c.positive("n_group", 1)
        self.topk_group = c.positive("topk_group", 1)
        require_divisible(c, "n_routed_experts", self.num_experts, self.n_group, "n_group")
        self.norm_topk_prob = c.get("norm_topk_prob", bool, True)
        self.routed_scaling = c.get("routed_scaling_factor", float, 1.0)
        self.first_dense = c.get("first_k_dense_replace", int, 0)
        self.moe_freq = c.positive("moe_layer_freq", 1)
        self.moe_inter = c.positive("moe_intermediate_size")
        self.dense_inter = c.positive("intermediate_size")
        scoring = c.get("scoring_func", str, "sigmoid")
        if scoring != "sigmoid":
            raise c._bad("scoring_func", f"{scoring!r} is not supported (DeepSeek-V3 uses 'sigmoid')")

    def build_rotary(self):
        return Rotary(self.cfg.rope(self.dr), interleaved=self.cfg.get("rope_interleave", bool, True))

    def kv_token_shape(self):
        return (self.kv_lora_rank + self.dr,)

    def softmax_scale(self):
        # YaRN: the attention temperature mscale_all_dim applies twice (q and k).
        scale = (self.dn + self.dr) ** -0.5
        rope = self.cfg.rope(self.dr)
        mscale_all = rope.scaling.get("mscale_all_dim", 0)
        if rope.kind == "yarn" and mscale_all:
            scale *= yarn_mscale(rope.factor, mscale_all) ** 2
        return scale

    def build_attention(self, i):
        L, p, D = self.load, f"model.layers.{i}.self_attn", self.hidden_size
        H, r, dn, dr, dv = self.heads, self.kv_lora_rank, self.dn, self.dr, self.dv
        q_a = q_a_norm = q_b = q_proj = None
        if self.q_lora_rank:
            q_a = L.linear(f"{p}.q_a_proj", self.q_lora_rank, D, self.attention_bias)
            q_a_norm = L.norm(f"{p}.q_a_layernorm.weight", self.q_lora_rank, 1e-6)
            q_b = L.linear(f"{p}.q_b_proj", H * (dn + dr), self.q_lora_rank)
        else:
            q_proj = L.linear(f"{p}.q_proj", H * (dn + dr), D)
        return MLAttention(q_a, q_a_norm, q_b, q_proj,
                           L.linear(f"{p}.kv_a_proj_with_mqa", r + dr, D, self.attention_bias),
                           L.norm(f"{p}.kv_a_layernorm.weight", r, 1e-6),
                           L.linear(f"{p}.kv_b_proj", H * (dn + dv), r),
                           L.linear(f"{p}.o_proj", D, H * dv, self.attention_bias),
                           self.rotary, (H, r, dn, dr, dv), self.softmax_scale())

    def build_mlp(self, i):
        L, p, D = self.load, f"model.layers.{i}.mlp", self.hidden_size
        if i < self.first_dense or i % self.moe_freq:
            return L.mlp(p, D, self.dense_inter)
        E = self.num_experts
        router = GroupedSigmoidRouter(L.linear(f"{p}.gate", E, D),
                                      L.tensor(f"{p}.gate.e_score_correction_bias", (E,)),
                                      self.top_k, self.n_group, self.topk_group,
                                      self.norm_topk_prob, self.routed_scaling)
        experts = load_experts(L, f"{p}.experts", E, D, self.moe_inter)
        shared = (L.mlp(f"{p}.shared_experts", D, self.moe_inter * self.shared_experts)
                  if self.shared_experts else None)
        return MoE(router, experts, shared)
