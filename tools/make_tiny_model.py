"""Build a tiny random MoE checkpoint laid out as published, for tests and demos.

    python tools/make_tiny_model.py --arch qwen3_moe --format fp8 --out DIR \
        [--seed N] [--shards N] [--tokenizer-vocab N] [--set key=value ...]
        [--group-size 32] [--asym] [--desc-act] [--gptq-format gptq|gptq_v2]

The INT4 formats: int4-ct (compressed-tensors pack-quantized, symmetric) and
int4-gptq (GPTQ; --asym, --desc-act and --gptq-format apply to it).

`--set` replaces a config.json field; the value is read as JSON when it parses
(`--set hidden_size=2048 --set mlp_only_layers=[0]`), else as a string.
"""
import argparse
import json
import sys
import time

from moed.errors import MoedError
from moed.testing.tiny import ARCHS, FORMATS, TOKENIZER_VOCAB, build_tiny_model


def parse_set(item):
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--format", default="bf16", choices=FORMATS)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--tokenizer-vocab", type=int, default=TOKENIZER_VOCAB,
                    help="BPE tokenizer size (config vocab_size is padded above it)")
    ap.add_argument("--set", dest="overrides", type=parse_set, action="append", default=[],
                    metavar="KEY=VALUE", help="replace a config.json field")
    ap.add_argument("--group-size", type=int, default=32, help="INT4: columns per scale")
    ap.add_argument("--asym", action="store_true", help="int4-gptq: zero points per group")
    ap.add_argument("--desc-act", action="store_true", help="int4-gptq: act-order g_idx")
    ap.add_argument("--gptq-format", default="gptq", help="int4-gptq: gptq (v1) or gptq_v2")
    args = ap.parse_args(argv)
    int4 = {"group_size": args.group_size}
    if args.format == "int4-gptq":
        int4.update(sym=not args.asym, desc_act=args.desc_act,
                    checkpoint_format=args.gptq_format)
    start = time.perf_counter()
    try:
        out = build_tiny_model(args.out, args.arch, args.format, seed=args.seed,
                               num_shards=args.shards, overrides=dict(args.overrides) or None,
                               tokenizer_vocab=args.tokenizer_vocab,
                               int4=int4 if args.format.startswith("int4") else None)
    except MoedError as e:
        print(f"make_tiny_model: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"{args.arch} {args.format} -> {out} ({size:.1f} MiB, "
          f"{time.perf_counter() - start:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
