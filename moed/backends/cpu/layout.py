"""The kernel's tile layout: how one expert matrix [out, in] is repacked.

A matrix is padded to multiples of 128 in both dimensions and cut into units
of 64 rows x 128 columns, stored row tile by row tile, k block by k block
(one row tile's whole k run is contiguous, so a task streams it linearly).
Inside a unit: 4 groups of 16 rows, each 32 chunks of 16 rows x 4 columns,
with the element order described in cython_src/expert_units.h (FP8 bytes are
pre-permuted so the in-register widening lands them where vdpbf16ps wants
them). Each unit has one float32 scale beside it: the checkpoint's 128x128
block scale for FP8 (a 64-row tile sits inside one 128-row block), 1.0 for
BF16.
"""
from dataclasses import dataclass

import numpy as np
import torch

from moed.errors import CheckpointError

UNIT_ROWS, UNIT_K, GROUP_ROWS = 64, 128, 16
FORMATS = ("fp8", "bf16")


def _chunk_perm(fmt):
    # position in a chunk -> logical index r * 4 + k of a [16 rows, 4 cols] chunk
    perm = np.empty(64, dtype=np.int64)
    for r in range(GROUP_ROWS):
        for k in range(4):
            word = 2 * r + (k & 1)
            pos = (16 * (word >> 3) + 8 * (k >> 1) + (word & 7) if fmt == "fp8"
                   else (k >> 1) * 32 + word)
            perm[pos] = r * 4 + k
    return perm


CHUNK_PERM = {fmt: _chunk_perm(fmt) for fmt in FORMATS}


def padded(n):
    return -(-n // UNIT_K) * UNIT_K


@dataclass(frozen=True)
class MatrixShape:
    """A packed [rows, cols] matrix: row tiles x k blocks units."""
    rows: int
    cols: int
    fmt: str

    @property
    def tiles(self):
        return padded(self.rows) // UNIT_ROWS

    @property
    def kblocks(self):
        return padded(self.cols) // UNIT_K

    @property
    def unit_bytes(self):
        return UNIT_ROWS * UNIT_K * (1 if self.fmt == "fp8" else 2)

    @property
    def nbytes(self):
        return self.tiles * self.kblocks * self.unit_bytes

    @property
    def nscales(self):
        return self.tiles * self.kblocks


def weight_format(data, name="weight"):
    """'fp8' or 'bf16' for a stored expert weight (fp16/fp32 are packed as bf16)."""
    if data.dtype == torch.float8_e4m3fn:
        return "fp8"
    if data.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return "bf16"
    raise CheckpointError(f"{name}: expert weights of dtype {data.dtype} are not supported "
                          "by the CPU expert engine (fp8 e4m3, bf16, fp16, fp32)", tensor=name)


def pack_matrix(data, scale_inv=None, block=None, name="weight"):
    """[rows, cols] as stored (+ FP8 block scales) -> (units uint8 [nbytes], scales float32 [nscales])."""
    fmt = weight_format(data, name)
    shape = MatrixShape(data.shape[0], data.shape[1], fmt)
    rp, kp = padded(shape.rows), padded(shape.cols)
    if fmt == "fp8":
        if scale_inv is None:
            raise CheckpointError(f"{name}: fp8 weight without weight_scale_inv", tensor=name)
        if tuple(block or (128, 128)) != (128, 128):
            raise CheckpointError(f"{name}: fp8 block size {tuple(block)} is not supported by the "
                                  "CPU expert engine (128x128)", tensor=name)
        raw = data.contiguous().view(torch.uint8).numpy()
    else:
        raw = data.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    full = np.zeros((rp, kp), dtype=raw.dtype)
    full[:shape.rows, :shape.cols] = raw
    # [tiles, 4 groups, 16 rows, kblocks, 32 chunks, 4 cols] -> unit-major, chunk elements permuted
    t = full.reshape(shape.tiles, 4, GROUP_ROWS, shape.kblocks, 32, 4)
    t = t.transpose(0, 3, 1, 4, 2, 5).reshape(-1, 64)[:, CHUNK_PERM[fmt]]
    units = np.ascontiguousarray(t).view(np.uint8).reshape(-1)
    return units, _unit_scales(shape, scale_inv, name).numpy()


def _unit_scales(shape, scale_inv, name):
    if shape.fmt == "bf16":
        return torch.ones(shape.nscales, dtype=torch.float32)
    grid = (-(-shape.rows // 128), -(-shape.cols // 128))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, "
                              f"expected {grid} for a {shape.rows}x{shape.cols} weight", tensor=name)
    rows = torch.arange(shape.tiles) // 2                # 64-row tile -> 128-row block
    s = scale_inv.float()[rows.clamp(max=grid[0] - 1)]   # [tiles, grid cols]
    pad = shape.kblocks - grid[1]
    if pad:
        s = torch.cat([s, s.new_ones(shape.tiles, pad)], dim=1)
    return s.contiguous().reshape(-1)
