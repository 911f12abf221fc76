"""A decode-only step's decoder layers in one compiled call (cython_src/decode_stack.c).

With every kernel of a GQA + routed-experts layer compiled, what is left of a
decode step's time besides the weights' read is Python between the kernels:
about 150 us a layer on 2 cores (views, checks, allocations, eight calls), ~1.7
ms of a 24-30 ms Qwen3-30B-A3B-shaped step. `DecodeStack` runs the same kernel
calls with the same inputs and thread count from C, so its hidden states are
those of the Python path bit for bit; the model's forward hands it decode-only
steps (StackedLayers, set as the model's `ops`) and falls back to the layer loop whenever it
declines one.

It is built (`build_decode_stack`) only for a model whose every layer is: GQA
with the fused q/k/v projection and o_proj on the kernels (no biases), the
compiled q/k norm + rotary (rotate-half), decode attention and KV store; RMS
norms on the compiled glue; a softmax router on the compiled glue feeding the
routed experts on the kernels, no shared experts. Anything else (DeepSeek's
MLA, dense MLP layers, the generic ISA with `deterministic` off, where torch
decodes attention, the torch reference) keeps the Python path. Each step it declines
when a layer's parts were swapped since (tests count calls through them), the step has a
prefill, or a cache is not a compiled one (FP32, BF16). MOED_DECODE_STACK=0
turns it off (benchmarks compare both).
Shape legend: B decodes, D hidden.
"""
import logging
import os
import threading

import torch

from moed.backends.cpu.decode_attention import _gqa_layout, _table, compiled_cache_step
from moed.backends.cpu.runtime import workspace
from moed.backends.torch import LayerLoop
from moed.errors import InvalidRequestError

log = logging.getLogger(__name__)


def enabled():
    return os.environ.get("MOED_DECODE_STACK", "1").strip() != "0"


def build_decode_stack(model):
    """A DecodeStack over the model's layers, or None (logged) when one of them is
    not the compiled GQA + routed-experts form."""
    try:
        return DecodeStack(model)
    except _NotEligible as e:
        log.info("decode stack: not used (%s)", e)
        return None


class StackedLayers(LayerLoop):
    """The model's layers with decode-only steps through `stack` from its first layer
    on; prefills, and the steps it declines, run the loop."""

    def __init__(self, stack):
        self.stack = stack          # DecodeStack

    def run(self, model, x, h, cos_sin, batch, start=0, stop=None):
        stack = self.stack
        if batch.prefills or start != 0 or stop is not None:
            return super().run(model, x, h, cos_sin, batch, start, stop)
        x, h = super().run(model, x, h, cos_sin, batch, 0, stack.first)
        out = stack(x, h, cos_sin, batch)       # layers first.. in one call, or None
        if out is not None:
            return x, out
        return super().run(model, x, h, cos_sin, batch, stack.first)


class _NotEligible(Exception):
    pass


def _hooks(layer):
    """What the stack read from a layer: the objects it took the weights and kernels
    of (compared by identity every step: a swapped one sends the step to the loop)."""
    a, m = layer.attn, layer.mlp
    ops = a.ops
    return (a, m, layer.post_norm, ops, a.o, a.rotary, getattr(ops, "qkv", None),
            getattr(ops, "rope", None), getattr(ops, "decode", None),
            getattr(ops, "store", None), getattr(m, "router", None),
            getattr(m, "experts", None), getattr(m, "shared", None))


def need(ok, why):
    if not ok:
        raise _NotEligible(why)


def stack_row(i, layer, next_norm, kernels, threads, D):
    """Layer i's entry of the C table (cython_src/kernels_ext.pxi, DecodeStack), from the
    CPU backend's public parts: its attention operations (CPUGQAOps: fused q/k/v, the
    q/k spans and norm weight), linears' tile arguments, router, experts and norms;
    or _NotEligible saying why not."""
    from moed.backends.cpu.experts import CPUExpertLayer
    from moed.backends.cpu.glue import CPURMSNorm, CPUSoftmaxRouter
    from moed.backends.cpu.gqa import CPUGQAOps
    from moed.backends.cpu.linears import CPULinear
    from moed.model.attention import GQAttention
    from moed.model.moe import MoE
    a, m = layer.attn, layer.mlp
    need(type(a) is GQAttention, f"layer {i}: not GQA")
    ops = a.ops
    need(type(ops) is CPUGQAOps and ops.spans is not None,
         f"layer {i}: q/k/v not one compiled projection")
    fused = ops.qkv.fused
    need(type(fused) is CPULinear and fused.bias is None, f"layer {i}: q/k/v bias")
    need(type(a.o) is CPULinear and a.o.bias is None, f"layer {i}: o_proj not compiled")
    need(not a.rotary.interleaved, f"layer {i}: rotary not on the compiled glue")
    need(ops.decode is not None, f"layer {i}: decode attention not compiled")
    for call in (ops.rope, ops.decode, ops.store):
        need(getattr(call, "keywords", {}).get("kernels") is kernels,
             f"layer {i}: a call on other kernels")
    need(type(m) is MoE and m.shared is None, f"layer {i}: not routed experts alone")
    need(type(m.router) is CPUSoftmaxRouter and m.router.gate.reference.bias is None,
         f"layer {i}: router not compiled")
    need(type(m.experts) is CPUExpertLayer, f"layer {i}: experts not compiled")
    need(all(type(n) is CPURMSNorm for n in (layer.input_norm, layer.post_norm, next_norm)),
         f"layer {i}: norms not compiled")
    parts = (fused, a.o, m.router.gate, m.experts, layer.post_norm, next_norm)
    need(all(p.kernels is kernels and p.threads == threads for p in parts),
         f"layer {i}: parts on other kernels or thread counts")
    need(m.experts.packed.hidden == D, f"layer {i}: experts' hidden size")
    (q0, _), (v0, _) = ops.spans
    qk_w = ops.qk_weight
    rw = m.router.gate.weight
    return (fused.args, a.o.args, q0, v0, a.heads, a.kv_heads, a.head_dim,
            0 if qk_w is None else qk_w.data_ptr(), ops.eps, a.scale,
            layer.post_norm.weight.data_ptr(), layer.post_norm.eps,
            rw.data_ptr(), rw.dtype == torch.bfloat16, m.experts.num_experts,
            m.router.k, bool(m.router.renorm), *m.experts.fixed_args[:4],
            m.experts.packed.inter, next_norm.weight.data_ptr(), next_norm.eps)


class DecodeStack:
    """The compiled layers: the longest run of the model's last layers that are all
    the compiled form (`first` on); the layers before it (a dense first layer, say)
    run in the loop, then hand over."""

    def __init__(self, model):
        need(bool(model.layers), "no layers")
        experts = [getattr(layer.mlp, "experts", None) for layer in model.layers]
        top = next((e for e in reversed(experts) if hasattr(e, "kernels")), None)
        need(top is not None, "no compiled routed experts")
        kernels, threads = top.kernels, top.threads
        need(hasattr(kernels, "DecodeStack"), "kernels without the stack")
        D = model.hidden_size
        nexts = [layer.input_norm for layer in model.layers[1:]] + [model.norm]
        rows, why = [], None
        for i in reversed(range(len(model.layers))):
            try:
                rows.append(stack_row(i, model.layers[i], nexts[i], kernels, threads, D))
            except _NotEligible as e:
                why = e
                break
        need(rows, str(why))
        rows.reverse()
        self.first = len(model.layers) - len(rows)
        layers = model.layers[self.first:]
        self.model = model
        self.kernels, self.threads, self.hidden = kernels, threads, D
        self._hooks = [_hooks(layer) for layer in layers]
        self._nexts = nexts[self.first:]         # (also keeps what the table points into)
        self._geometry = [(layer.attn.kv_heads, layer.attn.head_dim) for layer in layers]
        self.table = kernels.DecodeStack(rows, D)
        self._caches = None                 # the cache tensors the table points at
        # one step at a time: the table's cache entries are per step (two Python threads
        # decoding at once take turns, as they do on the kernels' pool anyway)
        self._lock = threading.Lock()
        self._k = {layer.mlp.router.k for layer in layers}
        # the last step's expert ids per layer [layers, B, k] (all layers' k equal), or None
        self.routed = None
        if why is not None:
            log.info("decode stack: layers %d.. (layer %d: %s)", self.first, self.first - 1, why)

    def _unchanged(self):
        layers = self.model.layers
        return len(layers) == self.first + len(self._hooks) and \
            all(_hooks(layer) == h for layer, h in zip(layers[self.first:], self._hooks)) and \
            [layer.input_norm for layer in layers[self.first + 1:]] + [self.model.norm] \
            == self._nexts

    def _point_at(self, caches, x):
        """Table entries for this step's caches; False when one is not compiled."""
        kept = self._caches
        if kept is not None and len(kept) == len(caches) and \
                all(a is b for a, b in zip(kept, caches)):
            return True
        ops = []
        for kv, (Hkv, d) in zip(caches, self._geometry):
            if not compiled_cache_step(kv, x):
                return False
            lay = _gqa_layout(kv)
            if (lay.Hkv, lay.d) != (Hkv, d):
                return False
            ops.append((lay.k, lay.v, lay.S))
        if len(ops) != len(self._geometry):
            return False
        self.table.set_caches(ops)
        self._caches = tuple(caches)
        return True

    def __call__(self, x, h, cos_sin, batch):
        """x [B, D] residual stream (updated in place), h = input_norm(x) of layer
        `first` -> the final norm of x [B, D], or None: this step takes the layer loop."""
        if batch.prefills or batch.decode_context is None or not self._unchanged():
            return None
        B, D = x.shape
        if not (x.dtype == h.dtype == torch.float32 and x.is_contiguous() and h.is_contiguous()
                and tuple(h.shape) == (B, D) and D == self.hidden and B > 0):
            return None
        from moed.model.layers import Rotary
        cos, sin = Rotary.halves(cos_sin)
        half = self._geometry[0][1] // 2
        if not (cos.dtype == sin.dtype == torch.float32 and tuple(cos.shape) == (B, half)
                and tuple(sin.shape) == (B, half) and cos.stride(1) == 1 and sin.stride(1) == 1
                and cos.stride(0) == sin.stride(0)):
            return None
        slots, context, mapping = batch.decode_slots, batch.decode_context, batch.slot_mapping
        Lmax = _table(slots, context, B)
        if not (mapping.dtype == torch.int64 and mapping.is_contiguous() and mapping.is_cpu
                and tuple(mapping.shape) == (B,)):
            return None
        ws = workspace(self.table.workspace_bytes(B, self.threads))
        routed = None
        if len(self._k) == 1:
            routed = torch.empty(len(self._hooks), B, *self._k, dtype=torch.int64)
        with self._lock:
            if not self._point_at(batch.kv_caches[self.first:], x):
                return None
            rc, layer, stage = self.table.run(x.data_ptr(), h.data_ptr(), B, cos.data_ptr(),
                                              sin.data_ptr(), cos.stride(0), mapping.data_ptr(),
                                              slots.data_ptr(), Lmax, context.data_ptr(),
                                              0 if routed is None else routed.data_ptr(),
                                              ws.ctypes.data, self.threads)
            self.routed = None if rc else routed
            S = self._caches[layer].shape[0] if rc else 0
        if rc:
            raise _failure(rc, layer, stage, mapping, slots, context, Lmax, S)
        return h


def _failure(rc, layer, stage, mapping, slots, context, Lmax, S):
    """The error the layer loop would have raised, from the C call's code."""
    if stage == 1:
        n = -1 - rc
        return InvalidRequestError(f"slot_mapping[{n}] = {int(mapping[n])} is outside the "
                                   f"cache's [0, {S})", field="slot_mapping")
    if stage == 2 and rc > 0:
        b = rc - 1
        return InvalidRequestError(f"context[{b}] = {int(context[b])} is outside [1, {Lmax}]",
                                   field="context")
    if stage == 2:
        i = -1 - rc
        return InvalidRequestError(f"slots[{i // Lmax}, {i % Lmax}] = "
                                   f"{int(slots.view(-1)[i])} is outside the cache's [0, {S})",
                                   field="slots")
    return InvalidRequestError(f"layer {layer}: the routed experts refused the router's "
                               f"choice (code {rc})", field="topk_ids")
