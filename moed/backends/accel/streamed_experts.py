"""StreamedExperts: one MoE layer's routed experts over a chunk of tokens, with the
weights streamed from host memory into a device ring (stream-loading prefill, SLP).

Two streams, one host thread issuing in order:

    loader:   wait done[s] (position i - R's)  copy expert -> slot s  record ready[s]
    compute:  wait ready[s]  expert's GEMMs, index_add into out  record done[s]

with s = i % R for the chunk's i-th active expert (ascending id). The loader runs up
to R experts ahead of the compute; a slot is refilled only after its "done". Only
experts that received tokens are copied, each once per chunk. Weights cross as
stored (FP8 as FP8, with its scales) and stay so in the slot.

An expert's arithmetic is the precision contract's (moed.backends.accel.tiles): its
tokens' x rounded to BF16 for gate and up, silu(g) * u in FP32 rounded to BF16 for
down, every linear a BF16 GEMM (FP8 widened per k block, block scales applied in
FP32) with FP32 sums, the weighted sum over a token's experts in FP32. So it agrees
with the CPU backend's kernels within the contract, not bit for bit with the FP32
reference (moed.backends.torch.TorchExperts), whose grouping and index_add order it
keeps. The same chunk gives the same bits every time, whatever the ring length; a
token's bits can change with the number of tokens its expert gets in the chunk (the
CPU twin's FP32 GEMMs round a row differently in GEMMs of fewer than ~12 rows, and
cuBLAS chooses its algorithm by shape).

Shape legend: T tokens, k experts per token, E experts, A active experts (received a
token), D hidden, I intermediate, R ring slots, n an expert's tokens.
"""
import threading
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch
import torch.nn.functional as F

from moed.backends.accel.ring import (BouncePool, ExpertRing, check_ring_length,
                                     choose_ring_length, layer_layout, pack_host)
from moed.backends.accel.tiles import linear
from moed.backends.torch import check_routing
from moed.errors import ConfigError


@dataclass
class ChunkPlan:
    """Which experts a chunk uses and which (token, j) pairs each one takes."""
    experts: list         # [A] expert ids with tokens, ascending
    counts: list          # [A] pairs per active expert
    order: torch.Tensor   # [T k] flat indices into topk_ids, grouped by expert (stable)

    def pairs(self, position):
        """The flat (token, j) indices of the position-th active expert: a slice of order."""
        start = self.starts[position]
        return self.order[start:start + self.counts[position]]

    @cached_property
    def starts(self):
        """[A] where each active expert's pairs begin in order."""
        return [0, *accumulate(self.counts)][:-1]


def plan_chunk(topk_ids):
    """topk_ids [T, k] int64 (host) -> ChunkPlan, grouped as TorchExperts groups them."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return ChunkPlan(experts.tolist(), counts.tolist(), order)


class StreamedExperts:
    """forward(x [T, D], topk_ids [T, k], topk_weights [T, k]) -> [T, D] float32, the
    experts streamed through a ring of ring_length (2 .. E) device slots; "auto" picks
    it from budget (a moed.backends.accel.ring.RingBudget) with choose_ring_length."""

    def __init__(self, gate, up, down, device, ring_length=2, budget=None, share=None,
                 staging="pinned"):
        # gate, up: lists of E Weight [I, D]; down: E Weight [D, I] (as TorchExperts).
        # share: another layer's StreamedExperts whose ring, streams and bounce pool
        # this one uses (a model's layers run one after another: one ring serves them
        # all, and a slot is refilled only after the previous layer's "done" on it).
        # staging: "pinned" packs the layer once into host staging memory (a load is
        # one copy); "bounce" packs each loaded expert into a few shared blocks just
        # before its copy (host memory for a few experts, not a copy of the layer)
        if staging not in ("pinned", "bounce"):
            raise ConfigError(f"staging must be pinned or bounce, got {staging!r}",
                              field="staging")
        self.device = device
        self.num_experts = len(gate)
        self.hidden = gate[0].shape[1]
        layout = layer_layout(gate, up, down)
        self.weights = (gate, up, down)
        self.host = pack_host(device, layout, gate, up, down) if staging == "pinned" else None
        self.bounce = None
        if share is not None:
            if share.ring.layout != layout or share.device is not device:
                raise ConfigError("a shared ring needs the same expert layout and device",
                                  field="experts")
            self.ring, self.loader, self.compute = share.ring, share.loader, share.compute
            self.bounce, self.lock = share.bounce, share.lock
        else:
            if ring_length == "auto":
                ring_length = self.auto_ring_length(layout, gate[0].shape[0], budget)
            check_ring_length(ring_length, len(gate))
            self.ring = ExpertRing(device, layout, ring_length)  # [R, N] on the device
            self.loader = device.stream("loader")
            self.compute = device.stream("compute")
            self.lock = threading.Lock()       # one chunk issued at a time on the ring
        if staging == "bounce" and self.bounce is None:
            self.bounce = BouncePool(device, layout)
        self.chunks = 0            # chunks run so far (tags the device's log)
        self.layer = None          # the model layer it serves, where set (tags the log)

    @classmethod
    def from_reference(cls, experts, device, ring_length=2, budget=None, share=None,
                       staging="pinned"):
        """From a moed.backends.torch.TorchExperts (its Weights, as stored)."""
        return cls(experts.gate, experts.up, experts.down, device, ring_length, budget, share,
                   staging)

    def auto_ring_length(self, layout, inter, budget):
        """The ring length choose_ring_length gives this layer under budget."""
        if budget is None:
            raise ConfigError('ring_length="auto" needs a RingBudget (budget=...)',
                              field="ring_length")
        flops = 6 * self.hidden * inter         # gate, up and down: 2 D I FLOPs each
        return choose_ring_length(self.num_experts, layout.nbytes, budget.tokens_per_expert,
                                  budget.h2d_bps, budget.gpu_flops, flops, budget.free_bytes)

    @property
    def name(self):
        return f"streamed-{self.device.kind}"

    def forward(self, x, topk_ids, topk_weights):
        with self.lock:
            return self._forward(x, topk_ids, topk_weights)

    def _forward(self, x, topk_ids, topk_weights):
        ids = self.check(x, topk_ids, topk_weights)
        plan = plan_chunk(ids)
        dev = self.device
        xd = dev.to_device(x)                                        # [T, D]
        wd = dev.to_device(topk_weights.reshape(-1))                 # [T k]
        order = dev.to_device(plan.order)                            # [T k]
        out = torch.zeros(xd.shape, dtype=torch.float32, device=xd.device)   # [T, D]
        dev.after_caller(self.compute)
        self.issue(ChunkPlan(plan.experts, plan.counts, order), xd, wd, ids.shape[1], out)
        dev.join(self.compute)
        self.chunks += 1
        return out

    __call__ = forward

    # -- the pipeline
    def issue(self, plan, x, w, k, out):
        """Issue every load and compute of one chunk, loads up to R ahead."""
        R, A = self.ring.length, len(plan.experts)
        for i in range(min(R, A)):
            self.issue_load(plan, i)
        for i in range(A):
            self.issue_compute(plan, i, x, w, k, out)
            if i + R < A:
                self.issue_load(plan, i + R)   # after compute(i): its done[s] is issued

    def issue_load(self, plan, i):
        s, e = self.ring.slot(i), plan.experts[i]
        tag = self.tag(i, e, s)
        # the slot's latest done: position i - R's, or at i < R the previous chunk's
        # (its compute may still run on CUDA: join does not block the host)
        if self.host is not None:
            src, sent = self.host[e], None
        else:                   # packed now, on the host, while the device computes
            src, sent = self.bounce.stage(*(ws[e] for ws in self.weights))
        self.loader.wait(self.ring.done[s])
        self.loader.copy(self.ring.slots[s], src, tag)
        if sent is not None:
            self.loader.record(sent, tag)
        self.loader.record(self.ring.ready[s], tag)

    def issue_compute(self, plan, i, x, w, k, out):
        s = self.ring.slot(i)
        tag = self.tag(i, plan.experts[i], s)
        pairs = plan.pairs(i)
        self.compute.wait(self.ring.ready[s])
        self.compute.launch(lambda: self.expert(s, pairs, x, w, k, out), tag)
        self.compute.record(self.ring.done[s], tag)

    def tag(self, position, expert, slot):
        return {"chunk": self.chunks, "position": position, "expert": expert, "slot": slot,
                "layer": self.layer}

    def expert(self, slot, pairs, x, w, k, out):
        """One expert's tokens, from its ring slot, under the precision contract.
        pairs [n] flat (token, j) indices, x [T, D], w [T k], out [T, D] += ..."""
        gate, up, down = self.ring.weights(slot)
        tok = pairs // k                                      # [n]
        h = x[tok].bfloat16()                                 # [n, D]
        act = F.silu(linear(h, gate)) * linear(h, up)         # [n, I] float32
        y = linear(act.bfloat16(), down)                      # [n, D] float32
        out.index_add_(0, tok, y * w[pairs, None])

    # -- arguments
    def check(self, x, topk_ids, topk_weights):
        """Shapes and id range -> topk_ids [T, k] int64 on the host."""
        return check_routing(x, topk_ids, topk_weights, self.hidden, self.num_experts)
