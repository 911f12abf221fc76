"""The decoder skeleton every architecture shares, and the per-step attention batch.

An architecture supplies `build_attention(i)` and `build_mlp(i)`; the rest —
embedding, pre-norm residual blocks, final norm, LM head, the paged KV cache
contract — lives here once. Shape legend: N tokens in the step, D hidden,
V vocab, S cache slots.
"""
from dataclasses import dataclass

import numpy as np
import torch

from moed.backends.torch import LayerLoop
from moed.errors import CheckpointError
from moed.model.layers import Linear, Loader
from moed.model.model_config import HFConfig
from moed.model.moe import MoE


@dataclass
class SeqSlice:
    """One sequence's share of a step."""
    start: int              # first row of its new tokens in the flattened step
    length: int             # new tokens this step
    context: int            # tokens in the cache after this step (past + new)
    slots: np.ndarray       # [context] int64 (host): cache slot of positions 0..context-1


@dataclass
class Prefill:
    """A chunk of several new tokens of one sequence."""
    rows: slice             # its rows in the step
    slots: torch.Tensor     # [L] int64: cache slots of its positions 0..L-1
    mask: torch.Tensor      # [n, L] bool: causal, offset by the L - n cached tokens;
                            # None when nothing is cached yet (n == L: plain causal)
    first: int = None       # slots[0] when the slots are one run first..first+L-1

    def cached(self, kv_cache):
        """[L, *entry] of the sequence's cache entries: a view when its slots are one
        run (blocks handed out in order: the common case), else a gathered copy
        (a 4K-token chunk's copy is 16 MiB a layer in the FP32 GQA cache)."""
        if self.first is not None:
            return kv_cache[self.first:self.first + self.slots.shape[0]]
        return kv_cache[self.slots]


@dataclass
class AttentionBatch:
    """What attention needs for one step, built once and shared by every layer.

    Sequences with one new token (decodes) attend in one padded call; each
    prefill chunk attends on its own.
    """
    slot_mapping: torch.Tensor    # [N] int64: cache slot of each new token
    kv_caches: list               # per layer: [S, *kv_token_shape] tensor
    decode_rows: torch.Tensor     # [B] int64 rows of the decodes, or None
    decode_slots: torch.Tensor    # [B, Lmax] int64 (padding repeats a valid slot)
    decode_mask: torch.Tensor     # [B, 1, Lmax] bool: False on padding
    prefills: list                # [Prefill]
    decode_context: torch.Tensor = None   # [B] int64: cached tokens of each decode (this one's too)

    @classmethod
    def build(cls, slices, kv_caches, device):
        # host-side numpy, then one copy each to the device: a decode step builds this
        # for every sequence, and torch's per-op cost (~10 us) would add up
        on = lambda a: torch.from_numpy(a).to(device)                   # noqa: E731
        slot_mapping = on(np.concatenate([s.slots[s.context - s.length:] for s in slices]))
        decodes = [s for s in slices if s.length == 1]
        rows = slots = mask = ctx = None
        if decodes:
            context = np.array([s.context for s in decodes], dtype=np.int64)
            Lmax = int(context.max())
            table = np.empty((len(decodes), Lmax), dtype=np.int64)
            for row, s in zip(table, decodes):
                row[:s.context] = s.slots
                row[s.context:] = s.slots[0]              # padding: a valid slot, masked
            rows = on(np.array([s.start for s in decodes], dtype=np.int64))
            slots, ctx = on(table), on(context)
            mask = on(np.arange(Lmax)[None, None, :] < context[:, None, None])
        prefills = [Prefill(slice(s.start, s.start + s.length), on(s.slots),
                            None if s.length == s.context else
                            causal_mask(s.length, s.context, device), run_start(s.slots))
                    for s in slices if s.length > 1]
        return cls(slot_mapping, kv_caches, rows, slots, mask, prefills, ctx)


def run_start(slots):
    """slots[0] when slots [L] (numpy int64) are first, first + 1, ..., else None."""
    first = int(slots[0])
    return first if slots[-1] - first == len(slots) - 1 and \
        (len(slots) < 3 or bool((np.diff(slots) == 1).all())) else None


def causal_mask(n, L, device):
    """[n, L] bool: query i (position L - n + i) sees keys 0..L - n + i."""
    return torch.ones(n, L, dtype=torch.bool, device=device).tril(L - n)


class DecoderLayer:
    """Pre-norm residual block. The norms are applied by whoever adds to the residual
    stream: `norm.add(x, delta)` -> (x + delta, norm(x + delta)), which a backend may
    fuse into one pass; the model's forward chains the layers that way."""

    def __init__(self, input_norm, attn, post_norm, mlp):
        self.input_norm, self.attn = input_norm, attn
        self.post_norm, self.mlp = post_norm, mlp

    def __call__(self, x, h, cos_sin, batch, kv_cache, next_norm):
        # x [N, D] residual stream, h = input_norm(x) -> (x', next_norm(x'))
        x, h = self.post_norm.add(x, self.attn(h, cos_sin, batch, kv_cache))
        return next_norm.add(x, self.mlp(h))


class CausalLM:
    """Embedding -> decoder layers -> norm -> LM head, over a paged KV cache."""

    architecture = None

    def __init__(self, ckpt, device, expert_device=None):
        # expert_device: where the routed experts' weights live (default: device)
        self.cfg = HFConfig(ckpt.config, str(ckpt.dir / "config.json"))
        self.device = device
        self.expert_device = expert_device or device
        self.load = Loader(ckpt, device, expert_device)
        self.read_config(self.cfg)
        c = self.cfg
        self.hidden_size = c.positive("hidden_size")
        self.num_layers = c.positive("num_hidden_layers")
        self.vocab_size = c.positive("vocab_size")
        self.max_positions = c.positive("max_position_embeddings")
        self.eps = c.get("rms_norm_eps", float, 1e-6)
        D, V = self.hidden_size, self.vocab_size
        self.embed = self.load.tensor("model.embed_tokens.weight", (V, D))   # [V, D]
        self.rotary = self.build_rotary()
        self.layers = [self.build_layer(i) for i in range(self.num_layers)]
        self.norm = self.load.norm("model.norm.weight", D, self.eps)
        self.ops = LayerLoop()        # how the layers run; a backend may set its own
        tied = c.get("tie_word_embeddings", bool, False) and not self.load.has("lm_head.weight")
        self.lm_head = (Linear(self.load.weight("model.embed_tokens", V, D)) if tied
                        else self.load.linear("lm_head", V, D))

    # -- what an architecture provides
    def read_config(self, c):
        raise NotImplementedError

    def build_rotary(self):
        raise NotImplementedError

    def build_attention(self, i):
        raise NotImplementedError

    def build_mlp(self, i):
        raise NotImplementedError

    def kv_token_shape(self):
        """Shape of one token's entry in a layer's KV cache."""
        raise NotImplementedError

    # -- shared
    def build_layer(self, i):
        p = f"model.layers.{i}"
        return DecoderLayer(self.load.norm(f"{p}.input_layernorm.weight", self.hidden_size, self.eps),
                            self.build_attention(i),
                            self.load.norm(f"{p}.post_attention_layernorm.weight",
                                           self.hidden_size, self.eps),
                            self.build_mlp(i))

    def linear_modules(self):
        """(path, parent, attribute, module) of every module holding linears (named in
        its LINEARS): each layer's attention, its dense MLP or its MoE's shared experts.
        Backends swap linears through this list, never by walking attributes."""
        for i, layer in enumerate(self.layers):
            yield f"layers.{i}.attn", layer, "attn", layer.attn
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                if mlp.shared is not None:
                    yield f"layers.{i}.mlp.shared", mlp, "shared", mlp.shared
            else:
                yield f"layers.{i}.mlp", layer, "mlp", mlp

    def moe_layers(self):
        """(layer index, MoE) for every layer with routed experts."""
        return [(i, layer.mlp) for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)]

    @torch.inference_mode()
    def forward(self, input_ids, positions, batch):
        # input_ids, positions [N] int64 -> hidden [N, D] float32
        x = self.embed[input_ids].float()
        cos_sin = self.rotary.cos_sin(positions)
        h = self.layers[0].input_norm(x)
        return self.ops.run(self, x, h, cos_sin, batch)[1]

    @torch.inference_mode()
    def compute_logits(self, hidden):
        # hidden [M, D] -> logits [M, V] float32
        return self.lm_head(hidden)


def require_divisible(cfg, field, value, divisor, divisor_field):
    if value % divisor:
        raise CheckpointError(f"{cfg.path}: {field}={value} is not divisible by "
                              f"{divisor_field}={divisor}", path=cfg.path)
