"""The precision contract, emulated on the transformers reference (test helper).

moed's contract (README, "Precision contract"): weights as published, every
linear's input and the attention dot products' operands in BF16, accumulation,
softmax, norms, the router and the residual stream in FP32. `contract_logits`
runs the transformers model of a checkpoint (float32, dequantized weights; see
hf_reference.py) with exactly these roundings applied and nothing else:
  - every nn.Linear but the routers rounds its input to BF16 (round to nearest
    even), then computes in float32;
  - attention rounds Q and K to BF16 before QK^T, takes the scores, max and
    sum in float32, rounds the unnormalised probabilities exp(s - max) and V
    to BF16 before PV, and divides by the float32 sum.
Fast paths are judged against it: their mean KL divergence from the float32
reference may be at most 2x the emulation's, and they may miss no top-1 token
at a clear-margin position that the emulation gets right. DeepSeek's MLA is
emulated in the absorbed form moed runs (Q and K are the latent-space ones).
"""
import torch
from torch import nn

from hf_reference import hf_model

ROUTER_NAMES = ("gate", "shared_expert_gate")      # routers and Qwen2-MoE's shared gate
_IMPL = "moed_contract"


def bf16(x):
    return x.to(torch.bfloat16).to(x.dtype)


def contract_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    # query [B, H, n, dq], key [B, Hkv, L, dq], value [B, Hkv, L, dv] -> [B, n, H, dv]
    G = query.shape[1] // key.shape[1]
    k = bf16(key).repeat_interleave(G, dim=1)
    v = bf16(value).repeat_interleave(G, dim=1)
    s = torch.matmul(bf16(query), k.transpose(2, 3)) * scaling
    n, L = s.shape[-2:]
    visible = torch.arange(L)[None, :] <= torch.arange(n)[:, None] + (L - n)
    s = s.masked_fill(~visible, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    out = torch.matmul(bf16(e), v) / e.sum(-1, keepdim=True)
    return out.transpose(1, 2).contiguous(), None


def _legacy_contract_forward(self, hidden_states, attention_mask=None, position_ids=None,
                             past_key_values=None, output_attentions=False, use_cache=False,
                             cache_position=None, position_embeddings=None, **_):
    """Attention modules that inline eager attention instead of calling the attention
    interface (Qwen2-MoE in transformers 4.57): the same projections and rotary, then
    contract_attention. No cache: the tests run whole prompts."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import apply_rotary_pos_emb
    bsz, q_len, _ = hidden_states.size()
    shape = (bsz, q_len, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    out, _ = contract_attention(self, q, k, v, None, self.head_dim ** -0.5)
    return self.o_proj(out.reshape(bsz, q_len, -1)), None


def _fp32_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    # the same causal attention with no rounding (the FP32 kernels' roundings)
    G = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)
    s = torch.matmul(query, k.transpose(2, 3)) * scaling
    n, L = s.shape[-2:]
    visible = torch.arange(L)[None, :] <= torch.arange(n)[:, None] + (L - n)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), None


def _absorbed_mla_forward(self, hidden_states, position_embeddings, attention_mask=None,
                          past_key_values=None, cache_position=None, **_):
    """DeepSeek's MLA in the absorbed form moed runs (prefill and decode alike): the
    query's no-rope part taken into the latent through kv_b's W_uk (FP32, as moed's row
    kernels), attention over [latent, k_rot] with the latent as V, and the output back
    out through W_uv (FP32); so the contract's Q and K are the latent-space ones."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb, apply_rotary_pos_emb_interleave)
    B, T = hidden_states.shape[:-1]
    H, dn, dr, dv = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    r = self.kv_lora_rank
    q = self.q_proj(hidden_states) if self.q_lora_rank is None else \
        self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(B, T, H, dn + dr).transpose(1, 2)                        # [B, H, T, dn + dr]
    q_pass, q_rot = q[..., :dn], q[..., dn:]
    kv = self.kv_a_proj_with_mqa(hidden_states)
    latent = self.kv_a_layernorm(kv[..., :r])[:, None]                  # [B, 1, T, r]
    k_rot = kv[..., r:].view(B, 1, T, dr)
    cos, sin = position_embeddings
    rotate = apply_rotary_pos_emb_interleave if self.config.rope_interleave else \
        apply_rotary_pos_emb
    q_rot, k_rot = rotate(q_rot, k_rot, cos, sin)
    kv_b = self.kv_b_proj.linear if isinstance(self.kv_b_proj, _BF16Input) else self.kv_b_proj
    w = kv_b.weight.view(H, dn + dv, r)
    q_lat = torch.einsum("bhtn,hnr->bhtr", q_pass, w[:, :dn])
    attend = contract_attention if self._moed_bf16_attention else _fp32_attention
    o_lat, _ = attend(self, torch.cat((q_lat, q_rot), -1), torch.cat((latent, k_rot), -1),
                      latent, None, self.scaling)                       # [B, T, H, r]
    out = torch.einsum("bthr,hvr->bthv", o_lat, w[:, dn:])
    return self.o_proj(out.reshape(B, T, H * dv)), None


class _BF16Input(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(bf16(x))


def _emulating(model, bf16_attention):
    from transformers import AttentionInterface
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and child_name not in ROUTER_NAMES:
                setattr(mod, child_name, _BF16Input(child))
    if bf16_attention:
        AttentionInterface.register(_IMPL, contract_attention)
        for mod in model.modules():
            if hasattr(mod, "config"):
                mod.config._attn_implementation = _IMPL
            if type(mod).__name__ == "Qwen2MoeAttention":
                mod.forward = _legacy_contract_forward.__get__(mod)
    for mod in model.modules():
        if type(mod).__name__ == "DeepseekV3Attention":
            mod._moed_bf16_attention = bf16_attention
            mod.forward = _absorbed_mla_forward.__get__(mod)
    return model


_emulations = {}


def contract_model(model_dir, bf16_attention=True):
    """A transformers model of `model_dir` under the contract's roundings (cached; a
    separate copy from hf_model's float32 one). bf16_attention=False keeps attention
    in float32: the roundings of a path more precise than the contract there (the
    AVX2 and generic kernels), which is judged against its own roundings."""
    from pathlib import Path
    from hf_reference import load_reference
    key = (Path(model_dir).resolve(), bf16_attention)
    if key not in _emulations:
        _emulations[key] = _emulating(load_reference(key[0]), bf16_attention)
    return _emulations[key]


@torch.no_grad()
def reference_logits(model_dir, ids, bf16_attention=True):
    """(float32 reference logits [T, V], the emulation's logits [T, V]), float64."""
    x = torch.tensor([list(ids)])
    ref = hf_model(model_dir)(x).logits[0].double()
    emu = contract_model(model_dir, bf16_attention)(x).logits[0].double()
    return ref, emu


def mean_kl(ref, logits):
    """Mean over positions of KL(softmax(ref) || softmax(logits))."""
    p = torch.log_softmax(ref, -1)
    q = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def clear_margin(ref, margin):
    """Positions whose reference top-1 beats the runner-up by `margin` logits."""
    top2 = ref.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > margin


def _selection_gap(scores, k):
    """scores [T, E] -> [T]: how far the k-th pick is from the first one left out."""
    top = scores.topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def _grouped_gap(scores, k, n_group, topk_group):
    # DeepSeek's two-level pick: groups by the sum of their top two, then experts
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)                # [T, G]
    gap = _selection_gap(group_scores, topk_group) if topk_group < n_group else \
        torch.full((T,), float("inf"), dtype=scores.dtype)
    keep = group_scores.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)[:, :, None].expand_as(grouped)
    inside = scores.masked_fill(mask.reshape(T, E) == 0, float("-inf"))
    return torch.minimum(gap, _selection_gap(inside, k))


@torch.no_grad()
def router_near_ties(model_dir, ids, tau):
    """[T] bool: positions where some layer's expert pick in the float32 reference is
    within `tau` of another pick (in the score the router ranks by: logits for softmax
    routers, sigmoid + bias for DeepSeek's). There any rounding may swap an expert, and a
    swap moves that position's logits by whole units: no contract decides such a token."""
    model = hf_model(model_dir)
    cfg = model.config
    k = cfg.num_experts_per_tok
    gaps = []

    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        logits = x @ mod.weight.float().T
        if hasattr(mod, "e_score_correction_bias"):
            scores = logits.sigmoid() + mod.e_score_correction_bias.float()
            gaps.append(_grouped_gap(scores, k, cfg.n_group, cfg.topk_group))
        else:
            gaps.append(_selection_gap(logits, k))
    handles = [m.register_forward_pre_hook(hook) for name, m in model.named_modules()
               if name.endswith(".gate") and hasattr(m, "weight") and m.weight.shape[0] > 1]
    try:
        model(torch.tensor([list(ids)]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(gaps).min(0).values < tau
