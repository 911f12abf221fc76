"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head q/k RMSNorm,
softmax top-k routing, dense MLP layers by `decoder_sparse_step` / `mlp_only_layers`."""
from moed.model.attention import load_gqa
from moed.model.base import CausalLM, require_divisible
from moed.model.layers import Rotary
from moed.model.moe import MoE, SoftmaxRouter, load_experts


class Qwen3MoeForCausalLM(CausalLM):
    architecture = "Qwen3MoeForCausalLM"
    qk_norm = True

    def read_config(self, c):
        self.heads = c.positive("num_attention_heads")
        self.kv_heads = c.positive("num_key_value_heads", self.heads)
        require_divisible(c, "num_attention_heads", self.heads, self.kv_heads, "num_key_value_heads")
        self.head_dim = c.positive("head_dim", None) or (
            c.positive("hidden_size") // self.heads)
        self.num_experts = c.positive("num_experts")
        self.top_k = c.positive("num_experts_per_tok")
        self.norm_topk_prob = c.get("norm_topk_prob", bool, False)
        self.moe_inter = c.positive("moe_intermediate_size")
        self.dense_inter = c.positive("intermediate_size")
        self.sparse_step = c.positive("decoder_sparse_step", 1)
        self.mlp_only = set(c.get("mlp_only_layers", list, None) or [])
        self.qkv_bias = self.o_bias = c.get("attention_bias", bool, False)

    def build_rotary(self):
        return Rotary(self.cfg.rope(self.head_dim))

    def kv_token_shape(self):
        return (2, self.kv_heads, self.head_dim)

    def build_attention(self, i):
        return load_gqa(self.load, f"model.layers.{i}.self_attn", self.rotary,
                        self.hidden_size, self.heads, self.kv_heads, self.head_dim,
                        self.qkv_bias, self.o_bias, self.eps if self.qk_norm else None)

    def is_sparse(self, i):
        return i not in self.mlp_only and (i + 1) % self.sparse_step == 0

    def build_mlp(self, i):
        p, D = f"model.layers.{i}.mlp", self.hidden_size
        if not self.is_sparse(i):
            return self.load.mlp(p, D, self.dense_inter)
        router = SoftmaxRouter(self.load.linear(f"{p}.gate", self.num_experts, D),
                               self.top_k, self.norm_topk_prob)
        experts = load_experts(self.load, f"{p}.experts", self.num_experts, D, self.moe_inter)
        return MoE(router, experts, *self.build_shared(p))

    def build_shared(self, prefix):
        return ()
