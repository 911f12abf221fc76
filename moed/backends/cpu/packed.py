"""PackedExperts: one MoE layer's experts in the kernel's tile layout.

The buffers are numpy arrays: views of the mmap'ed store (read-only, shared
between processes) or of freshly packed memory. Only their addresses reach the
kernels; the arrays keep the memory alive.
"""
from dataclasses import dataclass

import numpy as np

from moed.errors import CheckpointError
from moed.backends.cpu.layout import MatrixShape, pack_matrix, weight_format

MATRICES = ("gate", "up", "down")


@dataclass
class PackedExperts:
    fmt: str                    # "fp8" | "bf16"
    num_experts: int            # E
    hidden: int                 # H
    inter: int                  # I
    buffers: dict               # "<m>" -> uint8 [E, nbytes], "<m>_scale" -> float32 [E, nscales]

    def shape(self, m):
        rows, cols = (self.hidden, self.inter) if m == "down" else (self.inter, self.hidden)
        return MatrixShape(rows, cols, self.fmt)

    def kernel_args(self, m):
        """(weights ptr, scales ptr, bytes/expert, floats/expert, row tiles, k blocks)."""
        s = self.shape(m)
        w, sc = self.buffers[m], self.buffers[m + "_scale"]
        return (w.ctypes.data, sc.ctypes.data, s.nbytes, s.nscales, s.tiles, s.kblocks)

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers.values())

    def expert_bytes(self):
        """Bytes of one expert's three packed matrices (what a token reads per expert)."""
        return sum(self.shape(m).nbytes + 4 * self.shape(m).nscales for m in MATRICES)


def empty_buffers(fmt, E, H, I):
    probe = PackedExperts(fmt, E, H, I, {})
    out = {}
    for m in MATRICES:
        s = probe.shape(m)
        out[m] = np.empty((E, s.nbytes), dtype=np.uint8)
        out[m + "_scale"] = np.empty((E, s.nscales), dtype=np.float32)
    return out


def layer_format(weights, where):
    """The one format of a layer's expert weights ([(Weight, name)]), or CheckpointError."""
    fmts = {weight_format(w.data, name) for w, name in weights}
    if len(fmts) != 1:
        raise CheckpointError(f"{where}: experts mix weight formats {sorted(fmts)}")
    return fmts.pop()


def pack_expert_into(buffers, e, gate, up, down, names=("gate", "up", "down")):
    """Pack expert e's three Weights into row e of preallocated buffers."""
    for m, w, name in zip(MATRICES, (gate, up, down), names):
        units, scales = pack_matrix(w.data, w.scale_inv, w.block, name)
        if units.size != buffers[m].shape[1]:
            raise CheckpointError(f"{name}: shape {tuple(w.data.shape)} differs from the layer's "
                                  "other experts", tensor=name)
        buffers[m][e] = units
        buffers[m + "_scale"][e] = scales
