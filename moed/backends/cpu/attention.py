"""Causal prefill attention on the compiled CPU kernels (cython_src/attention_kernels.c).

`causal_attention(q, k, v, scale)` attends a chunk of n queries to L keys: query i
sits at position L - n + i (after L - n cached tokens) and sees keys 0 .. L - n + i.
Head h reads kv head h // (H // Hkv) (grouped-query attention). On AVX-512 the dot
products run in BF16 (inputs rounded to nearest even) with FP32 accumulation and
FP32 softmax statistics; AVX2 and generic compute in FP32.
Shape legend: n chunk queries, L keys, H query heads, Hkv kv heads, dq/dv head sizes.
"""
import torch

from moed.errors import InvalidRequestError
from moed.backends.cpu.runtime import default_threads, workspace

DTYPES = (torch.float32, torch.bfloat16)


def causal_attention(q, k, v, scale, threads=None, out=None, kernels=None):
    """q [n, H, dq], k [L, Hkv, dq], v [L, Hkv, dv] (float32 or bfloat16, any strides)
    -> out [n, H, dv] float32 (written into `out` when given: contiguous float32).

    `threads` defaults to MOED_THREADS or the affinity set; `kernels` to the
    selected ISA's extension. Safe to call from several Python threads (the
    pool serialises calls; the workspace is per Python thread)."""
    from moed.backends.cpu.isa import load_kernels
    n, H, dq, L, Hkv, dv = _check_shapes(q, k, v)
    out = _check_out(out, (n, H, dv))
    if n == 0:
        return out
    kernels = kernels or load_kernels()
    threads = threads or default_threads()
    q, k, v = _rows(q), _rows(k), _rows(v)
    ws = workspace(kernels.attention_workspace(n, L, H, Hkv, dq, dv, threads))
    kernels.attention(_operand(q), _operand(k), _operand(v), n, L, H, Hkv, dq, dv,
                      float(scale), out.data_ptr(), ws.ctypes.data, threads)
    return out


def _check_shapes(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise InvalidRequestError(f"{name} has shape {tuple(x.shape)}, expected 3 dims "
                                      "[tokens, heads, head_dim]", field=name)
        if x.dtype not in DTYPES:
            raise InvalidRequestError(f"{name} is {x.dtype}, expected float32 or bfloat16",
                                      field=name)
        if x.device.type != "cpu":
            raise InvalidRequestError(f"{name} is on {x.device}, expected the CPU", field=name)
    (n, H, dq), (L, Hkv, dk), (Lv, Hv, dv) = q.shape, k.shape, v.shape
    if min(H, dq, Hkv, dv) == 0:
        raise InvalidRequestError("heads and head sizes must be positive", field="q")
    if dk != dq:
        raise InvalidRequestError(f"k head size {dk} != q head size {dq}", field="k")
    if (Lv, Hv) != (L, Hkv):
        raise InvalidRequestError(f"v has shape {tuple(v.shape)}, expected [{L}, {Hkv}, dv] "
                                  "like k", field="v")
    if H % Hkv:
        raise InvalidRequestError(f"q has {H} heads, not a multiple of k's {Hkv}", field="k")
    if n > L:
        raise InvalidRequestError(f"q has {n} tokens, more than the {L} keys", field="q")
    return n, H, dq, L, Hkv, dv


def _check_out(out, shape):
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() \
            or out.device.type != "cpu":
        raise InvalidRequestError(f"out must be contiguous float32 {list(shape)} on the CPU",
                                  field="out")
    return out


def _rows(x):
    # the kernel takes any token and head strides but a contiguous head dimension
    x = x.detach()
    return x if x.stride(2) == 1 else x.contiguous()


def _operand(x):
    return (x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0), x.stride(1))
