"""Benchmark the causal prefill attention kernel against torch's SDPA, on
Qwen3-30B-A3B shapes (H 32, Hkv 4, d 128).

Per case: time (best of N), GFLOP/s counting 4 x H x d flops per causal
(query, key) pair, that rate as a fraction of the BF16 dot-product peak measured
in the same run, and the speed-up over F.scaled_dot_product_attention on the same
float32 inputs (best of N as well; the chunk case gives SDPA its boolean mask, as
the model does).
Usage: python tools/bench_attention.py [--cases 512,4096,512@3584] [--repeat 5]
                                       [--threads N] [--dtype float32|bfloat16]

--decode: decode attention instead, one new token per sequence attending to its
context in the paged cache [S, 2, Hkv, d] through a slot table of shuffled 16-slot
blocks (as the KV block manager leaves it). Compiled (moed/backends/cpu/decode_attention.py)
against the torch path GQAttention used before (gather kv_cache[slots], then
moed.model.layers.decode_attention), best of N each; the K/V bytes read per second
against the plain read bandwidth measured in the same run, warm (one cache, read
again and again: at up to 16 MB it stays in the L3) and cold (up to 16 copies of it,
256 MB, read in turn, as a decode step's layers meet theirs); and the store of one
step's new k/v (store_kv) against two torch index_put.
Usage: python tools/bench_attention.py --decode [--cases 1x64,1x4096,1x32768,8x1024]
                                       [--dtype float32|bfloat16]

--decode --mla: DeepSeek-V3's absorbed decode instead (128 heads attend to one latent
cache row of 576 = 512 latent + 64 rotary per token; the value is the latent):
latent_decode_attention against the torch path MLAttention takes without it (gather
kv_cache[slots], then moed.model.layers.decode_attention: two batched matmuls); then
kv_b's two per-head products (q_nope into the latent, the latent output out through
W_uv) read as stored, FP8 with block scales (moed/backends/cpu/mla.py), against the
einsums over its FP32 copy, cold: 8 layers' copies in turn, as a decode step meets
them.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import env_threads, machine  # noqa: E402

from moed.backends.cpu.isa import load_kernels  # noqa: E402
from moed.backends.cpu.attention import causal_attention  # noqa: E402
from moed.backends.cpu.decode_attention import (latent_decode_attention,  # noqa: E402
                                           paged_decode_attention, store_kv)
from moed.backends.torch import decode_attention  # noqa: E402

H, HKV, D = 32, 4, 128
COLD_BYTES = 256 << 20          # --decode's cold figure: this much cache read in turn
MLA_H, MLA_R, MLA_DR = 128, 512, 64          # DeepSeek-V3: heads, kv_lora_rank, rotary dims


def best_time(fn, repeat):
    fn()                                            # warm-up: workspace, pool, caches
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def torch_sdpa(q, k, v, scale):
    # q [n, H, d], k/v [L, Hkv, d] -> [n, H, d], the model's call (moed.model.layers.sdpa)
    n, L = q.shape[0], k.shape[0]
    mask = None
    if n != L:
        mask = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=None if mask is None else mask[None, None], is_causal=mask is None,
        scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def causal_pairs(n, L):
    # query i sees L - n + i + 1 keys
    return n * (L - n) + n * (n + 1) // 2


def bench_case(n, L, dtype, kernels, threads, repeat):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, D, generator=g) for t, h in ((n, H), (L, HKV), (L, HKV)))
    scale = D ** -0.5
    qk, kk, vk = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.empty(n, H, D)
    t = best_time(lambda: causal_attention(qk, kk, vk, scale, threads, out, kernels), repeat)
    t_ref = best_time(lambda: torch_sdpa(q, k, v, scale), repeat)
    err = (out - torch_sdpa(q, k, v, scale)).abs().max().item()
    _, peak = machine(kernels, threads)
    fl = 4 * H * D * causal_pairs(n, L) / t
    name = f"n={n} L={L}"
    fl_ref = fl * t / t_ref
    print(f"{name:16s} {t * 1e3:8.2f} ms  {fl / 1e9:6.1f} GFLOP/s = {fl / peak:5.1%} of peak "
          f"{peak / 1e9:4.0f} | torch SDPA {t_ref * 1e3:8.2f} ms ({fl_ref / 1e9:5.1f} GFLOP/s) "
          f"-> x{t_ref / t:4.2f} | max abs diff {err:.1e}", flush=True)


def decode_inputs(B, L, dtype, g):
    """Cache [S, 2, Hkv, d] in `dtype`, slot table [B, L] of shuffled 16-slot blocks,
    context [B], q [B, H, d]."""
    blocks = B * L // 16 + 1
    cache = torch.randn(blocks * 16, 2, HKV, D, generator=g).to(dtype)
    order = torch.randperm(blocks, generator=g)[:, None] * 16 + torch.arange(16)
    slots = order.reshape(-1)[:B * L].reshape(B, L).contiguous()
    return cache, slots, torch.full((B,), L, dtype=torch.int64), torch.randn(B, H, D, generator=g)


def torch_decode(q, cache, slots, mask, scale):
    kv = cache[slots]                                          # [B, L, 2, Hkv, d]
    return decode_attention(q, kv[:, :, 0], kv[:, :, 1], mask, scale)


def torch_store(cache, slot_mapping, k, v):
    cache[slot_mapping, 0] = k.to(cache.dtype)
    cache[slot_mapping, 1] = v.to(cache.dtype)


def bench_decode(B, L, dtype, kernels, threads, repeat, read_bw):
    g = torch.Generator().manual_seed(0)
    cache, slots, context, q = decode_inputs(B, L, dtype, g)
    mask, scale = torch.ones(B, 1, L, dtype=torch.bool), D ** -0.5
    out = torch.empty(B, H, D)
    t = best_time(lambda: paged_decode_attention(q, cache, slots, context, scale, out=out,
                                                 threads=threads, kernels=kernels), repeat)
    t_ref = best_time(lambda: torch_decode(q, cache, slots, mask, scale), repeat)
    err = (out - torch_decode(q, cache, slots, mask, scale)).abs().max().item()
    kv_bytes = 2 * B * L * HKV * D * cache.element_size()
    bw = kv_bytes / t
    # cold: copies of the cache in turn, past the L3, as a step's layers meet theirs
    copies = [cache] + [cache.clone() for _ in range(min(15, COLD_BYTES // cache.nbytes))]

    def cold():
        for c in copies:
            paged_decode_attention(q, c, slots, context, scale, out=out, threads=threads,
                                   kernels=kernels)
    t_cold = best_time(cold, repeat) / len(copies)
    k = torch.randn(B, H + HKV, D, generator=g)[:, H:]       # the projection's strided k
    v = torch.randn(B, HKV, D, generator=g)
    new = slots[:, -1].contiguous()
    t_st = best_time(lambda: store_kv(cache, new, k, v, kernels=kernels), repeat)
    t_st_ref = best_time(lambda: torch_store(cache, new, k, v), repeat)
    print(f"B={B:<3d} L={L:<6d} {t * 1e6:9.1f} us  K/V {bw / 1e9:5.1f} GB/s = {bw / read_bw:4.0%} "
          f"of read | cold {t_cold * 1e6:9.1f} us {kv_bytes / t_cold / 1e9:5.1f} GB/s = "
          f"{kv_bytes / t_cold / read_bw:4.0%} | torch {t_ref * 1e6:9.1f} us -> x{t_ref / t:5.2f} | max abs diff {err:.1e} | "
          f"store {t_st * 1e6:5.1f} us vs index_put {t_st_ref * 1e6:5.1f} us -> "
          f"x{t_st_ref / t_st:4.2f}", flush=True)


def bench_mla_decode(B, L, dtype, kernels, threads, repeat, read_bw):
    g = torch.Generator().manual_seed(0)
    S, dq = B * L + 16, MLA_R + MLA_DR
    cache = torch.randn(S, dq, generator=g).to(dtype)
    slots = torch.randperm(S, generator=g)[:B * L].reshape(B, L).contiguous()
    context = torch.full((B,), L, dtype=torch.int64)
    q = torch.randn(B, MLA_H, dq, generator=g)
    mask, scale = torch.ones(B, 1, L, dtype=torch.bool), dq ** -0.5
    out = torch.empty(B, MLA_H, MLA_R)

    def torch_path():
        cached = cache[slots][:, :, None]                   # [B, L, 1, r + dr]
        return decode_attention(q, cached, cached[..., :MLA_R], mask, scale)

    t = best_time(lambda: latent_decode_attention(q, cache, MLA_R, slots, context, scale,
                                                  out=out, threads=threads, kernels=kernels),
                  repeat)
    t_ref = best_time(torch_path, repeat)
    err = (out - torch_path()).abs().max().item()
    # every head against every key: dq multiply-adds for the score, MLA_R for the value
    fl = 2 * B * L * MLA_H * (dq + MLA_R) / t
    print(f"MLA B={B:<3d} L={L:<6d} {t * 1e6:9.1f} us  {fl / 1e9:6.1f} GFLOP/s (FP32; compute-"
          f"bound: the cache at {B * L * dq * cache.element_size() / t / read_bw:4.1%} of read) | "
          f"torch {t_ref * 1e6:10.1f} us -> x{t_ref / t:6.1f} | max abs diff {err:.1e}",
          flush=True)


def bench_mla_absorb(kernels, threads, repeat, layers=8):
    from moed.backends.cpu.mla import LatentAbsorb
    from moed.model.formats import Weight, quantize_fp8
    H, dn, dv, r = MLA_H, 128, 128, MLA_R
    g = torch.Generator().manual_seed(1)
    weights = [Weight(*quantize_fp8(torch.randn(H * (dn + dv), r, generator=g) * 0.02),
                      (128, 128)) for _ in range(layers)]
    absorbs = [LatentAbsorb(w, H, dn, dv, r, threads=threads, kernels=kernels) for w in weights]
    copies = [w.dequantize().view(H, dn + dv, r) for w in weights]
    for B in (1, 8):
        q, o = torch.randn(B, H, dn, generator=g), torch.randn(B, H, r, generator=g)

        def ours():
            for a in absorbs:
                a.query(q), a.output(o)

        def einsums():
            for w in copies:
                torch.einsum("bhn,hnr->bhr", q, w[:, :dn])
                torch.einsum("bhr,hvr->bhv", o, w[:, dn:])

        t, t_ref = best_time(ours, repeat) / layers, best_time(einsums, repeat) / layers
        print(f"kv_b B={B:<3d} {t * 1e3:6.2f} ms a layer (FP8 as stored, "
              f"{H * (dn + dv) * r / t / 1e9:5.1f} GB/s) | einsums over FP32 {t_ref * 1e3:6.2f} ms "
              f"-> x{t_ref / t:4.2f}", flush=True)


def parse_case(s):
    # "T" = plain causal prompt of T tokens; "n@c" = n queries after c cached tokens
    if "@" in s:
        n, c = (int(x) for x in s.split("@"))
        return n, n + c
    return int(s), int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None)
    ap.add_argument("--decode", action="store_true", help="decode attention cases (BxL)")
    ap.add_argument("--mla", action="store_true",
                    help="with --decode: DeepSeek-V3's latent (MLA) decode")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    kernels, threads = load_kernels(), args.threads or env_threads()
    shape = (f"H={MLA_H} latent {MLA_R}+{MLA_DR}" if args.decode and args.mla
             else f"H={H} Hkv={HKV} d={D}")
    print(f"isa={kernels.ISA} threads={threads} torch threads={torch.get_num_threads()} "
          f"{shape} {'cache' if args.decode else 'inputs'} {args.dtype}")
    if args.decode and args.mla:
        read_bw, _ = machine(kernels, threads)
        for case in (args.cases or "1x16,1x512,1x4096,8x1024").split(","):
            B, L = (int(x) for x in case.split("x"))
            bench_mla_decode(B, L, getattr(torch, args.dtype), kernels, threads, args.repeat,
                             read_bw)
        bench_mla_absorb(kernels, threads, args.repeat)
        return
    if args.decode:
        read_bw, _ = machine(kernels, threads)
        for case in (args.cases or "1x64,1x4096,1x32768,8x1024").split(","):
            B, L = (int(x) for x in case.split("x"))
            bench_decode(B, L, getattr(torch, args.dtype), kernels, threads, args.repeat, read_bw)
        return
    for case in (args.cases or "512,4096,512@3584").split(","):
        bench_case(*parse_case(case), getattr(torch, args.dtype), kernels, threads, args.repeat)


if __name__ == "__main__":
    main()
