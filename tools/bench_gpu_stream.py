"""Host-to-device bandwidth and one streamed expert layer, over the accel device layer.

    python tools/bench_gpu_stream.py [--experts 32] [--tokens 4096] [--ring 4] [--small]

Prints the pinned and pageable host-to-device GB/s (the PCIe bound every streamed
prefill is held to), then one MoE layer of DeepSeek-V3 expert shapes (D 7168, I 2048,
FP8 with 128 x 128 block scales, top-8 of --experts) run by StreamedExperts through its
expert-slot ring: tokens/s, the bytes it copied over its time as a fraction of the
pinned bound, and the same layer on the reference (TorchExperts on the device, weights
already there) as the compute bound. Without CUDA it runs on the CPU device (memcpy,
no PCIe): a smoke run of the same code, its figures are no GPU's; --small shrinks the
shapes for that.
"""
import argparse
import time

import torch

from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.cuda_device import CUDADevice
from moed.backends.accel.streamed_experts import StreamedExperts
from moed.backends.torch import TorchExperts
from moed.model.formats import FP8_DTYPE, Weight


def device_or_twin():
    if torch.cuda.is_available():
        return CUDADevice(0), torch.cuda.get_device_name(0)
    return CPUDevice(), "no CUDA device: the CPU twin (memcpy, no PCIe)"


def h2d_gbps(device, nbytes, pinned, reps=5):
    """Best of `reps` copies of nbytes host -> device on one stream."""
    src = device.host_empty((nbytes,), torch.uint8) if pinned else torch.empty(nbytes,
                                                                              dtype=torch.uint8)
    src.fill_(1)
    dst = device.empty((nbytes,), torch.uint8)
    stream, best = device.stream("h2d"), float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        stream.copy(dst, src)
        stream.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def fp8_weight(out, inp, g):
    data = (torch.randn(out, inp, generator=g) * 0.5).to(FP8_DTYPE)
    scale = torch.rand(-(-out // 128), -(-inp // 128), generator=g) * 0.01 + 0.001
    return Weight(data, scale, (128, 128))


def layer(E, D, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TorchExperts([fp8_weight(I, D, g) for _ in range(E)],
                        [fp8_weight(I, D, g) for _ in range(E)],
                        [fp8_weight(D, I, g) for _ in range(E)])


def timed(fn, device, reps):
    fn()                                                   # warm-up: slots, caches
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.kind == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ring", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="D 512, I 256 (a CPU smoke run)")
    args = ap.parse_args()
    device, name = device_or_twin()
    D, I = (512, 256) if args.small else (7168, 2048)
    size = 64 << 20 if args.small else 1 << 30
    pinned, pageable = h2d_gbps(device, size, True), h2d_gbps(device, size, False)
    print(f"{name}: host->device {pinned:.1f} GB/s pinned, {pageable:.1f} GB/s pageable "
          f"({size >> 20} MiB copies)", flush=True)
    ref = layer(args.experts, D, I)
    streamed = StreamedExperts.from_reference(ref, device, args.ring)
    T, k = args.tokens, min(8, args.experts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(args.experts, generator=g)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=g)
    used = int(ids.unique().numel())
    nbytes = used * sum(w.data.numel() + w.scale_inv.numel() * 4
                        for w in (ref.gate[0], ref.up[0], ref.down[0]))
    xd, idsd, wd = (device.to_device(t) for t in (x, ids, wts))
    t_stream = timed(lambda: streamed.forward(xd, idsd, wd), device, args.reps)
    on_device = ref.to(device.torch_device)
    t_ref = timed(lambda: on_device.forward(xd, idsd, wd), device, args.reps)
    bound = max(nbytes / (pinned * 1e9), t_ref)
    print(f"streamed layer: {args.experts} experts ({used} used), D {D}, I {I}, FP8, {T} tokens, "
          f"ring {args.ring}: {T / t_stream:8.0f} tok/s, {t_stream * 1e3:7.1f} ms | copied "
          f"{nbytes / 1e9:.2f} GB = {nbytes / t_stream / 1e9:5.1f} GB/s "
          f"({nbytes / t_stream / 1e9 / pinned:5.1%} of pinned) | weights on the device "
          f"{t_ref * 1e3:7.1f} ms | {bound / t_stream:5.1%} of min(PCIe bound, compute bound)",
          flush=True)
    if device.kind == "cpu":
        device.close()


if __name__ == "__main__":
    main()
