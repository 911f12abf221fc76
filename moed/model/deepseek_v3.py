"""DeepSeek-V3 / R1: multi-head latent attention (MLA), sigmoid group-limited
routing with a correction bias, shared experts, dense first layers.

The KV cache holds the compressed latent per token — kv_lora_rank normalized
latent + qk_rope_head_dim rotated key — not full K/V (576 floats per token
per layer for V3 instead of 2 x 128 heads x 192/128).
Shape legend: N new tokens, L cached tokens, H heads, r kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.
"""
import torch

from moed.model.base import CausalLM, require_divisible
from moed.model.layers import (Rotary, batched_mask, compiled_cache_step, decode_attention,
                               sdpa)
from moed.model.model_config import yarn_mscale
from moed.model.moe import GroupedSigmoidRouter, MoE, load_experts


LATENT_MASK_BYTES = 1 << 26        # the folded mask of one latent_sdpa call, at most


def latent_sdpa(q, cached, r, mask, scale):
    """Attention of every query head to one shared latent head, with the heads folded
    into the query rows: on the CPU, torch's grouped-query SDPA repeats the cache once
    per head (x2 at 100 queries over 4K keys, x9 at 16 over 1K). Rows go in chunks
    whose folded boolean mask stays within LATENT_MASK_BYTES.
    q [B, n, H, r + dr], cached [B, L, 1, r + dr], mask [B, n, L] (None: plain causal,
    n == L) -> [B, n, H, r]"""
    B, n, H, dq = q.shape
    L = cached.shape[1]
    out = q.new_empty(B, n, H, r)
    step = max(1, LATENT_MASK_BYTES // (H * L))
    for i in range(0, n, step):
        m = min(step, n - i)
        if mask is None:           # row i + j sees keys 0 .. i + j
            rows = torch.arange(L, device=q.device)[None] <= \
                torch.arange(i, i + m, device=q.device)[:, None]
            rows = rows.expand(B, m, L)
        else:
            rows = mask[:, i:i + m]
        folded = rows.repeat_interleave(H, dim=1)                     # [B, m H, L]
        o = sdpa(q[:, i:i + m].reshape(B, m * H, 1, dq), cached, cached[..., :r], folded, scale)
        out[:, i:i + m] = o.view(B, m, H, r)
    return out


class MLAttention:
    def __init__(self, q_a, q_a_norm, q_b, q_proj, kv_a, kv_a_norm, kv_b, o, rotary, dims, scale):
        self.q_a, self.q_a_norm, self.q_b, self.q_proj = q_a, q_a_norm, q_b, q_proj
        self.kv_a, self.kv_a_norm, self.kv_b, self.o = kv_a, kv_a_norm, kv_b, o
        self.rotary = rotary
        self.H, self.r, self.dn, self.dr, self.dv = dims
        self.scale = scale
        # kv_b read whole every step by both attention forms: dequantized once
        self.w_kv = kv_b.weight.dequantize().view(self.H, self.dn + self.dv, self.r)  # [H, dn+dv, r]
        # prefill chunks through the compiled flash-attention kernel when installed:
        # fn(q [n, H, dq], k [L, Hk, dq], v [L, Hk, dv], scale) (causal, offset L - n)
        self.prefill_kernel = None
        # decodes attend in the latent space straight out of the paged cache when
        # installed (no gathered copy): fn(q [B, H, r + dr] float32, kv_cache [S, r + dr],
        # dv, slots [B, Lmax], context [B], scale) -> [B, H, dv] (dv = r: the latent)
        self.decode_kernel = None
        # decodes' products with kv_b read as stored when installed (its FP32 copy w_kv is
        # 4x the bytes of FP8): .query(q_nope [B, H, dn]) -> [B, H, r] and
        # .output(o_lat [B, H, r]) -> [B, H, dv] (moed.backends.cpu.mla.LatentAbsorb)
        self.absorb = None
        # prefill chunks in the absorbed form with the decodes' products (set by a
        # deterministic backend): a position's output then does not depend on whether
        # a decode or a prefill chunk computed it
        self.one_form = False

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
        kv_cache[batch.slot_mapping] = torch.cat((latent, k_rot), -1).to(kv_cache.dtype)
        return self.o(self.attend(q, batch, kv_cache).reshape(N, self.H * self.dv))

    def attend(self, q, batch, kv_cache):
        # q [N, H, dn + dr] -> [N, H, dv]
        out = q.new_empty(q.shape[0], self.H, self.dv)
        w_kv = self.w_kv
        if batch.decode_rows is not None:
            out[batch.decode_rows] = self.attend_decodes(q[batch.decode_rows], batch, kv_cache)
        for p in batch.prefills:
            n, cached = p.rows.stop - p.rows.start, p.cached(kv_cache).float()    # [L, r + dr]
            if self.one_form and self.prefill_kernel is not None:
                q_abs = self.latent_queries(q[p.rows])                      # [n, H, r + dr]
                o_lat = self.prefill_kernel(q_abs, cached[:, None], cached[:, None, :self.r],
                                            self.scale)
                out[p.rows] = self.latent_output(o_lat)
            elif self.absorbed_is_cheaper(n):
                out[p.rows] = self.absorbed(q[None, p.rows], w_kv, cached[None, :, None],
                                            batched_mask(p.mask), self.prefill_kernel)[0]
            else:
                out[p.rows] = self.expanded(q[p.rows], w_kv, cached, p.mask)
        return out

    def attend_decodes(self, q, batch, kv_cache):
        """Absorbed, one query per sequence: q [B, H, dn + dr] (the decodes' rows) ->
        [B, H, dv]. Out of the paged cache through the compiled kernel when installed;
        otherwise over a gathered copy as two batched matmuls (torch's SDPA with one
        latent head shared by all H repeats the cache per head: x50-200 slower on the
        CPU at 512+ keys)."""
        r = self.r
        q_abs = self.latent_queries(q)                                       # [B, H, r + dr]
        if self.decode_kernel is not None and batch.decode_context is not None and \
                compiled_cache_step(kv_cache, q):
            o_lat = self.decode_kernel(q_abs, kv_cache, r, batch.decode_slots,
                                       batch.decode_context, self.scale)     # [B, H, r]
        else:
            cached = kv_cache[batch.decode_slots][:, :, None]          # [B, Lmax, 1, r + dr]
            o_lat = decode_attention(q_abs, cached, cached[..., :r], batch.decode_mask,
                                     self.scale)
        return self.latent_output(o_lat)

    def _absorb_for(self, x):
        return self.absorb if x.is_cpu and x.dtype == torch.float32 else None

    def latent_queries(self, q):
        """q [B, H, dn + dr] -> [B, H, r + dr]: the no-rope part into the latent
        (q_nope W_uk, kv_b as stored when the row kernels are installed), rope part as is."""
        dn, absorb = self.dn, self._absorb_for(q)
        if absorb is not None:
            q_lat = absorb.query(q[..., :dn].contiguous())
        else:
            q_lat = torch.einsum("bhn,hnr->bhr", q[..., :dn], self.w_kv[:, :dn])  # [B, H, r]
        return torch.cat((q_lat, q[..., dn:]), dim=-1)

    def latent_output(self, o_lat):
        """o_lat [B, H, r] -> [B, H, dv]: back out of the latent through W_uv."""
        absorb = self._absorb_for(o_lat)
        if absorb is not None:
            return absorb.output(o_lat.contiguous())
        return torch.einsum("bhr,hvr->bhv", o_lat, self.w_kv[:, self.dn:])

    def absorbed_is_cheaper(self, n):
        """FLOPs per cached token: absorbed ~ n H (2r + dr); expanded ~ H r (dn + dv) once
        plus n H (dn + dr + dv). Decode (n = 1) is always absorbed."""
        r, dn, dr, dv = self.r, self.dn, self.dr, self.dv
        return n * (2 * r + dr) < r * (dn + dv) + n * (dn + dr + dv)

    def absorbed(self, q, w_kv, cached, mask, kernel=None):
        """Weights absorbed: attend in the latent space, never expanding the cache.

        q.k = (q_nope W_uk) . latent + q_rot . k_rot, and the output is
        W_uv (sum_l p_l latent_l): the same products, regrouped.
        q [B, n, H, dn + dr], cached [B, L, 1, r + dr], mask [B, n, L] -> [B, n, H, dv]
        (`kernel`: one causal chunk, B = 1, through the compiled kernel)
        """
        dn, r = self.dn, self.r
        q_lat = torch.einsum("bshn,hnr->bshr", q[..., :dn], w_kv[:, :dn])     # [B, n, H, r]
        q_abs = torch.cat((q_lat, q[..., dn:]), dim=-1)                    # [B, n, H, r + dr]
        if kernel is not None:
            o_lat = kernel(q_abs[0], cached[0], cached[0, ..., :r], self.scale)[None]
        elif q.is_cpu:
            o_lat = latent_sdpa(q_abs, cached, r, mask, self.scale)
        else:
            o_lat = sdpa(q_abs, cached, cached[..., :r], mask, self.scale)  # [B, n, H, r]
        return torch.einsum("bshr,hvr->bshv", o_lat, w_kv[:, dn:])

    def expanded(self, q, w_kv, cached, mask):
        """Keys and values expanded from the latent: cheaper when many queries share them.
        q [n, H, dn + dr], cached [L, r + dr], mask [n, L] -> [n, H, dv]"""
        H, r, dn, dr = self.H, self.r, self.dn, self.dr
        kv = torch.einsum("lr,hjr->lhj", cached[:, :r], w_kv)             # [L, H, dn + dv]
        k = torch.cat((kv[..., :dn], cached[:, None, r:].expand(-1, H, dr)), dim=-1)
        if self.prefill_kernel is not None:
            return self.prefill_kernel(q, k, kv[..., dn:], self.scale)
        return sdpa(q[None], k[None], kv[None, ..., dn:], batched_mask(mask), self.scale)[0]


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
