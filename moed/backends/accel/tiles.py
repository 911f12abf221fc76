"""A linear on the device under the precision contract: y = h W^T from BF16 inputs and
the weight as stored, accumulated in FP32.

- BF16 weight: one GEMM, BF16 operands, FP32 accumulation and output.
- FP8 weight (e4m3 with float32 block scales [ceil(O/bo), ceil(K/bi)]): the FP8 stays
  FP8 in device memory (the ring slot); the linear widens it to BF16 (exact: every
  e4m3 value is a BF16, a transient of one projection), one BF16 GEMM per k block of
  bi columns with FP32 output, times the block's scale (broadcast over its bo output
  rows), summed over the k blocks in FP32:

      out[t, r] = sum_kb scale[r // bo, kb] * sum_{k in kb} W[r, k] h[t, k]

  which is what the CPU kernels compute (cython_src/expert_units.h: out += scale *
  (unit . x) per 128-wide block). The k blocks run as one batched matmul, K padded
  with zeros to whole blocks; rows go in tiles so that the FP32 partial products
  [KB, rows, O] stay under TEMP_BYTES. Tiling rows rather than grouping k blocks keeps
  a row's order of summation over the k blocks the same whatever n is.

On CUDA the GEMMs are torch.mm / torch.bmm with out_dtype=float32 where torch has that
overload (checked once per device); elsewhere, the CPU twin included, FP32 matmuls of
the BF16 values: the products are exact in FP32 and the sums FP32, the same contract.

Shape legend: n rows (tokens), K input features, O output features, (bo, bi) the FP8
block, KB = ceil(K / bi) k blocks.
"""
from functools import cache

import torch
import torch.nn.functional as F

TEMP_BYTES = 256 << 20     # bound on an FP8 linear's FP32 partial products [KB, rows, O]


def linear(h, weight):
    """h [n, K] bfloat16, weight a moed.model.formats.Weight [O, K] -> [n, O] float32."""
    if weight.is_fp8:
        return _fp8_linear(h, weight)
    return _gemm(h, weight.data.T)


def _fp8_linear(h, weight):
    n, K = h.shape
    O = weight.shape[0]
    bo, bi = weight.block
    KB = -(-K // bi)
    wide = _pad_k(weight.data.to(torch.bfloat16), KB * bi)             # [O, KB bi] exact
    w = wide.view(O, KB, bi).permute(1, 2, 0)                          # [KB, bi, O]
    x = _pad_k(h, KB * bi).view(n, KB, bi).transpose(0, 1)            # [KB, n, bi]
    scale = weight.scale_inv.repeat_interleave(bo, 0)[:O].T[:, None]   # [KB, 1, O]
    rows = max(1, TEMP_BYTES // (4 * KB * O))
    out = torch.empty(n, O, dtype=torch.float32, device=h.device)
    for t in range(0, n, rows):
        part = _gemm(x[:, t:t + rows], w)                               # [KB, rows, O]
        out[t:t + rows] = part.mul_(scale).sum(0)
    return out


def _pad_k(t, k):
    """t [..., K] with zero columns up to k."""
    return t if t.shape[-1] == k else F.pad(t, (0, k - t.shape[-1]))


def _gemm(a, b):
    """a [..., n, K] @ b [..., K, O] -> float32, from BF16 operands with FP32 sums."""
    if a.dtype == b.dtype == torch.bfloat16 and _has_out_dtype(a.device):
        mm = torch.bmm if a.dim() == 3 else torch.mm
        return mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@cache
def _has_out_dtype(device):
    """Whether torch.mm and torch.bmm take out_dtype=float32 for BF16 operands on device
    (CUDA builds of torch >= 2.8; never the CPU)."""
    if device.type != "cuda":
        return False
    a = torch.zeros(1, 1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.bmm(a, a, out_dtype=torch.float32)
        torch.mm(a[0], a[0], out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True
