"""Decode attention and the KV cache store on the compiled CPU kernels
(cython_src/decode_kernels.c).

`paged_decode_attention` attends one new token per sequence to its context, read
in place from the paged GQA cache through the sequence's slot row: no gathered
copy; `latent_decode_attention` is the same kernel over DeepSeek MLA's latent cache
(one kv head, the value a prefix of the key). `store_kv` writes the step's new keys
and values into their slots. A decode runs the prefill kernel's per-query arithmetic
(cython_src/attention_kernels.c), so its output equals the prefill's at that position
bit for bit: FP32 on AVX2 and generic (equal to the torch path,
moed.model.layers.decode_attention on a gathered copy, within FP32 rounding), BF16 dot
products with FP32 accumulation on AVX-512 (the precision contract).
Shape legend: B decodes, H query heads, Hkv kv heads, d head dim, S cache slots,
Lmax slot-row length, N new tokens.
"""
import threading
import weakref

import torch

from moed.errors import InvalidRequestError
from moed.backends.cpu.runtime import default_threads, workspace

_address = threading.local()       # this thread's workspace buffer and its address

CACHE_DTYPES = (torch.float32, torch.bfloat16)


def paged_decode_attention(q, kv_cache, slots, context, scale, out=None, threads=None,
                           kernels=None):
    """q [B, H, d] float32 (last dim contiguous), kv_cache [S, 2, Hkv, d] (float32 or
    bfloat16, contiguous; key at 0, value at 1), slots [B, Lmax] int64 (row b valid on
    its first context[b] entries), context [B] int64 -> out [B, H, d] float32 (written
    into `out` when given: contiguous float32)."""
    lay = _gqa_layout(kv_cache)
    if not _q_fits(q, lay.Hkv, lay.d):
        _check_q(q)
        raise InvalidRequestError(f"q {list(q.shape)} does not fit kv_cache [S, 2, {lay.Hkv}, "
                                  f"{lay.d}] (head size must match, H a multiple of Hkv)",
                                  field="q")
    return _decode(q, lay.k, lay.v, lay.S, lay.Hkv, lay.d, slots, context, scale, out,
                   threads, kernels)


def latent_decode_attention(q, cache, dv, slots, context, scale, out=None, threads=None,
                            kernels=None):
    """DeepSeek MLA's absorbed decode: every head attends to one latent per token.
    q [B, H, dq] float32 (q_nope W_uk beside q_rot), cache [S, dq] (float32 or bfloat16,
    contiguous: latent then k_rot), the value the latent's first dv columns -> out
    [B, H, dv] float32 (the latent-space output, before W_uv)."""
    _check_q(q)
    B, H, dq = q.shape
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
    from moed.backends.cpu.isa import load_kernels
    B, H, _ = q.shape
    dv = dv or dq
    Lmax = _table(slots, context, B)
    out = _check_out(out, (B, H, dv))
    if B == 0:
        return out
    kernels = kernels or load_kernels()
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
    from moed.backends.cpu.isa import load_kernels
    lay = _gqa_layout(kv_cache)
    if not _new_fit(k, v, slot_mapping, lay.Hkv, lay.d):
        _check_new_tokens(k, v, slot_mapping, lay.Hkv, lay.d)
    kernels = kernels or load_kernels()
    (k_ld, k_hs, _), (v_ld, v_hs, _) = k.stride(), v.stride()
    rc = kernels.store_kv(lay.k, lay.v, k.data_ptr(), k_ld, k_hs, v.data_ptr(), v_ld, v_hs,
                          slot_mapping.data_ptr(), k.shape[0], lay.S, lay.Hkv, lay.d, lay.d)
    if rc:
        n = -1 - rc
        raise InvalidRequestError(f"slot_mapping[{n}] = {int(slot_mapping[n])} is outside "
                                  f"the cache's [0, {lay.S})", field="slot_mapping")


# -- checks. They run per layer per decode step, where after the experts' weight
# stream Python's own data is cold too: in a Qwen3-30B-shaped step the first version
# of these checks cost ~18 us a call around a 4 us store. So each call's tensors are
# checked in one expression (the detailed checks run only to word the error), and
# what is fixed between steps is checked once: a cache tensor's layout (its shape,
# dtype and storage do not change), the step's slot table (shared by every layer;
# its values are checked by the kernel, which refuses a slot outside the cache).

class _Layout:
    """A validated GQA cache [S, 2, Hkv, d]: its key and value operands for the
    kernels, (address, bf16, elements between slots, between kv heads)."""
    __slots__ = ("ref", "S", "Hkv", "d", "k", "v")

    def __init__(self, kv_cache):
        S, Hkv, d = _check_cache(kv_cache)
        ptr, bf16 = kv_cache.data_ptr(), kv_cache.dtype == torch.bfloat16
        self.ref, self.S, self.Hkv, self.d = weakref.ref(kv_cache), S, Hkv, d
        self.k = (ptr, bf16, 2 * Hkv * d, d)
        self.v = (ptr + Hkv * d * kv_cache.element_size(), bf16, 2 * Hkv * d, d)


_layouts = {}                   # id(cache tensor) -> _Layout
_last_table = (None, None, -1, 0)   # (slots, context, B, Lmax) last checked


def _gqa_layout(kv_cache):
    lay = _layouts.get(id(kv_cache))
    if lay is None or lay.ref() is not kv_cache:
        lay = _Layout(kv_cache)
        if len(_layouts) > 1024:            # engines come and go in one process (tests)
            _layouts.clear()
        _layouts[id(kv_cache)] = lay
    return lay


def _table(slots, context, B):
    global _last_table
    last = _last_table
    if last[0] is slots and last[1] is context and last[2] == B:
        return last[3]
    Lmax = _check_table(slots, context, B)
    _last_table = (slots, context, B, Lmax)
    return Lmax


def _q_fits(q, Hkv, d):
    try:
        return q.is_cpu and q.dtype == torch.float32 and q.dim() == 3 and \
            q.shape[2] == d and q.shape[1] % Hkv == 0 and q.stride()[2] == 1 and q.shape[1] > 0
    except AttributeError:
        return False


def _new_fit(k, v, slot_mapping, Hkv, d):
    try:
        f32 = torch.float32
        return k.is_cpu and v.is_cpu and slot_mapping.is_cpu and k.dtype == f32 and \
            v.dtype == f32 and slot_mapping.dtype == torch.int64 and \
            k.shape == v.shape == (slot_mapping.shape[0], Hkv, d) and \
            slot_mapping.dim() == 1 and slot_mapping.is_contiguous() and \
            k.stride()[2] == 1 and v.stride()[2] == 1
    except (AttributeError, IndexError):
        return False


def _check_new_tokens(k, v, slot_mapping, Hkv, d):
    N = _check_new(k, "k", Hkv, d)
    if _check_new(v, "v", Hkv, d) != N or _check_index(slot_mapping, "slot_mapping", 1) != (N,):
        raise InvalidRequestError(f"k, v and slot_mapping disagree on the token count "
                                  f"({N}, {v.shape[0]}, {tuple(slot_mapping.shape)})",
                                  field="slot_mapping")


def _workspace(nbytes):
    """Address of this thread's workspace of >= nbytes (numpy's .ctypes.data costs ~1 us:
    looked up again only when the buffer changes)."""
    buf = workspace(nbytes)
    if getattr(_address, "buf", None) is not buf:
        _address.buf, _address.ptr = buf, buf.ctypes.data
    return _address.ptr


def _check_cpu(x, name):
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


def _check_cache(kv_cache):
    # -> (S, Hkv, d)
    _check_cpu(kv_cache, "kv_cache")
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 2 or kv_cache.dtype not in CACHE_DTYPES \
            or not kv_cache.is_contiguous():
        raise InvalidRequestError(f"kv_cache is {kv_cache.dtype} {tuple(kv_cache.shape)}, "
                                  "expected contiguous float32 or bfloat16 [S, 2, Hkv, d]",
                                  field="kv_cache")
    S, _, Hkv, d = kv_cache.shape
    if Hkv == 0 or d == 0:
        raise InvalidRequestError("kv_cache has no heads", field="kv_cache")
    return S, Hkv, d


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


def compiled_cache_step(kv_cache, x):
    """Whether the compiled KV-cache kernels (store, decode attention) take this step:
    CPU tensors, FP32 activations and a float32 or bfloat16 cache (other cache dtypes
    stay on torch)."""
    return kv_cache.is_cpu and x.dtype == torch.float32 and kv_cache.dtype in CACHE_DTYPES
