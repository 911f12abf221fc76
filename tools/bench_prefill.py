"""CPU prefill: tokens/s for a 512- and a 4K-token prompt and the fraction of
the BF16 dot-product peak measured in the same run (register-only vdpbf16ps
loop on every thread), on the Qwen3-30B-A3B-shaped FP8 model of
bench_decode.py. Prompts go through the engine in chunks of --chunk tokens
(the GEMM path of the dense and expert kernels).

FLOPs counted per prompt: 2 x weights x tokens for every dense linear and the
router, 2 x 8 experts x 3 matrices per token, attention 4 x heads x head_dim
per causal (query, key) pair, the LM head once (last token). The kernel line
is the same for the weight kernels alone (their FLOPs / their time).

--chunk 0 leaves max_num_batched_tokens unset: the prefill planner chooses the
chunk (moed/engine/planner.py; printed with its constants).

Usage: python tools/bench_prefill.py [--layers 12] [--prompts 512,4096] [--chunk 512 | 0]
           [--torch (also time the torch reference at the first length)]
           [--model-dir DIR (kept and reused)]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import (add_model_args, model_setup, QWEN3_30B, StepClock, engine, machine)  # noqa: E402


def flops(T, layers):
    """(weight-kernel FLOPs, attention FLOPs) of one T-token prompt."""
    c = QWEN3_30B
    D, H, KV, d = (c[f] for f in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                  "head_dim"))
    E, k, I, V = (c[f] for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                 "vocab_size"))
    dense = (H * d + 2 * KV * d) * D + D * H * d + E * D          # q, k, v, o, router
    experts = k * 3 * D * I
    weights = 2 * T * layers * (dense + experts) + 2 * V * D
    attention = 4 * H * d * (T * (T + 1) // 2) * layers
    return weights, attention


def prefill(llm, T, rng):
    from moed import SamplingParams
    prompt = rng.integers(3, 400, size=T).tolist()
    with StepClock() as clock:
        llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    steps = [s for s in clock.steps if not s["decode"]]
    return (sum(s["wall"] for s in steps), sum(s["kernels"] for s in steps),
            sum(s["attention"] for s in steps), len(steps))


def report(name, llm, T, layers, rng, kernels, threads):
    _, peak = machine(kernels, threads)
    wall, kern, attn, chunks = prefill(llm, T, rng)
    peak = max(peak, machine(kernels, threads)[1])     # best of before/after: shared machine
    fw, fa = flops(T, layers)
    rate = (fw + fa) / wall
    print(f"{name:6s} T={T:<5d} {T / wall:8.1f} tok/s  {wall:7.2f} s in {chunks} chunks | "
          f"{rate / 1e9:6.1f} GFLOP/s = {rate / peak:5.1%} of BF16 peak {peak / 1e9:4.0f} | "
          f"kernels {kern:6.2f} s: {fw / kern / 1e9:6.1f} GFLOP/s = {fw / kern / peak:5.1%} of peak | "
          f"attention {attn:5.2f} s, rest {wall - kern - attn:5.2f} s", flush=True)
    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--prompts", default="512,4096")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--torch", action="store_true")
    args = ap.parse_args()
    tmp, model, kernels, threads, setup = model_setup(args)
    _, peak = machine(kernels, threads)
    fmt = "INT4 (group 32)" if args.fmt == "int4" else "FP8"
    print(f"qwen3-30b-a3b dims, {args.layers} layers, {fmt}, chunks of {args.chunk or 'auto'}, "
          f"{setup}; "
          f"BF16 dot peak {peak / 1e9:.0f} GFLOP/s (same run, re-measured beside every case)",
          flush=True)
    lengths = [int(t) for t in args.prompts.split(",")]
    rng = np.random.default_rng(0)
    kw = dict(max_num_batched_tokens=args.chunk or None, max_num_seqs=1)
    fast = engine(model, fast=True, **kw)
    if not args.chunk:
        print(f"  planner: {fast.model_info['planner']}", flush=True)
    report("engine", fast, 64, args.layers, rng, kernels, threads)     # warm-up: pages, pool
    walls = [report("engine", fast, T, args.layers, rng, kernels, threads) for T in lengths]
    del fast
    if args.torch:
        ref = engine(model, fast=False, **kw)
        t_ref = report("torch", ref, lengths[0], args.layers, rng, kernels, threads)
        print(f"engine vs torch reference at T={lengths[0]}: x{t_ref / walls[0]:.1f}")


if __name__ == "__main__":
    main()
