"""Mixtral (softmax top-k, renormalized) and Qwen2-MoE (Qwen1.5-MoE: q/k/v
biases, a shared expert behind a sigmoid gate)."""
from moed.model.attention import GQACausalLM
from moed.model.moe import MoE, SoftmaxRouter, load_experts
from moed.model.qwen3_moe import Qwen3MoeForCausalLM


class MixtralForCausalLM(GQACausalLM):
    architecture = "MixtralForCausalLM"

    def read_config(self, c):
        self.read_attention_config(c)
        self.num_experts = c.positive("num_local_experts")
        self.top_k = c.positive("num_experts_per_tok")
        self.inter = c.positive("intermediate_size")

    def build_mlp(self, i):
        p, D = f"model.layers.{i}.block_sparse_moe", self.hidden_size
        router = SoftmaxRouter(self.load.linear(f"{p}.gate", self.num_experts, D), self.top_k,
                               norm_topk_prob=True)
        experts = load_experts(self.load, f"{p}.experts", self.num_experts, D, self.inter,
                               names=("w1", "w3", "w2"))
        return MoE(router, experts)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    architecture = "Qwen2MoeForCausalLM"
    qk_norm = False

    def read_config(self, c):
        super().read_config(c)
        self.shared_inter = c.positive("shared_expert_intermediate_size")
        self.qkv_bias = c.get("qkv_bias", bool, True)
        self.o_bias = False

    def build_shared(self, prefix):
        D = self.hidden_size
        return (self.load.mlp(f"{prefix}.shared_expert", D, self.shared_inter),
                self.load.linear(f"{prefix}.shared_expert_gate", 1, D))
