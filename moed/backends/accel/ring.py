"""An expert as one block of bytes, and the device ring of expert slots.

An expert's gate, up and down weights travel as they are stored (FP8 bytes with their
float32 block scales, or BF16), packed into one byte block by an ExpertLayout, so a
slot is filled by one host -> device copy. The ring is R such slots on the device with
a "ready" and a "done" event each, allocated once and reused for every layer's
chunk. Position i of a chunk's active experts goes to slot i % R; the slot is
refilled (position i + R) only after position i's "done". choose_ring_length sizes
the ring from the copy and compute times of an expert and the free device memory.

Shape legend: E experts, R ring slots, D hidden, I intermediate; an expert's bytes
are N = ExpertLayout.nbytes.
"""
import math
from dataclasses import dataclass

import torch

from moed.errors import ConfigError
from moed.model.formats import Weight

ALIGN = 64            # every field starts on a 64-byte boundary (dtype views, DMA)
PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class Field:
    """One tensor of an expert inside its byte block."""
    proj: str          # gate | up | down
    part: str          # data | scale
    dtype: torch.dtype
    shape: tuple
    offset: int        # bytes from the block's start

    @property
    def nbytes(self):
        return _numel(self.shape) * _itemsize(self.dtype)

    def view(self, block):
        """This field inside block [N] uint8 (a view, no copy)."""
        raw = block[self.offset:self.offset + self.nbytes]
        return raw.view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class ExpertLayout:
    """Where each of an expert's tensors lies in its N-byte block; every expert of a
    layer has the same layout."""
    fields: tuple      # [Field]
    blocks: tuple      # FP8 block size per projection (None for plain weights)
    nbytes: int

    @classmethod
    def of(cls, gate, up, down):
        """The layout of one expert's three Weights."""
        fields, offset = [], 0
        for proj, w in zip(PROJECTIONS, (gate, up, down)):
            parts = [("data", w.data)] + ([("scale", w.scale_inv)] if w.is_fp8 else [])
            for part, t in parts:
                fields.append(Field(proj, part, t.dtype, tuple(t.shape), offset))
                offset = _aligned(offset + fields[-1].nbytes)
        blocks = tuple(tuple(w.block) if w.is_fp8 else None for w in (gate, up, down))
        return cls(tuple(fields), blocks, offset)

    def pack(self, block, gate, up, down):
        """One expert's Weights into block [N] uint8."""
        ws = dict(zip(PROJECTIONS, (gate, up, down)))
        for f in self.fields:
            w = ws[f.proj]
            f.view(block).copy_(w.data if f.part == "data" else w.scale_inv)

    def weights(self, block):
        """block [N] uint8 -> (gate, up, down) Weights viewing it."""
        parts = {(f.proj, f.part): f.view(block) for f in self.fields}
        return tuple(Weight(parts[p, "data"], parts.get((p, "scale")), b)
                     for p, b in zip(PROJECTIONS, self.blocks))


def layer_layout(gate, up, down):
    """The one layout of E experts' Weights; ConfigError if they differ."""
    layout = ExpertLayout.of(gate[0], up[0], down[0])
    for e in range(1, len(gate)):
        if ExpertLayout.of(gate[e], up[e], down[e]) != layout:
            raise ConfigError(f"expert {e} differs from expert 0 in dtype, shape or block "
                              "size; a streamed layer needs one layout", field="experts")
    return layout


def pack_host(device, layout, gate, up, down):
    """E experts -> host [E, N] uint8 in the device's staging memory (pinned on CUDA)."""
    host = device.host_empty((len(gate), layout.nbytes), torch.uint8)
    host.zero_()                       # alignment padding: deterministic bytes
    for e in range(len(gate)):
        layout.pack(host[e], gate[e], up[e], down[e])
    return host


class BouncePool:
    """A few host staging blocks (pinned on CUDA) that a load packs its expert into from
    the checkpoint's tensors just before the copy: host memory for `count` experts
    instead of a second copy of every layer (DeepSeek-V3's routed experts are ~650 GB).
    Blocks are taken in turn; one is repacked only after the copy out of it completed
    (its "sent" event, recorded on the loader stream after the copy). Shared by every
    layer of a model, as the ring is."""

    def __init__(self, device, layout, count=4):
        self.layout = layout
        self.blocks = device.host_empty((count, layout.nbytes), torch.uint8)   # [count, N]
        self.blocks.zero_()                # alignment padding: deterministic bytes
        self.sent = [device.event(f"sent[{b}]") for b in range(count)]
        self.next = 0

    def stage(self, gate, up, down):
        """Pack one expert's Weights into the next free block -> (block [N], its sent
        event, to record on the stream that copies out of it)."""
        b = self.next % len(self.sent)
        self.next += 1
        self.sent[b].synchronize()         # the block's previous copy has been read out
        self.layout.pack(self.blocks[b], gate, up, down)
        return self.blocks[b], self.sent[b]


class ExpertRing:
    """R expert slots on the device, slots [R, N] uint8, with events ready[s] (the
    loader filled slot s) and done[s] (the compute stream finished with it)."""

    def __init__(self, device, layout, length):
        self.layout, self.length = layout, length
        self.slots = device.empty((length, layout.nbytes), torch.uint8)     # [R, N]
        self.ready = [device.event(f"ready[{s}]") for s in range(length)]
        self.done = [device.event(f"done[{s}]") for s in range(length)]

    def slot(self, position):
        """The slot of a chunk's position-th active expert."""
        return position % self.length

    def weights(self, slot):
        return self.layout.weights(self.slots[slot])


def check_ring_length(length, num_experts):
    """A ring holds 2 (ping-pong) .. E (a whole layer) experts."""
    if not isinstance(length, int) or isinstance(length, bool) or \
            not 2 <= length <= max(2, num_experts):
        raise ConfigError(f"ring_length must be an int in [2, {num_experts}] (the layer's "
                          f"experts), got {length!r}", field="ring_length")


@dataclass(frozen=True)
class RingBudget:
    """What ring_length="auto" weighs besides the layer's own shapes."""
    tokens_per_expert: float   # a chunk's (token, expert) pairs per active expert
    h2d_bps: float             # host -> device bytes/s from pinned staging
    gpu_flops: float           # the device's BF16 GEMM FLOP/s
    free_bytes: int            # device memory the ring may take


def choose_ring_length(num_experts, expert_bytes, tokens_per_expert, h2d_bps, gpu_flops,
                       expert_flops_per_token, free_bytes):
    """The ring length in [2, E] for a layer, from rho = copy time / compute time of an
    average expert: a whole layer when transfer-bound (rho >= 1: the loader is the
    bottleneck and must never stall on a done), ping-pong when compute-bound (rho ~ 0),
    2 + floor(2 rho / (1 - rho)) between (3 from rho = 1/3, 4 at 1/2, 20 at 0.9): the
    loader has to ride out runs of cold experts (a whole copy, little compute), and the
    nearer rho is to 1, the less time each expert gives back. Never more slots than
    free_bytes holds; ConfigError if 2 do not fit."""
    if h2d_bps <= 0 or gpu_flops <= 0:
        raise ConfigError(f"h2d_bps and gpu_flops must be > 0, got {h2d_bps}, {gpu_flops}",
                          field="ring_length")
    fits = int(free_bytes // expert_bytes)
    if fits < 2:
        raise ConfigError(f"a ring needs 2 expert slots of {expert_bytes} bytes, the device "
                          f"has {free_bytes} bytes free", field="ring_length")
    copy_s = expert_bytes / h2d_bps
    compute_s = tokens_per_expert * expert_flops_per_token / gpu_flops
    rho = copy_s / compute_s if compute_s > 0 else float("inf")
    wanted = num_experts if rho >= 1 else 2 + math.floor(2 * rho / (1 - rho))
    return max(2, min(wanted, num_experts, fits))


def _aligned(n):
    return -(-n // ALIGN) * ALIGN


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()
