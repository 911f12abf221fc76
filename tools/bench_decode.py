"""End-to-end decode tokens/s: CPU expert engine vs the torch reference, one run.

A qwen3_moe FP8 checkpoint with Qwen3-30B-A3B dimensions (H 2048, I 768,
128 experts, top-8) and random weights, as many layers as --layers (default
2: ~1.2 GB of experts), decoded greedily from the same prompts by both paths.
Usage: python tools/bench_decode.py [--layers 2] [--tokens 16] [--batch 1]
"""
import argparse
import os
import tempfile
import time

from moed import LLM, SamplingParams
from moed.model.tiny import build_tiny_model

QWEN3_30B = {"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128,
             "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4,
             "head_dim": 128, "intermediate_size": 6144}


def decode_rate(model_dir, experts, prompts, n):
    llm = LLM(model_dir, device="cpu", experts=experts)
    params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt, [o.token_ids for o in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MOED_CACHE_DIR", os.path.join(tmp, "cache"))
        model = build_tiny_model(os.path.join(tmp, "model"), "qwen3_moe", fmt="fp8",
                                 overrides=dict(QWEN3_30B, num_hidden_layers=args.layers))
        prompts = [[3 + i, 17, 42, 99, 7] for i in range(args.batch)]
        fast, a = decode_rate(model, "cpu", prompts, args.tokens)
        ref, b = decode_rate(model, "torch", prompts, args.tokens)
        print(f"qwen3-30b-a3b dims, {args.layers} layers, FP8, batch {args.batch}: "
              f"engine {fast:.2f} tok/s, torch reference {ref:.2f} tok/s -> x{fast / ref:.1f}; "
              f"same greedy tokens: {a == b}")


if __name__ == "__main__":
    main()
