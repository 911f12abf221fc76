"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head q/k RMSNorm,
softmax top-k routing, dense MLP layers by `decoder_sparse_step` / `mlp_only_layers`."""
from moed.model.attention import GQACausalLM
from moed.model.moe import MoE, SoftmaxRouter, load_experts


class Qwen3MoeForCausalLM(GQACausalLM):
    architecture = "Qwen3MoeForCausalLM"
    qk_norm = True

    def read_config(self, c):
        self.read_attention_config(c)
        self.num_experts = c.positive("num_experts")
        self.top_k = c.positive("num_experts_per_tok")
        self.norm_topk_prob = c.get("norm_topk_prob", bool, False)
        self.moe_inter = c.positive("moe_intermediate_size")
        self.dense_inter = c.positive("intermediate_size")
        self.sparse_step = c.positive("decoder_sparse_step", 1)
        self.mlp_only = set(c.get("mlp_only_layers", list, None) or [])
        self.qkv_bias = self.o_bias = c.get("attention_bias", bool, False)

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
