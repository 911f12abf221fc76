"""Benchmark the fused CPU expert kernels against the machine and the torch reference.

For Qwen3-30B-A3B (H 2048, I 768, 128 experts, top-8) and DeepSeek-V3
(H 7168, I 2048, top-8, fewer experts so it fits) shapes, FP8 and BF16,
T = 1, 4, 32, 512, it prints per case: latency, effective weight bandwidth
(bytes of the distinct experts touched / time) and its ratio to the read
bandwidth of a streaming loop (the best of a plain one and two with a
software prefetch) measured in the same run, the flop rate
and its fraction of the register-only peak dot-product rate measured in the
same run, and the speed-up over the torch reference (dequantize, then matmul).

Every layer's working set is >= 8x the L3 size, and expert ids are drawn at
random per call, so weights come from DRAM. Each figure is the best of its
repetitions (kernel calls, reference calls, probes between the kernel calls):
the same policy for the kernel and for both baselines. Usage:
    python tools/bench_experts.py [--shapes qwen,deepseek] [--fmts fp8,bf16,int4]
                                  [--tokens 1,4,32,512] [--threads N] [--isa avx512]
"""
import argparse
import time

import numpy as np
import torch

from moed.backends.cpu.isa import load_kernels
from moed.backends.cpu.experts import CPUExpertLayer
from moed.backends.cpu.runtime import default_threads
from moed.backends.cpu.layout import INT4_CODE_BYTES
from moed.backends.cpu.packed import PackedExperts, empty_buffers
from moed.model.formats import Int4, Weight, pack_int4
from moed.model.moe import TorchExperts

SHAPES = {  # name: (H, I, experts, top-k)
    "qwen": (2048, 768, 128, 8),
    "deepseek": (7168, 2048, 16, 8),
}
L3_BYTES = 32 << 20


INT4_FMT = "int4g32"        # `--fmts int4`: symmetric, group 32 (Kimi-K2-Thinking's)


def random_packed(fmt, E, H, I, rng):
    """Packed experts with random FP8 codes (finite, |w| <= 448), BF16 in [-2, 2] or INT4
    codes with group scales 1/8."""
    fmt = INT4_FMT if fmt == "int4" else fmt
    b = empty_buffers(fmt, E, H, I)
    for name, a in b.items():
        if name.endswith("_scale"):
            a[:] = 1.0 if fmt == INT4_FMT else 1.0 / 448
        elif fmt == INT4_FMT:
            a[:] = rng.integers(0, 256, size=a.shape, dtype=np.uint8)
            units = a.reshape(E, -1, INT4_CODE_BYTES + 1024)
            units[:, :, INT4_CODE_BYTES:].view(np.float32)[:] = 1.0 / 8
        elif fmt == "fp8":
            a[:] = rng.integers(0, 256, size=a.shape, dtype=np.uint8) & 0xF7   # never NaN
        else:
            a.view(np.uint16)[:] = (rng.integers(0, 1 << 16, size=a.view(np.uint16).shape,
                                                 dtype=np.uint16)
                                    & 0x807F) | 0x3F00                         # [-2, 2]
    return PackedExperts(fmt, E, H, I, b)


def reference_experts(fmt, E, H, I, n, rng):
    """A torch-reference layer of n experts (stored FP8 + scales, or BF16), same shapes."""
    def w(out, inp):
        if fmt == "int4":
            codes = torch.from_numpy(rng.integers(0, 16, (out, inp), dtype=np.uint8))
            return Weight(pack_int4(codes), int4=Int4(inp, 32, torch.full(
                (out, -(-inp // 32)), 1.0 / 8, dtype=torch.bfloat16)))
        if fmt == "fp8":
            data = torch.from_numpy(rng.integers(0, 256, (out, inp), dtype=np.uint8) & 0x77)
            return Weight(data.view(torch.float8_e4m3fn), torch.full((-(-out // 128), -(-inp // 128)),
                                                                     1.0 / 448), (128, 128))
        return Weight(torch.randn(out, inp).bfloat16())
    return TorchExperts([w(I, H) for _ in range(n)], [w(I, H) for _ in range(n)],
                        [w(H, I) for _ in range(n)])


def routings(T, k, E, calls, rng):
    """Random top-k ids per token, one [T, k] tensor per call. When a call needs at
    most half the experts (decode), its tokens draw only from the half used least
    recently: otherwise a call sometimes finds the previous call's experts still in
    L3, and a best-of-N figure would pick exactly those lucky calls."""
    out, last = [], np.full(E, -1)
    for c in range(calls):
        pool = np.arange(E)
        if T * k <= E // 2:
            pool = np.argsort(last + rng.random(E) * 0.5, kind="stable")[:E // 2]
        ids = np.stack([pool[rng.permutation(len(pool))[:k]] for _ in range(T)])
        last[np.unique(ids)] = c
        out.append(torch.from_numpy(ids).long())
    return out


def _seconds(fn, ids, x, w):
    t0 = time.perf_counter()
    fn(x, ids, w)
    return time.perf_counter() - t0


def time_calls(fn, ids_list, x, w):
    """Seconds of each call (the first, cold one dropped when there are more than 2)."""
    ts = []
    for ids in ids_list:
        t0 = time.perf_counter()
        fn(x, ids, w)
        ts.append(time.perf_counter() - t0)
    return ts[1:] if len(ts) > 2 else ts


_READ_BUF = None


def machine(kernels, threads):
    """(read bytes/s, peak flop/s) now: re-measured beside every case, because the
    machine is shared and its free bandwidth moves from minute to minute. The read
    is the best of 3 passes, each the faster of a plain and a prefetching loop."""
    global _READ_BUF
    if _READ_BUF is None:
        _READ_BUF = np.ones(1 << 30, dtype=np.uint8)     # 1 GiB: 32x the L3
    buf = _READ_BUF
    read = max(buf.nbytes / kernels.read_seconds(buf.ctypes.data, buf.nbytes, threads)
               for _ in range(3))
    peak = max(kernels.peak_flops(2_000_000, threads) for _ in range(3))
    return read, peak


def bench_case(kernels, threads, shape, packed, T, rng, ref):
    """One line. Every figure is the best of its repetitions: the kernel's calls,
    the torch reference's calls, and the machine probes around and between the calls."""
    H, I, E, k = SHAPES[shape]
    fmt = packed.fmt
    layer = CPUExpertLayer(packed, threads, kernels)
    x, w = torch.randn(T, H), torch.rand(T, k)
    calls = 21 if T <= 32 else 4
    ids_list = routings(T, k, E, calls, rng)
    # the machine's free bandwidth moves within seconds: probes and kernel calls
    # alternate, so both get the same chances at a good moment
    read, peak = machine(kernels, threads)
    layer.forward(x, ids_list[0], w)                      # warm-up, not timed
    ts, timed = [], ids_list[1:]
    for part in np.array_split(np.arange(len(timed)), 3 if T <= 32 else 1):
        ts += [_seconds(layer.forward, timed[j], x, w) for j in part]
        r2, p2 = machine(kernels, threads)
        read, peak = max(read, r2), max(peak, p2)
    i = int(np.argmin(ts))
    t = ts[i]
    touched = len(torch.unique(timed[i]))                 # distinct experts of that call
    bw = touched * packed.expert_bytes() / t
    flops = 2 * 3 * H * I * T * k / t
    t_ref = min(time_calls(ref.forward, ids_list[:3 if T <= 32 else 2], x, w))
    print(f"{shape:8s} {fmt:7s} T={T:<4d} {t * 1e3:8.3f} ms  read {read / 1e9:5.1f} GB/s, peak "
          f"{peak / 1e9:5.0f} GFLOP/s | weights {bw / 1e9:6.1f} GB/s = "
          f"{bw / read:5.1%} of read  |  {flops / 1e9:7.1f} GFLOP/s = {flops / peak:5.1%} of peak"
          f"  |  torch {t_ref * 1e3:9.2f} ms -> x{t_ref / t:6.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen,deepseek")
    ap.add_argument("--fmts", default="fp8,bf16")
    ap.add_argument("--tokens", default="1,4,32,512")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--isa", default=None)
    args = ap.parse_args()
    kernels = load_kernels(args.isa)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    read, peak = machine(kernels, threads)
    print(f"isa={kernels.ISA} threads={threads}  streaming read {read / 1e9:.1f} GB/s  "
          f"peak dot {peak / 1e9:.1f} GFLOP/s (register-only loop, same run)")
    for shape in args.shapes.split(","):
        H, I, E, k = SHAPES[shape]
        fp8_bytes = E * 3 * H * I
        print(f"-- {shape}: H {H}, I {I}, {E} experts, top-{k}; FP8 layer {fp8_bytes / 2**20:.0f} MiB "
              f"= {fp8_bytes / L3_BYTES:.0f}x L3")
        for fmt in args.fmts.split(","):
            rng = np.random.default_rng(0)
            packed = random_packed(fmt, E, H, I, rng)
            ref = reference_experts(fmt, E, H, I, E, rng)
            for T in (int(t) for t in args.tokens.split(",")):
                bench_case(kernels, threads, shape, packed, T, rng, ref)
            del packed, ref


if __name__ == "__main__":
    main()
