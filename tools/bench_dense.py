"""Benchmark the dense-linear kernels (GEMV for decode, GEMM for prefill) against
the machine and the torch reference, on Qwen3-30B-A3B shapes.

Per case: latency, weight bandwidth (packed bytes / time) as a fraction of the
streaming read bandwidth, flop rate as a fraction of the register-only BF16
dot-product peak (both re-measured beside every case: the machine is shared),
and the speed-up over the torch reference (dequantize, then matmul).
Usage: python tools/bench_dense.py [--fmts fp8,bf16] [--tokens 1,512]
                                   [--shapes q_proj,o_proj,lm_head] [--threads N]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import env_threads, machine  # noqa: E402

from moed.backends.cpu.isa import load_kernels  # noqa: E402
from moed.backends.cpu.linears import CPULinear  # noqa: E402
from moed.model.formats import Weight  # noqa: E402
from moed.model.layers import Linear  # noqa: E402

SHAPES = {"q_proj": (4096, 2048), "k_proj": (512, 2048), "o_proj": (2048, 4096),
          "lm_head": (151936, 2048)}


def random_weight(out, inp, fmt, rng):
    if fmt == "fp8":
        data = torch.from_numpy(rng.integers(0, 256, (out, inp), dtype=np.uint8) & 0x77)
        return Weight(data.view(torch.float8_e4m3fn),
                      torch.full((-(-out // 128), -(-inp // 128)), 1.0 / 448), (128, 128))
    return Weight(torch.randn(out, inp).bfloat16())


def median_time(fn, x, calls):
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[1:]))


def bench_case(name, fmt, T, lin, ref, kernels, threads):
    out, inp = SHAPES[name]
    x = torch.randn(T, inp)
    read, peak = machine(kernels, threads)
    t = median_time(lin, x, 12 if T <= 8 else 4)
    bw = lin.packed.nbytes / t
    fl = 2 * out * inp * T / t
    t_ref = median_time(ref, x, 3)
    print(f"{name:8s} {fmt:4s} T={T:<4d} {t * 1e3:8.3f} ms  read {read / 1e9:5.1f} GB/s, peak "
          f"{peak / 1e9:5.0f} GFLOP/s | weights {bw / 1e9:6.1f} GB/s = {bw / read:5.1%} of read"
          f" | {fl / 1e9:7.1f} GFLOP/s = {fl / peak:5.1%} of peak | torch {t_ref * 1e3:8.2f} ms"
          f" -> x{t_ref / t:6.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fmts", default="fp8,bf16")
    ap.add_argument("--tokens", default="1,512")
    ap.add_argument("--shapes", default="q_proj,o_proj,lm_head")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    kernels, threads = load_kernels(), args.threads or env_threads()
    read, peak = machine(kernels, threads)
    print(f"isa={kernels.ISA} threads={threads}  streaming read {read / 1e9:.1f} GB/s  "
          f"peak dot {peak / 1e9:.1f} GFLOP/s (same run)")
    rng = np.random.default_rng(0)
    for name in args.shapes.split(","):
        for fmt in args.fmts.split(","):
            w = random_weight(*SHAPES[name], fmt, rng)
            lin, ref = CPULinear(w, threads=threads, kernels=kernels), Linear(w)
            for T in (int(t) for t in args.tokens.split(",")):
                bench_case(name, fmt, T, lin, ref, kernels, threads)
            del lin, ref, w


if __name__ == "__main__":
    main()
