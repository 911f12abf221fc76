"""What the paged KV cache stores, and the two conversions at its edges.

bfloat16 (the default) holds what the precision contract feeds the attention
dots (BF16 keys and values), in half the bytes of float32 — and every token
of a long context is read again at every decode step. float32 is a setting.
fp8_e4m3 is an opt-in outside the contract: keys and values are rounded to
e4m3 (saturating at +-448, no scale), a quarter of float32's bytes; its cost
in accuracy is measured, not promised (tests/test_kv_dtype.py prints its KL).
"""
import torch

from moed.errors import ConfigError

FP8_MAX = 448.0
KV_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                   "fp8_e4m3": torch.float8_e4m3fn}
ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp8": "fp8_e4m3",
           "float8_e4m3fn": "fp8_e4m3"}
DEFAULT = "bfloat16"


def cache_dtype(name, field="kv_cache_dtype"):
    """A setting's name (or a torch dtype) -> the cache tensors' dtype."""
    if isinstance(name, torch.dtype) and name in KV_CACHE_DTYPES.values():
        return name
    key = ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in KV_CACHE_DTYPES:
        raise ConfigError(f"{field} must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}",
                          field=field)
    return KV_CACHE_DTYPES[key]


def dtype_name(dtype):
    return next(k for k, v in KV_CACHE_DTYPES.items() if v == dtype)


def to_cache(x, dtype):
    """Activations (float32) -> the cache's dtype: round to nearest even (bfloat16), or
    saturate then round (fp8, which has no infinity: an overflow would be NaN)."""
    if dtype == torch.float8_e4m3fn:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def readable(kv):
    """Cache entries as the attention kernels read them: float32 and bfloat16 as they
    are, fp8 widened to bfloat16 (exact: every e4m3 value is a bfloat16)."""
    return kv.to(torch.bfloat16) if kv.dtype == torch.float8_e4m3fn else kv
