"""Prefix caching: time to first token of a repeated 2K-token prompt against the same
prompt cold, through LLM.generate on the Qwen3-30B-A3B-shaped FP8 model of
bench_decode.py. A chat resends its system prompt and history every turn; with the
cache only the last, partly filled block (and the new turn) is computed again.

Each pair runs A (a prompt never seen: cold, every block computed) then B (the same
prompt again: its whole blocks found in the cache), on one engine, alternating, so
the host's bandwidth swings hit both alike; the line is B/A for that pair. Goal:
B <= 5% of A.

Usage: python tools/bench_prefix_cache.py [--layers 4] [--tokens 2048] [--pairs 4]
           [--model-dir DIR (kept and reused)]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import add_model_args, engine, model_setup  # noqa: E402


def ttft(llm, prompt):
    from moed import SamplingParams
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.set_defaults(layers=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    _tmp, model_dir, _kernels, _threads, line = model_setup(args)
    print(line, flush=True)
    llm = engine(model_dir, True, max_num_seqs=4)
    rng = np.random.default_rng(0)
    ttft(llm, rng.integers(3, 400, size=64).tolist())           # warm up
    ratios = []
    for pair in range(args.pairs):
        prompt = rng.integers(3, 400, size=args.tokens).tolist()
        cold = ttft(llm, prompt)
        warm = ttft(llm, prompt)
        ratios.append(warm / cold)
        print(f"pair {pair}: T={args.tokens} cold TTFT {cold * 1e3:8.1f} ms  repeated "
              f"{warm * 1e3:7.1f} ms  ratio {warm / cold:.4f}", flush=True)
    stats = llm.engine.stats()
    print(f"ratio min {min(ratios):.4f} max {max(ratios):.4f} (goal <= 0.05); prefix cache "
          f"{stats['prefix_cache_hits']}/{stats['prefix_cache_queries']} tokens hit")


if __name__ == "__main__":
    main()
