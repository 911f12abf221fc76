"""The kernel's tile layout: how one expert matrix [out, in] is repacked.

A matrix is padded to multiples of 128 in both dimensions and cut into units
of 64 rows x 128 columns, stored row tile by row tile, k block by k block
(one row tile's whole k run is contiguous, so a task streams it linearly).
Inside a unit: 4 groups of 16 rows, each 32 chunks of 16 rows x 4 columns,
with the element order described in cython_src/expert_units.h (FP8 bytes are
pre-permuted so the in-register widening lands them where vdpbf16ps wants
them). Each unit has one float32 scale beside it: the checkpoint's 128x128
block scale for FP8 (a 64-row tile sits inside one 128-row block), 1.0 for
BF16 and INT4. An INT4 unit carries its own group parameters: 4 KiB of codes,
then its rows' FP32 group scales, then (asymmetric) the index offsets 16 - zero
(cython_src/expert_units.h). INT4 formats are named int4g<G> (symmetric: zero
8) or int4g<G>a (zero points per row and group).
"""
from dataclasses import dataclass

import numpy as np
import torch

from moed.errors import CheckpointError

UNIT_ROWS, UNIT_K = 64, 128
INT4_CODE_BYTES = UNIT_ROWS * UNIT_K // 2


# Inside a unit, each chunk [16 rows r, 4 cols k] (r = 4 rh + rl, k = 2 kh + kl) holds
# its BF16 words in the order (kh, r, kl) and its FP8 bytes in (rh, kh, rl, kl): the
# orders cython_src/expert_units.h reads. Both are transposes, done as numpy strided
# copies whose inner loops run long (a loop of 2 elements, the gather's, ran at
# ~0.15 GB/s): BF16 moves kl pairs as u32 words, 16 rows a loop; FP8 in two passes
# (FP8_BLOCK row tiles at a time, so the scratch stays in cache).
FP8_BLOCK = 1 << 20


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
        if is_int4(self.fmt):
            ng, asym = int4_params(self.fmt)
            return INT4_CODE_BYTES + 256 * ng + (64 * ng if asym else 0)
        return UNIT_ROWS * UNIT_K * (1 if self.fmt == "fp8" else 2)

    @property
    def nbytes(self):
        return self.tiles * self.kblocks * self.unit_bytes

    @property
    def nscales(self):
        return self.tiles * self.kblocks


def is_int4(fmt):
    return fmt.startswith("int4")


def int4_params(fmt):
    """'int4g32a' -> (groups per unit 4, asymmetric True)."""
    asym = fmt.endswith("a")
    return UNIT_K // int(fmt[5:-1] if asym else fmt[5:]), asym


def format_code(fmt):
    """The kernels' code of a packed format (cython_src/expert_units.h, WF_*)."""
    if is_int4(fmt):
        ng, asym = int4_params(fmt)
        return 2 | (4 if asym else 0) | ((ng.bit_length() - 1) << 3)
    return 1 if fmt == "fp8" else 0


def packed_format(w, name="weight"):
    """The packed format of a formats.Weight: 'fp8', 'bf16' or int4g<G>[a]."""
    if not w.is_int4:
        return weight_format(w.data, name)
    p = w.int4
    if p.g_idx is not None:
        raise CheckpointError(f"{name}: act-order INT4 (a permuted g_idx) is not taken by the "
                              "CPU kernels", tensor=name)
    if UNIT_K % p.group or p.group % 4:
        raise CheckpointError(f"{name}: INT4 group size {p.group} does not divide {UNIT_K}",
                              tensor=name)
    return f"int4g{p.group}" + ("a" if p.zeros is not None else "")


def int4_refusal(w, name="weight"):
    """Why the kernels cannot take INT4 weight w (act-order), or None: it then stays on
    the reference, which dequantizes it exactly."""
    try:
        packed_format(w, name)
    except CheckpointError as e:
        return str(e)
    return None


def weight_format(data, name="weight"):
    """'fp8' or 'bf16' for a stored expert weight (fp16/fp32 are packed as bf16)."""
    if data.dtype == torch.float8_e4m3fn:
        return "fp8"
    if data.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return "bf16"
    raise CheckpointError(f"{name}: expert weights of dtype {data.dtype} are not supported "
                          "by the CPU expert engine (fp8 e4m3, bf16, fp16, fp32)", tensor=name)


def pack_weight_into(units, scales, w, name="weight"):
    """A formats.Weight (any format) into units and scales (see pack_matrix_into)."""
    if w.is_int4:
        _int4_units(units, scales, w, packed_format(w, name))
    else:
        pack_matrix_into(units, scales, w.data, w.scale_inv, w.block, name)


def pack_weight(w, name="weight"):
    """A formats.Weight -> (units uint8 [nbytes], scales float32 [nscales])."""
    shape = MatrixShape(*w.shape, packed_format(w, name))
    units, scales = np.empty(shape.nbytes, np.uint8), np.empty(shape.nscales, np.float32)
    pack_weight_into(units, scales, w, name)
    return units, scales


def _int4_units(units, scales, w, fmt):
    """INT4 codes + group parameters -> units: codes of chunks 2p, 2p+1 four to a u16
    word (see cython_src/expert_units.h), then the unit's group scales and offsets."""
    rows, cols = w.shape
    shape = MatrixShape(rows, cols, fmt)
    ng, asym = int4_params(fmt)
    T, K, rp, kp = shape.tiles, shape.kblocks, padded(rows), padded(cols)
    codes = np.full((rp, kp), 8, np.uint16)
    codes[:rows, :cols] = w.codes().numpy()
    n = codes.reshape(T, 4, 16, K, 16, 2, 2, 2).transpose(0, 3, 1, 4, 2, 7, 5, 6)
    n = n.reshape(T, K, 4, 16, 32, 4)                        # t kb g p (r kl) (cpar kh)
    words = n[..., 0] | (n[..., 1] << 4) | (n[..., 2] << 8) | (n[..., 3] << 12)
    p = w.int4
    sc = np.zeros((rp, K * ng), np.float32)
    sc[:rows, :p.groups] = p.scales.float().numpy()
    sc = sc.reshape(T, 4, 16, K, ng).transpose(0, 3, 1, 4, 2)   # t kb g j r
    out = units.reshape(T, K, shape.unit_bytes)
    out[..., :INT4_CODE_BYTES] = words.reshape(T, K, -1).view(np.uint8)
    out[..., INT4_CODE_BYTES:INT4_CODE_BYTES + 256 * ng] = \
        np.ascontiguousarray(sc).reshape(T, K, -1).view(np.uint8)
    if asym:
        z = np.full((rp, K * ng), 8, np.int16)
        z[:rows, :p.groups] = p.zero_points().numpy()
        off = (16 - z).astype(np.uint8).reshape(T, 4, 16, K, ng).transpose(0, 3, 1, 4, 2)
        out[..., INT4_CODE_BYTES + 256 * ng:] = off.reshape(T, K, -1)
    scales[:] = 1.0


def pack_matrix(data, scale_inv=None, block=None, name="weight"):
    """[rows, cols] as stored (+ FP8 block scales) -> (units uint8 [nbytes], scales float32 [nscales])."""
    shape = MatrixShape(data.shape[0], data.shape[1], weight_format(data, name))
    units, scales = np.empty(shape.nbytes, np.uint8), np.empty(shape.nscales, np.float32)
    pack_matrix_into(units, scales, data, scale_inv, block, name)
    return units, scales


def pack_matrix_into(units, scales, data, scale_inv=None, block=None, name="weight"):
    """Pack [rows, cols] as stored (+ FP8 block scales) into units (contiguous uint8
    [nbytes]) and scales (float32 [nscales]): one strided copy, no temporaries
    unless the matrix needs padding."""
    fmt = weight_format(data, name)
    shape = MatrixShape(data.shape[0], data.shape[1], fmt)
    if fmt == "fp8":
        if scale_inv is None:
            raise CheckpointError(f"{name}: fp8 weight without weight_scale_inv", tensor=name)
        if tuple(block or (128, 128)) != (128, 128):
            raise CheckpointError(f"{name}: fp8 block size {tuple(block)} is not supported by the "
                                  "CPU expert engine (128x128)", tensor=name)
        raw = data.contiguous().view(torch.uint8).numpy()
    else:
        raw = data.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    rp, kp = padded(shape.rows), padded(shape.cols)
    if raw.shape != (rp, kp):
        full = np.zeros((rp, kp), dtype=raw.dtype)
        full[:shape.rows, :shape.cols] = raw
        raw = full
    T, K = shape.tiles, shape.kblocks
    if fmt == "fp8":
        _fp8_units(raw, units, T, K)
    else:
        src = raw.view(np.uint32).reshape(T, 4, 16, K, 32, 2).transpose(0, 3, 1, 4, 5, 2)
        np.copyto(units.view(np.uint32).reshape(src.shape), src)
    scales[:] = _unit_scales(shape, scale_inv, name).numpy()


def _fp8_units(raw, units, T, K):
    """FP8 [T * 64, K * 128] bytes -> units: rows interleaved four by four as u16 kl
    pairs (a u64 a row quad), then each (kh, rl, kl) 16 bytes (a complex128 word:
    copies are bitwise) moved to its (tile, k block, group, chunk, rh) place."""
    step = max(1, FP8_BLOCK // (UNIT_ROWS * UNIT_K * K))
    for t0 in range(0, T, step):
        n = min(step, T - t0)
        src = raw[t0 * UNIT_ROWS:(t0 + n) * UNIT_ROWS].view(np.uint16).reshape(n * 16, 4, K * 64)
        quads = np.empty((n * 16, K * 64, 4), np.uint16)
        for rl in range(4):
            quads[:, :, rl] = src[:, rl, :]
        words = quads.reshape(n * 16, K * 32, 8).view(np.complex128)
        words = words.reshape(n, 4, 4, K, 32)                                  # t g rh K c
        per_tile = K * UNIT_ROWS * UNIT_K
        out = units[t0 * per_tile:(t0 + n) * per_tile].view(np.complex128)
        out = out.reshape(n, K, 4, 32, 4)                                      # t K g c rh
        for rh in range(4):
            out[..., rh] = words[:, :, rh].transpose(0, 2, 1, 3)


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
