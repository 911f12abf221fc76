"""PackedExperts: one MoE layer's experts in the kernel's tile layout.

The buffers are numpy arrays: views of the mmap'ed store (read-only, shared
between processes) or of freshly packed memory. Only their addresses reach the
kernels; the arrays keep the memory alive.
"""
from dataclasses import dataclass

import numpy as np

from moed.errors import CheckpointError
from moed.backends.cpu.layout import MatrixShape, format_code, pack_weight_into, packed_format

MATRICES = ("gate", "up", "down")


@dataclass
class PackedExperts:
    fmt: str                    # "fp8" | "bf16" | "int4g<G>[a]" (layout.py)
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
    def code(self):
        """The kernels' format code (layout.format_code)."""
        return format_code(self.fmt)

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers.values())

    def expert_bytes(self):
        """Bytes of one expert's three packed matrices (what a token reads per expert)."""
        return sum(self.shape(m).nbytes + 4 * self.shape(m).nscales for m in MATRICES)


def buffer_specs(fmt, E, H, I):
    """{buffer name: (dtype, shape)} of one layer's packed experts."""
    probe = PackedExperts(fmt, E, H, I, {})
    specs = {}
    for m in MATRICES:
        s = probe.shape(m)
        specs[m] = ("uint8", [E, s.nbytes])
        specs[m + "_scale"] = ("float32", [E, s.nscales])
    return specs


def empty_buffers(fmt, E, H, I):
    return {name: np.empty(shape, dtype=dtype)
            for name, (dtype, shape) in buffer_specs(fmt, E, H, I).items()}


def layer_format(weights, where):
    """The one format of a layer's expert weights ([(Weight, name)]), or CheckpointError."""
    fmts = {packed_format(w, name) for w, name in weights}
    if len(fmts) != 1:
        raise CheckpointError(f"{where}: experts mix weight formats {sorted(fmts)}")
    return fmts.pop()


def pack_expert_into(buffers, e, gate, up, down, names=("gate", "up", "down")):
    """Pack expert e's three Weights into row e of preallocated buffers."""
    for m, w, name in zip(MATRICES, (gate, up, down), names):
        units, scales = buffers[m][e], buffers[m + "_scale"][e]
        s = MatrixShape(*w.shape, packed_format(w, name))
        if (s.nbytes, s.nscales) != (units.size, scales.size):
            raise CheckpointError(f"{name}: shape {tuple(w.shape)} differs from the layer's "
                                  "other experts", tensor=name)
        pack_weight_into(units, scales, w, name)
