"""Benchmark packing an expert store against writing the same bytes plainly.

A synthetic checkpoint in memory (Qwen3-30B-A3B expert shapes: H 2048, I 768;
every expert of a layer shares one set of tensors, so the sources cost no RAM and
no reading) is packed into a store in --dir: tile packing, checksums and pwrite
on the thread pool, then fsync. Then the same number of bytes is written to a file
there with plain 64 MB write() calls and fsync. Each is run --repeat times in turn,
the best kept. Printed: both rates and their ratio (1.0 = the packer runs at the
disk's speed), then verify()'s rate over the cached store.
Usage: python tools/bench_pack.py [--dir /tmp] [--layers 4] [--experts 128]
                                  [--format fp8|bf16] [--repeat 2]
"""
import argparse
import os
import tempfile
import time

import torch

from moed.backends.cpu.store import ExpertStore, write_store
from moed.model.formats import Weight
from moed.model.moe import TorchExperts

H, I = 2048, 768
CHUNK = 64 << 20


def weight(rows, cols, fmt):
    if fmt == "bf16":
        return Weight(torch.randn(rows, cols).to(torch.bfloat16), None, None)
    data = torch.randint(0, 120, (rows, cols), dtype=torch.uint8).view(torch.float8_e4m3fn)
    return Weight(data, torch.rand(-(-rows // 128), -(-cols // 128)) + 0.5, (128, 128))


def plain_write(path, nbytes):
    buf = os.urandom(CHUNK)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for off in range(0, nbytes, CHUNK):
            f.write(buf[:min(CHUNK, nbytes - off)])
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--format", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    g, u, d = weight(I, H, args.format), weight(I, H, args.format), weight(H, I, args.format)
    E = args.experts
    layers = [(i, TorchExperts([g] * E, [u] * E, [d] * E)) for i in range(args.layers)]
    t_pack = t_plain = t_verify = float("inf")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "bench.moex")
        for _ in range(args.repeat):
            t = time.perf_counter()
            write_store(path, "bench", layers)
            t_pack = min(t_pack, time.perf_counter() - t)
            nbytes = os.path.getsize(path)
            t = time.perf_counter()
            ExpertStore.open(path).verify()
            t_verify = min(t_verify, time.perf_counter() - t)
            os.unlink(path)
            t_plain = min(t_plain, plain_write(os.path.join(tmp, "plain"), nbytes))
            os.unlink(os.path.join(tmp, "plain"))
    gb = nbytes / 1e9
    print(f"{args.format} store {gb:.2f} GB in {args.dir}: pack {gb / t_pack:.2f} GB/s "
          f"({t_pack:.1f} s), plain write + fsync {gb / t_plain:.2f} GB/s ({t_plain:.1f} s) "
          f"-> ratio {t_plain / t_pack:.2f}; verify (cached) {gb / t_verify:.2f} GB/s")


if __name__ == "__main__":
    main()
