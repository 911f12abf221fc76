"""Decode attention and the KV cache store on the compiled CPU kernels
(cython_src/decode_kernels.c).

`paged_decode_attention` attends one new token per sequence to its context, read
in place from the paged GQA cache through the sequence's slot row: no gathered
copy; `latent_decode_attention` is the same kernel over DeepSeek MLA's latent cache
(one kv head, the value a prefix of the key). `store_kv` writes the step's new keys
and values into their slots. All compute in FP32 (a BF16 cache is widened
exactly), so results equal the torch path (moed.model.layers.decode_attention on a
gathered copy) within FP32 rounding.
Shape legend: B decodes, H query heads, Hkv kv heads, d head dim, S cache slots,
Lmax slot-row length, N new tokens.
"""
import threading

import torch

from moed.errors import InvalidRequestError
from moed.experts.layer import _workspace_for, default_threads

_address = threading.local()       # this thread's workspace buffer and its address

CACHE_DTYPES = (torch.float32, torch.bfloat16)


def paged_decode_attention(q, kv_cache, slots, context, scale, out=None, threads=None,
                           kernels=None):
    """q [B, H, d] float32 (last dim contiguous), kv_cache [S, 2, Hkv, d] (float32 or
    bfloat16, contiguous; key at 0, value at 1), slots [B, Lmax] int64 (row b valid on
    its first context[b] entries), context [B] int64 -> out [B, H, d] float32 (written
    into `out` when given: contiguous float32)."""
    B, H, d = _check_q(q)
    S, Hkv = _check_cache(kv_cache, H, d)
    ptr, bf16, es = kv_cache.data_ptr(), kv_cache.dtype == torch.bfloat16, kv_cache.element_size()
    ld = 2 * Hkv * d
    return _decode(q, (ptr, bf16, ld, d), (ptr + Hkv * d * es, bf16, ld, d), S, Hkv, d, slots,
                   context, scale, out, threads, kernels)


def latent_decode_attention(q, cache, dv, slots, context, scale, out=None, threads=None,
                            kernels=None):
    """DeepSeek MLA's absorbed decode: every head attends to one latent per token.
    q [B, H, dq] float32 (q_nope W_uk beside q_rot), cache [S, dq] (float32 or bfloat16,
    contiguous: latent then k_rot), the value the latent's first dv columns -> out
    [B, H, dv] float32 (the latent-space output, before W_uv)."""
    B, H, dq = _check_q(q)
    _check_cpu(cache, "cache")
    if cache.dim() != 2 or cache.shape[1] != dq or cache.dtype not in CACHE_DTYPES \
            or not cache.is_contiguous():
        raise InvalidRequestError(f"cache is {cache.dtype} {tuple(cache.shape)}, expected "
                                  f"contiguous float32 or bfloat16 [S, {dq}]", field="cache")
    if not 0 < dv <= dq:
        raise InvalidRequestError(f"dv {dv} is outside [1, {dq}]", field="dv")
    operand = (cache.data_ptr(), cache.dtype == torch.bfloat16, dq, 0)
    return _decode(q, operand, operand, cache.shape[0], 1, dq, slots, context, scale, out,
                   threads, kernels, dv)


def _decode(q, k, v, S, Hkv, dq, slots, context, scale, out, threads, kernels, dv=None):
    # k, v: (address, bf16, elements between slots, between kv heads) over the cache
    from moed.cpu import expert_kernels
    B, H, dv = q.shape[0], q.shape[1], dv or dq
    Lmax = _check_table(slots, context, B)
    out = _check_out(out, (B, H, dv))
    if B == 0:
        return out
    kernels = kernels or expert_kernels()
    threads = threads or default_threads()
    ws = _workspace(kernels.decode_workspace(B, H, Hkv, dq, dv, threads))
    q_ld, q_hs, _ = q.stride()
    rc = kernels.paged_decode(q.data_ptr(), q_ld, q_hs, k, v, slots.data_ptr(), Lmax,
                              context.data_ptr(), S, B, H, Hkv, dq, dv, float(scale),
                              out.data_ptr(), ws, threads)
    if rc > 0:
        b = rc - 1
        raise InvalidRequestError(f"context[{b}] = {int(context[b])} is outside [1, {Lmax}]",
                                  field="context")
    if rc < 0:
        i = -1 - rc
        raise InvalidRequestError(f"slots[{i // Lmax}, {i % Lmax}] = {int(slots.view(-1)[i])} "
                                  f"is outside the cache's [0, {S})", field="slots")
    return out


def store_kv(kv_cache, slot_mapping, k, v, kernels=None):
    """kv_cache[slot_mapping[n], 0] = k[n], kv_cache[slot_mapping[n], 1] = v[n]:
    k, v [N, Hkv, d] float32 (any token/head strides, last dim contiguous), rounded to
    nearest even for a bfloat16 cache as torch's conversion. A slot outside the cache
    raises before anything is written."""
    from moed.cpu import expert_kernels
    S, Hkv, d = _check_cache(kv_cache, None, None)
    N = _check_new(k, "k", Hkv, d)
    if _check_new(v, "v", Hkv, d) != N or _check_index(slot_mapping, "slot_mapping", 1) != (N,):
        raise InvalidRequestError(f"k, v and slot_mapping disagree on the token count "
                                  f"({N}, {v.shape[0]}, {tuple(slot_mapping.shape)})",
                                  field="slot_mapping")
    kernels = kernels or expert_kernels()
    ptr, bf16, es = kv_cache.data_ptr(), kv_cache.dtype == torch.bfloat16, kv_cache.element_size()
    ld = 2 * Hkv * d
    (k_ld, k_hs, _), (v_ld, v_hs, _) = k.stride(), v.stride()
    rc = kernels.store_kv((ptr, bf16, ld, d), (ptr + Hkv * d * es, bf16, ld, d),
                          k.data_ptr(), k_ld, k_hs, v.data_ptr(), v_ld, v_hs,
                          slot_mapping.data_ptr(), N, S, Hkv, d, d)
    if rc:
        n = -1 - rc
        raise InvalidRequestError(f"slot_mapping[{n}] = {int(slot_mapping[n])} is outside "
                                  f"the cache's [0, {S})", field="slot_mapping")


def _workspace(nbytes):
    """Address of this thread's workspace of >= nbytes (numpy's .ctypes.data costs ~1 us:
    looked up again only when the buffer changes)."""
    buf = _workspace_for(nbytes)
    if getattr(_address, "buf", None) is not buf:
        _address.buf, _address.ptr = buf, buf.ctypes.data
    return _address.ptr


def _check_cpu(x, name):
    # checks here cost ~50 ns each (x.device.type ~250): they run per layer per step
    if not isinstance(x, torch.Tensor):
        raise InvalidRequestError(f"{name} is {type(x).__name__}, expected a tensor", field=name)
    if not x.is_cpu:
        raise InvalidRequestError(f"{name} is on {x.device}, expected the CPU", field=name)


def _check_q(q):
    _check_cpu(q, "q")
    if q.dim() != 3 or q.dtype != torch.float32 or q.stride()[2] != 1:
        raise InvalidRequestError(f"q is {q.dtype} {tuple(q.shape)}, expected float32 "
                                  "[B, H, d] with a contiguous last dim", field="q")
    if min(q.shape[1:]) == 0:
        raise InvalidRequestError("heads and head size must be positive", field="q")
    return q.shape


def _check_cache(kv_cache, H, d):
    # -> (S, Hkv); or (S, Hkv, d) when H is None (the store: d is the cache's)
    _check_cpu(kv_cache, "kv_cache")
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 2 or kv_cache.dtype not in CACHE_DTYPES \
            or not kv_cache.is_contiguous():
        raise InvalidRequestError(f"kv_cache is {kv_cache.dtype} {tuple(kv_cache.shape)}, "
                                  "expected contiguous float32 or bfloat16 [S, 2, Hkv, d]",
                                  field="kv_cache")
    S, _, Hkv, dc = kv_cache.shape
    if Hkv == 0 or dc == 0:
        raise InvalidRequestError("kv_cache has no heads", field="kv_cache")
    if H is None:
        return S, Hkv, dc
    if dc != d or H % Hkv:
        raise InvalidRequestError(f"q [B, {H}, {d}] does not fit kv_cache [S, 2, {Hkv}, {dc}] "
                                  "(head size must match, H a multiple of Hkv)", field="q")
    return S, Hkv


def _check_index(x, name, dims):
    _check_cpu(x, name)
    if x.dtype != torch.int64 or x.dim() != dims or not x.is_contiguous():
        raise InvalidRequestError(f"{name} is {x.dtype} {tuple(x.shape)}, expected contiguous "
                                  f"int64 with {dims} dim(s)", field=name)
    return tuple(x.shape)


def _check_table(slots, context, B):
    rows, Lmax = _check_index(slots, "slots", 2)
    if _check_index(context, "context", 1) != (B,) or rows != B:
        raise InvalidRequestError(f"slots {(rows, Lmax)} and context {tuple(context.shape)} "
                                  f"must have one row per decode ({B})", field="slots")
    if B and Lmax == 0:
        raise InvalidRequestError("slots rows are empty", field="slots")
    return Lmax


def _check_new(x, name, Hkv, d):
    _check_cpu(x, name)
    if x.dim() != 3 or x.dtype != torch.float32 or tuple(x.shape[1:]) != (Hkv, d) \
            or x.stride()[2] != 1:
        raise InvalidRequestError(f"{name} is {x.dtype} {tuple(x.shape)}, expected float32 "
                                  f"[N, {Hkv}, {d}] with a contiguous last dim", field=name)
    return x.shape[0]


def _check_out(out, shape):
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() \
            or not out.is_cpu:
        raise InvalidRequestError(f"out must be contiguous float32 {list(shape)} on the CPU",
                                  field="out")
    return out
