"""End-to-end decode on the CPU: tokens/s, effective weight bandwidth as a
fraction of the read bandwidth measured in the same run, per-step overhead,
and the engine (CPU kernels for experts and dense linears) against the torch
reference path (MOED_EXPERTS=torch MOED_LINEARS=torch).

Model: qwen3_moe FP8 with Qwen3-30B-A3B dimensions (H 2048, 32 heads, 4 kv
heads, head_dim 128, 128 experts top-8, I 768, vocab 151936), random weights,
--layers layers (default 12: as many as fit in a 24 GiB machine's page cache
with room to spare; each layer is 0.6 GB of FP8 experts in the checkpoint and
0.6 GB again packed, the BF16 embedding and LM head are 0.6 GB each, so 12
layers keep both copies (~17 GB, built in ~1.5 min, packed in ~1 min on first
use) resident and no step reads from disk). With fewer layers the LM head, the
single largest read, dominates the step and the per-layer overhead hides.

Effective bandwidth = weight bytes a step reads (every packed dense matrix,
the LM head, the routers, and the distinct experts the step routed to) /
step time (medians over the decode steps). The read bandwidth it is compared
with is paired: right after every step (outside its clock) a streaming-read
probe reads as many bytes as the step did, and the figure is the median of the
per-step ratios, because the bandwidth this shared machine leaves free moves
within seconds. The best read of the probes before and after the run is printed
too, with the ratio against it (stricter: a peak against a median). Per-step overhead = step time -
time in the weight kernels - time in attention proper (scores, softmax,
values): norms, rotary, KV writes, routing, sampling, scheduling, Python.

The engine runs a decode step's layers in one compiled call (the decode stack,
moed/backends/cpu/decode_stack.py): its line gives that call's time ("layers") beside
the LM head's, and overhead = the rest; the `loop` line is the same engine with
the Python layer loop instead, each kernel and attention timed on its own.

Torch's OpenMP threads spin after each parallel region and steal the core
from the kernels' pinned pool: run with --torch-threads 1 or
OMP_WAIT_POLICY=PASSIVE to see the engine without that interference.

Usage: python tools/bench_decode.py [--layers 12] [--tokens 32] [--batch 1]
           [--context 5 (prompt tokens)] [--ref-tokens 4] [--model-dir DIR (kept and reused)]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import (add_model_args, model_setup, StepClock, dense_bytes, engine, machine,  # noqa: E402
                         read_probe)
from moed.backends.torch import LayerLoop  # noqa: E402


def decode(llm, prompts, n, probe):
    """Decode n tokens per prompt, clocking every step and running probe(step) after each
    -> (decode steps, token ids)."""
    from moed import SamplingParams
    llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))
    with StepClock(after_step=probe) as clock:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=n + 1,
                                                    ignore_eos=True))
    return clock.decode_steps(), [o.token_ids for o in outs]


def report(name, llm, prompts, n, kernels, threads):
    best, _ = machine(kernels, threads)
    cpu_b, torch_b = dense_bytes(llm.engine.model)

    def probe(step):              # read as many bytes as the step did, right after it
        step["read"] = read_probe(kernels, threads, cpu_b + torch_b + step["expert_bytes"])
    steps, tokens = decode(llm, prompts, n, probe)
    best = max(best, machine(kernels, threads)[0])     # best of before/after: shared machine
    # medians: a step the OS preempted for another process says nothing about the engine
    med = lambda f: float(np.median([f(s) for s in steps]))   # noqa: E731
    step, kern, attn, stack = med(lambda s: s["wall"]), med(lambda s: s["kernels"]), \
        med(lambda s: s["attention"]), med(lambda s: s["stack"])
    over = med(lambda s: s["wall"] - s["kernels"] - s["attention"] - s["stack"])
    per_step = cpu_b + torch_b + med(lambda s: s["expert_bytes"])
    bw = per_step / step
    paired = med(lambda s: (cpu_b + torch_b + s["expert_bytes"]) / s["wall"] / s["read"])
    read = med(lambda s: s["read"])
    print(f"{name:6s} {len(prompts) / step:7.2f} tok/s  step {step * 1e3:8.2f} ms | weights "
          f"{per_step / 1e6:6.0f} MB/step -> {bw / 1e9:5.1f} GB/s = {paired:5.1%} of read "
          f"{read / 1e9:4.1f} (paired), {bw / best:5.1%} of best read {best / 1e9:4.1f} | "
          + (f"kernels {kern * 1e3:7.2f} ms ({per_step / kern / 1e9:5.1f} GB/s), attention "
             f"{attn * 1e3:5.2f} ms" if not stack else
             f"compiled calls {(kern + stack) * 1e3:7.2f} ms ({per_step / (kern + stack) / 1e9:5.1f}"
             f" GB/s: layers {stack * 1e3:.2f} ms in one, LM head {kern * 1e3:.2f} ms)")
          + f", overhead {over * 1e3:6.2f} ms = {over / step:5.1%} of step", flush=True)
    return step, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ref-tokens", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=5,
                    help="prompt tokens before decoding (attention reads grow with it)")
    args = ap.parse_args()
    tmp, model, kernels, threads, setup = model_setup(args)
    read, _ = machine(kernels, threads)
    print(f"qwen3-30b-a3b dims, {args.layers} layers, {args.fmt.upper()} (BF16 embed/LM head), batch "
          f"{args.batch}, context {args.context}+, {setup}; streaming read {read / 1e9:.1f} GB/s "
          f"(same run, re-measured after every step)", flush=True)
    prompts = [[3 + i] + [(17 + 31 * j) % 150000 + 3 for j in range(args.context - 1)]
               for i in range(args.batch)]
    fast = engine(model, fast=True)
    t_fast, a = report("engine", fast, prompts, args.tokens, kernels, threads)
    stack = getattr(fast.engine.model.ops, "stack", None)
    fast.engine.model.ops = LayerLoop()
    if stack is not None:        # the same engine with the layer loop: the stack's gain
        report("loop", fast, prompts, args.tokens, kernels, threads)
    del fast, stack
    if args.ref_tokens <= 0:
        return
    ref = engine(model, fast=False)
    t_ref, b = report("torch", ref, prompts, args.ref_tokens, kernels, threads)
    k = args.ref_tokens + 1
    same = [x[:k] for x in a] == [y[:k] for y in b]
    print(f"engine vs torch reference: x{t_ref / t_fast:.1f} tokens/s; same greedy tokens "
          f"(first {k}): {same}")


if __name__ == "__main__":
    main()
