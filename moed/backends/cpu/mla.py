"""DeepSeek MLA's absorbed decode products with kv_b in its checkpoint format, on
the compiled kernels (cython_src/mla_kernels.c): the query's no-rope part into the
latent (q_lat = q_nope W_uk) and the latent-space attention output back out
(o = o_lat W_uv^T), every head at once, kv_b read as stored (FP8 with block scales:
a quarter of the bytes of the FP32 copy the torch path multiplies by).
Shape legend: B decodes, H heads, dn / dv no-rope key / value head dims, r latent rank.
"""
import functools

import torch

from moed.backends.cpu.attention import causal_attention
from moed.backends.cpu.decode_attention import compiled_cache_step, latent_decode_attention
from moed.backends.cpu.runtime import default_threads
from moed.backends.torch import MLAOps
from moed.errors import InvalidRequestError

QUERY, OUTPUT = 0, 1


class LatentAbsorb:
    """kv_b [H (dn + dv), r] (a moed.model.formats.Weight: FP8 with 128 x 128 block
    scales, or BF16) bound once; `query` and `output` run the two products."""

    def __init__(self, weight, H, dn, dv, r, threads=None, kernels=None):
        if kernels is None:
            from moed.backends.cpu.isa import load_kernels
            kernels = load_kernels()
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


class CPUMLAOps(MLAOps):
    """MLA's operations on the compiled kernels for one MLAttention: the reference's
    (moed.backends.torch.MLAOps) with
    - decodes attending in the latent space straight out of the paged cache
      (cython_src/decode_kernels.c, no gathered copy), when `paged`;
    - prefill chunks' attention, in either form, through the flash kernel when `flash`;
    - with `one_form` (deterministic) every prefill chunk in the absorbed form with the
      decodes' products, so a position's output does not depend on whether a decode or
      a prefill chunk computed it;
    - the absorbed products with kv_b read as stored (LatentAbsorb) when `absorb`."""

    def __init__(self, attn, kernels, threads, flash=True, paged=True, one_form=True,
                 absorb=None):
        super().__init__(attn)
        self.kernels, self.threads = kernels, threads
        bind = functools.partial
        self.prefill = bind(causal_attention, kernels=kernels, threads=threads) if flash else None
        self.decode = bind(latent_decode_attention, kernels=kernels, threads=threads) \
            if paged else None
        self.one_form = one_form and flash
        self.absorb = absorb                    # LatentAbsorb over kv_b, or None

    def attend_prefill(self, q, cached, mask):
        if not self.one_form:
            return super().attend_prefill(q, cached, mask)
        r = self.attn.r
        q_abs = self.latent_queries(q)                                   # [n, H, r + dr]
        o_lat = self.prefill(q_abs, cached[:, None], cached[:, None, :r], self.attn.scale)
        return self.latent_output(o_lat)

    def decode_latent(self, q_abs, batch, kv_cache):
        if self.decode is None or batch.decode_context is None or \
                not compiled_cache_step(kv_cache, q_abs):
            return super().decode_latent(q_abs, batch, kv_cache)
        return self.decode(q_abs, kv_cache, self.attn.r, batch.decode_slots,
                           batch.decode_context, self.attn.scale)          # [B, H, r]

    def _absorb_for(self, x):
        return self.absorb if x.is_cpu and x.dtype == torch.float32 else None

    def latent_queries(self, q):
        absorb = self._absorb_for(q)
        if absorb is None:
            return super().latent_queries(q)
        q_lat = absorb.query(q[..., :self.attn.dn].contiguous())
        return torch.cat((q_lat, q[..., self.attn.dn:]), dim=-1)

    def latent_output(self, o_lat):
        absorb = self._absorb_for(o_lat)
        if absorb is None:
            return super().latent_output(o_lat)
        return absorb.output(o_lat.contiguous())

    def latent_attention(self, q_abs, cached, mask):
        if self.prefill is None:
            return super().latent_attention(q_abs, cached, mask)
        # one causal chunk, B = 1 (the mask is the kernel's causal offset)
        return self.prefill(q_abs[0], cached[0], cached[0, ..., :self.attn.r],
                            self.attn.scale)[None]

    def full_attention(self, q, k, v, mask):
        if self.prefill is None:
            return super().full_attention(q, k, v, mask)
        return self.prefill(q, k, v, self.attn.scale)
