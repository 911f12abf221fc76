"""DeepSeek MLA's absorbed decode products with kv_b in its checkpoint format, on
the compiled kernels (cython_src/mla_kernels.c): the query's no-rope part into the
latent (q_lat = q_nope W_uk) and the latent-space attention output back out
(o = o_lat W_uv^T), every head at once, kv_b read as stored (FP8 with block scales:
a quarter of the bytes of the FP32 copy the torch path multiplies by).
Shape legend: B decodes, H heads, dn / dv no-rope key / value head dims, r latent rank.
"""
import torch

from moed.errors import InvalidRequestError
from moed.backends.cpu.experts import default_threads

QUERY, OUTPUT = 0, 1


class LatentAbsorb:
    """kv_b [H (dn + dv), r] (a moed.model.formats.Weight: FP8 with 128 x 128 block
    scales, or BF16) bound once; `query` and `output` run the two products."""

    def __init__(self, weight, H, dn, dv, r, threads=None, kernels=None):
        if kernels is None:
            from moed.backends.cpu.isa import expert_kernels
            kernels = expert_kernels()
        data = weight.data
        if tuple(data.shape) != (H * (dn + dv), r) or not data.is_contiguous() or \
                data.device.type != "cpu":
            raise InvalidRequestError(f"kv_b is {tuple(data.shape)} on {data.device}, expected "
                                      f"contiguous [{H * (dn + dv)}, {r}] on the cpu",
                                      field="kv_b")
        if weight.is_fp8:
            if tuple(weight.block) != (128, 128) or weight.scale_inv.dtype != torch.float32:
                raise InvalidRequestError(f"kv_b FP8 block {weight.block} with "
                                          f"{weight.scale_inv.dtype} scales: 128 x 128 float32 "
                                          "expected", field="kv_b")
            self.scale = weight.scale_inv.contiguous()
        elif data.dtype != torch.bfloat16:
            raise InvalidRequestError(f"kv_b is {data.dtype}: FP8 or bfloat16 expected",
                                      field="kv_b")
        else:
            self.scale = None
        self.data, self.fp8 = data, weight.is_fp8
        self.H, self.dn, self.dv, self.r = H, dn, dv, r
        self.kernels, self.threads = kernels, threads or default_threads()

    def query(self, q_nope):
        """q_nope [B, H, dn] float32 (last dim contiguous) -> q_lat [B, H, r]."""
        return self._run(q_nope, self.dn, self.r, QUERY)

    def output(self, o_lat):
        """o_lat [B, H, r] float32 (last dim contiguous) -> [B, H, dv]."""
        return self._run(o_lat, self.r, self.dv, OUTPUT)

    def _run(self, x, n, m, mode):
        if not (x.dtype == torch.float32 and x.is_cpu and x.dim() == 3 and x.shape[1] == self.H
                and x.shape[2] == n and x.stride(2) == 1):
            raise InvalidRequestError(f"x is {x.dtype} {tuple(x.shape)} strides {x.stride()}: "
                                      f"float32 [B, {self.H}, {n}] with contiguous rows "
                                      "expected", field="x")
        B = x.shape[0]
        out = torch.empty(B, self.H, m, dtype=torch.float32)
        if B:
            scale = self.scale
            rc = self.kernels.mla_absorb_rows(
                self.data.data_ptr(), self.fp8, 0 if scale is None else scale.data_ptr(),
                0 if scale is None else scale.stride(0), self.H, self.dn, self.dv, self.r,
                x.data_ptr(), x.stride(0), x.stride(1), B, out.data_ptr(), mode, self.threads)
            if rc:
                raise InvalidRequestError(f"latent rank {self.r} is wider than the kernel "
                                          "takes", field="kv_b")
        return out
