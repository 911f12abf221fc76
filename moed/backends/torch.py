"""The reference backend: every operation in plain torch, FP32 activations, weights as
published (dequantized exactly per call).

A model runs on it as built, before any other backend is installed; the tests take it
as the oracle; another backend falls back to it for what its kernels do not take. Its
operations objects are per layer, built with the layer they serve, and read only the
layer's public fields (weights, dims, norms, rotary). A faster backend subclasses them
and overrides what it runs faster (moed.backends.cpu).

Shape legend: N new tokens, n a prefill chunk's queries, L its keys (cached + new),
B decodes, Lmax the longest decode's keys, H query heads, Hkv key/value heads, d head
dim; MLA: r latent rank, dn / dr no-rope / rope key dims, dv value dim; T tokens, k
experts per token, D hidden.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moed.errors import InvalidRequestError
from moed.model.kv_dtype import to_cache

LATENT_MASK_BYTES = 1 << 26        # the folded mask of one latent_sdpa call, at most


@dataclass
class BackendInfo:
    """Which backend serves each part of a model, as installed (logged once, shown by
    `moectl status` through the engine's model info)."""
    experts: str = "torch"          # routed experts: torch | cpu-<isa>
    linears: str = "torch"          # dense linears: torch | cpu (<n> linears)
    attention: str = "torch"        # prefill/decode attention, KV store, q/k norm + rotary
    norms: str = "torch"
    routers: str = "torch"
    decode_stack: str = "off"       # a decode step's layers in one compiled call: on | off
    accel: str = "off"              # the hybrid engine: off | hybrid on <device> (...)
    notes: list = field(default_factory=list)    # fallbacks and why

    def summary(self):
        parts = [f"{k}={getattr(self, k)}" for k in
                 ("experts", "linears", "attention", "norms", "routers", "decode_stack",
                  "accel")]
        return ", ".join(parts + self.notes)


def install(model):
    """The reference operations everywhere they are set (what a built model already
    runs). -> BackendInfo"""
    model.ops = LayerLoop()
    for layer in model.layers:
        layer.attn.ops = layer.attn.reference_ops()
    return BackendInfo()


# -- the decoder layers
class LayerLoop:
    """A model's decoder layers, one after another."""

    def run(self, model, x, h, cos_sin, batch, start=0, stop=None):
        """Layers start..stop - 1 (default: all). x [N, D] residual stream, h =
        layers[start].input_norm(x) -> (x, the next norm of x) after layer stop - 1 (the
        final norm after the last layer)."""
        layers = model.layers
        nexts = [layer.input_norm for layer in layers[1:]] + [model.norm]
        for i in range(start, len(layers) if stop is None else stop):
            x, h = layers[i](x, h, cos_sin, batch, batch.kv_caches[i], nexts[i])
        return x, h


# -- attention over the paged KV cache
class GQAOps:
    """Grouped-query attention's operations for one moed.model.attention.GQAttention.
    Its KV cache entry per token is [2, Hkv, d] (key after rotary, value)."""

    def __init__(self, attn):
        self.attn = attn

    def project(self, x, cos_sin):
        """x [N, D] -> q [N, H, d], k [N, Hkv, d] (normed per head, rotated), v [N, Hkv, d]."""
        a = self.attn
        return self.heads(a.q(x), a.k(x), a.v(x), cos_sin)

    def heads(self, q, k, v, cos_sin):
        """Projections [N, H d], [N, Hkv d], [N, Hkv d] -> per-head q, k (normed,
        rotated), v."""
        a, N = self.attn, q.shape[0]
        v = v.view(N, a.kv_heads, a.head_dim)
        q = q.view(N, a.heads, a.head_dim)
        k = k.view(N, a.kv_heads, a.head_dim)
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        return a.rotary(q, *cos_sin), a.rotary(k, *cos_sin), v

    def store_kv(self, kv_cache, slot_mapping, k, v):
        """The step's new keys and values into their cache slots: kv_cache [S, 2, Hkv, d],
        slot_mapping [N], k, v [N, Hkv, d]."""
        kv_cache[slot_mapping, 0] = to_cache(k, kv_cache.dtype)
        kv_cache[slot_mapping, 1] = to_cache(v, kv_cache.dtype)

    def attend_prefill(self, q, k, v, mask, out):
        """One chunk: q [n, H, d] at positions L - n .. L - 1 over k, v [L, Hkv, d]; mask
        [n, L] bool (None: plain causal, n == L) -> written into out [n, H, d]."""
        out.copy_(sdpa(q[None], k[None], v[None], batched_mask(mask), self.attn.scale)[0])

    def attend_decodes(self, q, batch, kv_cache):
        """One new token per sequence: q [B, H, d] (the step's decode rows) -> [B, H, d]."""
        kv = kv_cache[batch.decode_slots]                          # [B, Lmax, 2, Hkv, d]
        return decode_attention(q, kv[:, :, 0], kv[:, :, 1], batch.decode_mask,
                                self.attn.scale)


class MLAOps:
    """DeepSeek MLA's operations for one moed.model.deepseek_v3.MLAttention. Its KV cache
    entry per token is the latent [r + dr]: normalized kv latent, then rotated k_rot.

    Two forms compute the same products, regrouped. Absorbed: q.k = (q_nope W_uk) .
    latent + q_rot . k_rot and the output W_uv (sum_l p_l latent_l), attending in the
    latent space; expanded: keys and values rebuilt from the latent (cheaper when many
    queries share them). Decodes are always absorbed."""

    def __init__(self, attn):
        self.attn = attn

    def store(self, kv_cache, slot_mapping, entry):
        """entry [N, r + dr] float32 into kv_cache [S, r + dr] at slot_mapping [N]."""
        kv_cache[slot_mapping] = to_cache(entry, kv_cache.dtype)

    def attend_prefill(self, q, cached, mask):
        """q [n, H, dn + dr] over cached [L, r + dr] float32, mask [n, L] (None: plain
        causal) -> [n, H, dv], in the form with fewer FLOPs."""
        if self.absorbed_is_cheaper(q.shape[0]):
            return self.absorbed(q[None], cached[None, :, None], batched_mask(mask))[0]
        return self.expanded(q, cached, mask)

    def attend_decodes(self, q, batch, kv_cache):
        """q [B, H, dn + dr] (the decode rows) -> [B, H, dv], absorbed."""
        return self.latent_output(self.decode_latent(self.latent_queries(q), batch, kv_cache))

    def decode_latent(self, q_abs, batch, kv_cache):
        """q_abs [B, H, r + dr] -> the latent-space output [B, H, r], over a gathered copy
        as two batched matmuls (torch's SDPA with one latent head shared by all H repeats
        the cache per head)."""
        r = self.attn.r
        cached = kv_cache[batch.decode_slots][:, :, None]          # [B, Lmax, 1, r + dr]
        return decode_attention(q_abs, cached, cached[..., :r], batch.decode_mask,
                                self.attn.scale)

    def latent_queries(self, q):
        """q [B, H, dn + dr] -> [B, H, r + dr]: the no-rope part into the latent
        (q_nope W_uk), the rope part as is."""
        a = self.attn
        q_lat = torch.einsum("bhn,hnr->bhr", q[..., :a.dn], a.w_kv[:, :a.dn])   # [B, H, r]
        return torch.cat((q_lat, q[..., a.dn:]), dim=-1)

    def latent_output(self, o_lat):
        """o_lat [B, H, r] -> [B, H, dv]: back out of the latent through W_uv."""
        a = self.attn
        return torch.einsum("bhr,hvr->bhv", o_lat, a.w_kv[:, a.dn:])

    def absorbed_is_cheaper(self, n):
        """FLOPs per cached token: absorbed ~ n H (2r + dr); expanded ~ H r (dn + dv) once
        plus n H (dn + dr + dv)."""
        a = self.attn
        return n * (2 * a.r + a.dr) < a.r * (a.dn + a.dv) + n * (a.dn + a.dr + a.dv)

    def absorbed(self, q, cached, mask):
        """q [B, n, H, dn + dr], cached [B, L, 1, r + dr], mask [B, n, L] -> [B, n, H, dv]."""
        a = self.attn
        q_lat = torch.einsum("bshn,hnr->bshr", q[..., :a.dn], a.w_kv[:, :a.dn])  # [B, n, H, r]
        q_abs = torch.cat((q_lat, q[..., a.dn:]), dim=-1)                  # [B, n, H, r + dr]
        o_lat = self.latent_attention(q_abs, cached, mask)                 # [B, n, H, r]
        return torch.einsum("bshr,hvr->bshv", o_lat, a.w_kv[:, a.dn:])

    def latent_attention(self, q_abs, cached, mask):
        """q_abs [B, n, H, r + dr] over one shared latent head cached [B, L, 1, r + dr]
        -> [B, n, H, r]."""
        r, scale = self.attn.r, self.attn.scale
        if q_abs.is_cpu:
            return latent_sdpa(q_abs, cached, r, mask, scale)
        return sdpa(q_abs, cached, cached[..., :r], mask, scale)

    def expanded(self, q, cached, mask):
        """Keys and values expanded from the latent. q [n, H, dn + dr], cached [L, r + dr],
        mask [n, L] -> [n, H, dv]."""
        a = self.attn
        H, r, dn, dr = a.H, a.r, a.dn, a.dr
        kv = torch.einsum("lr,hjr->lhj", cached[:, :r], a.w_kv)           # [L, H, dn + dv]
        k = torch.cat((kv[..., :dn], cached[:, None, r:].expand(-1, H, dr)), dim=-1)
        return self.full_attention(q, k, kv[..., dn:], mask)

    def full_attention(self, q, k, v, mask):
        """q [n, H, dq], k [L, H, dq], v [L, H, dv], mask [n, L] -> [n, H, dv]."""
        return sdpa(q[None], k[None], v[None], batched_mask(mask), self.attn.scale)[0]


# -- routed experts
def check_routing(x, topk_ids, topk_weights, hidden, num_experts=None):
    """The routed-experts interface's argument shapes: x [T, hidden], topk_ids and
    topk_weights [T, k]; InvalidRequestError naming the field otherwise. With
    num_experts E, also every id in [0, E); returns topk_ids [T, k] int64 on the host."""
    if x.dim() != 2 or x.shape[1] != hidden:
        raise InvalidRequestError(f"x has shape {tuple(x.shape)}, expected [T, {hidden}]",
                                  field="x")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise InvalidRequestError(f"topk_ids has shape {tuple(topk_ids.shape)}, expected "
                                  f"[{x.shape[0]}, k]", field="topk_ids")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise InvalidRequestError(f"topk_weights has shape {tuple(topk_weights.shape)}, "
                                  f"expected {tuple(topk_ids.shape)}", field="topk_weights")
    if num_experts is None:
        return None
    ids = topk_ids.detach().cpu().to(torch.int64)
    bad = ((ids < 0) | (ids >= num_experts)).reshape(-1).nonzero()
    if len(bad):
        i, k = int(bad[0]), ids.shape[1]
        raise InvalidRequestError(f"topk_ids[{i // k}, {i % k}] = {int(ids.view(-1)[i])} is "
                                  f"outside [0, {num_experts})", field="topk_ids")
    return ids


class TorchExperts:
    """Routed experts, reference: dequantize each active expert per call, matmul in FP32.

    Holds the checkpoint's tensors as they are (mmap views), so FP8 experts stay FP8 in
    memory. forward computes, for every token t,
        y[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
    with e = topk_ids[t, j]."""

    name = "torch"

    def __init__(self, gate, up, down):
        self.gate = gate    # list of E Weight, each [I, D]
        self.up = up        # list of E Weight, each [I, D]
        self.down = down    # list of E Weight, each [D, I]

    @property
    def num_experts(self):
        return len(self.gate)

    def to(self, device):
        return TorchExperts(*([w.to(device) for w in ws] for ws in (self.gate, self.up, self.down)))

    def forward(self, x, topk_ids, topk_weights):
        # x [T, D] float32, topk_ids [T, k] int64, topk_weights [T, k] float32 -> [T, D]
        out = torch.zeros_like(x)
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
        start = 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            slots = order[start:start + n]                     # [n] indices into T*k
            start += n
            tok = slots // topk_ids.shape[1]                   # [n]
            h = x[tok]                                         # [n, D]
            g = h @ self.gate[e].dequantize().T                # [n, I]
            u = h @ self.up[e].dequantize().T                  # [n, I]
            y = (F.silu(g) * u) @ self.down[e].dequantize().T  # [n, D]
            out.index_add_(0, tok, y * topk_weights.reshape(-1)[slots, None])
        return out


# -- attention arithmetic
def sdpa(q, k, v, mask, scale):
    """Masked attention through torch's fused kernel (blocked: never a full score matrix).

    q [B, n, H, dq], k [B, L, Hkv, dq], v [B, L, Hkv, dv], mask [B, n, L] bool
    (True = may attend), or None for plain causal over n == L (the kernel then
    skips the masked half instead of computing it). Hkv divides H (grouped-query).
    Returns [B, n, H, dv] float32.
    """
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=None if mask is None else mask[:, None], is_causal=mask is None,
        scale=scale, enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2)


def decode_attention(q, k, v, mask, scale):
    """One new token per sequence, as two batched matmuls: on the CPU torch's fused
    kernel costs ~0.1 ms of setup per call for what is a few microseconds of work
    at one query row. The scores are [B, H, L]: one row per head, never [L, L].

    q [B, H, d], k [B, L, Hkv, d], v [B, L, Hkv, dv], mask [B, 1, L] bool (False on
    padding) -> [B, H, dv] float32.
    """
    B, H, d = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, d)                              # [B, Hkv, g, d]
    s = torch.matmul(qg, k.float().permute(0, 2, 3, 1)) * scale      # [B, Hkv, g, L]
    if B > 1:                          # one sequence alone has no padding
        s = s.masked_fill(~mask[:, :, None, :], float("-inf"))
    p = s.softmax(dim=-1)
    return torch.matmul(p, v.float().transpose(1, 2)).reshape(B, H, -1)


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


def batched_mask(mask):
    """[n, L] -> [1, n, L]; None (plain causal) stays None."""
    return None if mask is None else mask[None]
