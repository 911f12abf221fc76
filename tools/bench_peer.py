"""Decode tok/s of moed and of llama.cpp side by side, on the same weights.

moed through `LLM.generate` against a llama.cpp build of your own, alternating
A B A B, with the paired ratio moed/llama.cpp per round and the median of
those ratios.

Nothing here builds llama.cpp or is needed by the tests: bring your own build
(CPU only, Release, GGML_NATIVE on, LLAMA_CURL off; the targets llama-bench
and, for --batch, llama-batched-bench) and its source checkout (for the
converter). Figures in this project's notes were taken with commit 0c1e570.

1. The model (moed's benchmark model, kept in the dir and reused):
     python tools/bench_decode.py --layers 8 --model-dir /tmp/peer/m8 --ref-tokens 0
   builds the 8-layer Qwen3-30B-A3B-shaped FP8 checkpoint (128x128 block
   scales, random weights, BF16 embedding and LM head as published) and
   prints moed's own decode figures (% of the read bandwidth, layers against
   LM head).

2. The GGUF: llama.cpp's own converter, which dequantizes the FP8 block-scaled
   weights itself (FP8 * scale_inv in FP32) and, with --fp8-as-q8, stores the
   tensors that were FP8 as Q8_0 while the rest keep their published types
   (LM head and embedding BF16; the converter writes norms and routers F32):
     python tools/bench_peer.py convert --llama-cpp ~/llama.cpp \
         --model-dir /tmp/peer/m8 --gguf /tmp/peer/m8-q8_0-bf16head.gguf
   (with a Python that has torch, transformers, safetensors and numpy: moed's
   venv has them; --python picks another; 6.5 GB, ~9 min on 2 busy cores.)
   It runs
     convert_hf_to_gguf.py M --outtype bf16 --fp8-as-q8 --outfile GGUF
   with one change: the benchmark model's tokenizer is a small trained
   byte-level BPE whose pre-tokenizer hash is in no table of the converter's,
   so where the converter would stop there, the GGUF gets the "qwen2"
   pre-tokenizer (the published Qwen3's). llama-bench feeds token ids, so the
   figures do not depend on it. It then prints every tensor type in the GGUF.

3. The figures (alternating rounds; --llama-bench is the build dir, bin/
   inside it is searched, or the binary):
     python tools/bench_peer.py bench --llama-bench ~/llama.cpp/build \
         --model-dir /tmp/peer/m8 --gguf /tmp/peer/m8-q8_0-bf16head.gguf \
         --context 5 --tokens 64 --rounds 4
     ... --context 2048 --tokens 32 --rounds 3 --reps 1 --bench-args='--repack 0'
     ... --context 5 --tokens 32 --rounds 2 --batch 4 --batched-args=--no-repack
   (--repack 0 / --no-repack only where AMX faults: see AMX below.)

What is timed:
  moed      one long-lived LLM (built once, so its caches stay warm); per round
            one generate() of `--batch` prompts of `--context` tokens, greedy,
            ignore_eos, `--tokens` + 1 new tokens; decode tok/s = batch x the
            decode steps / the wall time from the end of the last step that
            prefilled anything to the end of the last step (every decode step
            and the generate loop between them; prefill excluded).
  llama.cpp batch 1: `llama-bench -m GGUF -p 0 -n TOKENS -t THREADS -r REPS
            [-d CONTEXT] -o json`, its avg_ts: tokens / time of the decode of
            TOKENS tokens after a context of CONTEXT tokens (-d/--n-depth: the
            depth is filled before the clock starts; without -d, context is
            llama-bench's empty one, which the 5-token prompt matches
            closely). Builds without -d: -pg CONTEXT,TOKENS is not a decode
            figure (it times the prompt too), so the round says n/a.
            batch > 1: `llama-batched-bench -m GGUF -npp CONTEXT -ntg TOKENS
            -npl BATCH -t THREADS -c ...`, its S_TG (batch x TOKENS / the
            decode time); n/a when the build lacks it.
AMX: a native build on a CPU with AMX repacks Q8_0 dense matrices for its AMX
kernels (llama-bench --repack 1, the default). One token at a time they run
its AVX512-VNNI path; more than one (a prompt, the -d fill, a batch) runs AMX
tiles, and where the OS or hypervisor does not give the process the tile state,
ldtilecfg faults and llama.cpp dies (seen here: SIGSEGV in
ggml_backend_amx_mul_mat). Then pass --bench-args '--repack 0' (and
--batched-args '--no-repack') for context > 5 and batch > 1: without the
repack llama.cpp's decode is slower (measured here at context 5: 16.0-16.4
against 17.5-17.6 tok/s).
Fairness: llama.cpp gets the environment this process started with (importing
moed sets OMP_WAIT_POLICY=PASSIVE, which costs llama.cpp's OpenMP build ~17%);
before the rounds the checkpoint's shards are dropped from the page cache and
the GGUF and moed's store are read in, so neither side reads from disk.
The machine's free read bandwidth moves from minute to minute on a shared
host: hence rounds that alternate, and paired ratios rather than a ratio of
means. `uptime`'s load average is printed at the start, after every round and
at the end: another process on the cores (a compile) ruins a round for both
sides, for llama.cpp's spinning barriers most.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

# llama.cpp runs with the environment this process started with: importing moed
# sets OMP_WAIT_POLICY=PASSIVE (for torch's threads), which inherited costs
# llama.cpp's OpenMP build ~17% of its decode rate (measured: 14.6 against 17.7
# tok/s on the 8-layer model).
PEER_ENV = dict(os.environ)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------- convert

# Runs llama.cpp's converter with the pre-tokenizer fallback (see the docstring).
_CONVERT_BOOT = r"""
import runpy, sys
src, argv = sys.argv[1], sys.argv[2:]
sys.path[:0] = [src + "/gguf-py", src]
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        print("bench_peer: pre-tokenizer hash in no table of the converter's: 'qwen2'",
              file=sys.stderr)
        return "qwen2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + argv
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_INSPECT = r"""
import collections, sys
sys.path.insert(0, sys.argv[1] + "/gguf-py")
import gguf
r = gguf.GGUFReader(sys.argv[2])
kinds = collections.defaultdict(collections.Counter)
for t in r.tensors:
    kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name
    kinds[kind][t.tensor_type.name] += 1
for kind, types in sorted(kinds.items()):
    print(f"  {kind:24s} " + ", ".join(f"{n} x {ty}" for ty, n in types.items()))
print(f"  {sum(t.n_bytes for t in r.tensors) / 1e9:.2f} GB of tensors")
"""


def convert(args):
    src = os.path.abspath(os.path.expanduser(args.llama_cpp))
    if not os.path.exists(os.path.join(src, "convert_hf_to_gguf.py")):
        sys.exit(f"{src}: no convert_hf_to_gguf.py (give the llama.cpp source checkout)")
    cmd = [args.python, "-c", _CONVERT_BOOT, src, args.model_dir, "--outtype", "bf16",
           "--fp8-as-q8", "--outfile", args.gguf]
    print("+", " ".join(cmd[:2] + ["<boot>"] + cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    inspect(src, args.gguf, args.python)


def inspect(src, gguf_path, python):
    print(f"{gguf_path}: tensor types", flush=True)
    subprocess.run([python, "-c", _INSPECT, src, gguf_path], check=True)


# ----------------------------------------------------------------------- moed

class DecodeSpan:
    """Wall time of the decode after the last step that prefilled: the end of every
    LLMEngine.step is stamped, with whether its chunks were all single tokens."""

    def __init__(self):
        self.marks = []

    def __enter__(self):
        from moed.engine.llm_engine import LLMEngine
        from moed.engine.model_runner import ModelRunner
        self._step, self._run = LLMEngine.step, ModelRunner.run
        span, step, run = self, self._step, self._run
        span._decode = None

        def stamped_step(eng):
            span._decode = None
            out = step(eng)
            if span._decode is not None:
                span.marks.append((time.perf_counter(), span._decode))
            return out

        def noted_run(runner, chunks, *a, **kw):
            span._decode = all(n == 1 for _, n in chunks)
            return run(runner, chunks, *a, **kw)
        LLMEngine.step, ModelRunner.run = stamped_step, noted_run
        return self

    def __exit__(self, *exc):
        from moed.engine.llm_engine import LLMEngine
        from moed.engine.model_runner import ModelRunner
        LLMEngine.step, ModelRunner.run = self._step, self._run

    def decode(self):
        """-> (decode steps, seconds) after the last prefilling step."""
        last = max(i for i, (_, d) in enumerate(self.marks) if not d)
        steps = len(self.marks) - 1 - last
        return steps, self.marks[-1][0] - self.marks[last][0]


def moed_round(llm, prompts, tokens):
    from moed import SamplingParams
    with DecodeSpan() as span:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=tokens + 1,
                                                    ignore_eos=True))
    steps, secs = span.decode()
    assert all(len(o.token_ids) == tokens + 1 for o in outs)
    return len(prompts) * steps / secs


# ------------------------------------------------------------------- llama.cpp

def find_binary(path, name):
    """The binary `name` in a build dir (or its bin/), or beside the binary given."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        path = os.path.dirname(path)
    for d in (path, os.path.join(path, "bin")):
        f = os.path.join(d, name)
        if os.path.isfile(f) and os.access(f, os.X_OK):
            return f
    return None


def has_flag(binary, flag):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, env=PEER_ENV)
    return f" {flag}" in out.stdout + out.stderr


class Peer:
    def __init__(self, args):
        self.bench = find_binary(args.llama_bench, "llama-bench")
        if self.bench is None:
            sys.exit(f"no llama-bench at {args.llama_bench}")
        self.batched = find_binary(args.llama_bench, "llama-batched-bench")
        self.depth = has_flag(self.bench, "-d,")
        self.args = args
        self.commit = None

    def describe(self):
        a = self.args
        if a.batch > 1:
            return (f"{self.batched} -npp {a.context} -ntg {a.tokens} -npl {a.batch} "
                    f"-t {a.threads} {a.batched_args}".rstrip() if self.batched
                    else "llama-batched-bench: not built")
        depth = f" -d {a.context}" if a.context > 5 else ""
        return (f"{self.bench} -p 0 -n {a.tokens}{depth} -t {a.threads} -r {a.reps} "
                f"{a.bench_args}").rstrip()

    def round(self):
        """-> tok/s, or None (n/a)."""
        a = self.args
        if a.batch > 1:
            return self._batched() if self.batched else None
        cmd = [self.bench, "-m", a.gguf, "-p", "0", "-n", str(a.tokens), "-t", str(a.threads),
               "-r", str(a.reps), "-o", "json"] + shlex.split(a.bench_args)
        if a.context > 5:
            if not self.depth:
                return None
            cmd += ["-d", str(a.context)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV)
        if out.returncode != 0:
            sys.exit(f"llama-bench failed ({out.returncode}):\n{out.stderr[-2000:]}")
        rows = json.loads(out.stdout)
        row = [r for r in rows if r.get("n_gen") == a.tokens][-1]
        self.commit = row.get("build_commit")
        return float(row["avg_ts"])

    def _batched(self):
        a = self.args
        ctx = a.batch * (a.context + a.tokens) + 64
        cmd = [self.batched, "-m", a.gguf, "-npp", str(a.context), "-ntg", str(a.tokens),
               "-npl", str(a.batch), "-t", str(a.threads), "-c", str(ctx),
               "--output-format", "jsonl"] + shlex.split(a.batched_args)
        out = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV)
        if out.returncode != 0:
            sys.exit(f"llama-batched-bench failed ({out.returncode}):\n{out.stderr[-2000:]}")
        rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        return float(rows[-1]["speed_tg"])


# ----------------------------------------------------------------------- bench

def page_cache(model_dir, gguf):
    """The page cache for both: the checkpoint's shards are dropped from it (the
    LLM has packed what it needs into its store; pages it still maps stay),
    then the GGUF and the store files are read once, so that neither side reads
    from disk in a round (measured: with the shards resident beside both, a
    24 GiB machine evicted part of the GGUF and llama-bench lost ~20% to disk
    reads). -> GiB of page cache, GiB available, after."""
    import glob
    for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    cache = os.environ["MOED_CACHE_DIR"]
    for f in [gguf] + sorted(glob.glob(os.path.join(cache, "*"))):
        if os.path.isfile(f):
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, v = line.split(":")
            info[k] = int(v.split()[0]) / (1 << 20)
    return info["Cached"], info["MemAvailable"]


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def bench(args):
    os.environ.setdefault("MOED_CACHE_DIR", os.path.join(args.model_dir, "cache"))
    os.environ.setdefault("MOED_THREADS", str(args.threads))
    import torch
    from bench_model import engine, qwen3_30b_shaped
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    peer = Peer(args)
    print(f"load average at start: {load_average()}", flush=True)
    model = qwen3_30b_shaped(args.model_dir, args.layers)
    llm = engine(model, fast=True)
    prompts = [[3 + i] + [(17 + 31 * j) % 150000 + 3 for j in range(args.context - 1)]
               for i in range(args.batch)]
    cached, avail = page_cache(args.model_dir, args.gguf)
    print(f"page cache {cached:.1f} GiB, {avail:.1f} GiB available (checkpoint shards dropped, "
          f"GGUF and store read in)", flush=True)
    from moed import SamplingParams           # warm-up: one step of each kind
    llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True))
    print(f"moed: {model}, {args.threads} threads, batch {args.batch}, context {args.context}, "
          f"{args.tokens} decode tokens; generate(), greedy, ignore_eos", flush=True)
    print(f"llama.cpp: {peer.describe()}", flush=True)
    ratios = []
    for r in range(args.rounds):
        t0 = time.time()
        a = moed_round(llm, prompts, args.tokens)
        b = peer.round()
        ratio = a / b if b else None
        if ratio is not None:
            ratios.append(ratio)
        print(f"round {r + 1}: moed {a:6.2f} tok/s, llama.cpp "
              + (f"{b:6.2f} tok/s, moed/llama.cpp {ratio:5.2f}x" if b else "n/a")
              + f"  ({time.time() - t0:.0f} s, load {load_average()})", flush=True)
    if ratios:
        print(f"median moed/llama.cpp {statistics.median(ratios):.2f}x over {len(ratios)} "
              f"rounds (min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
              + (f"; llama.cpp build {peer.commit}" if peer.commit else ""))
    print(f"load average at end: {load_average()}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="the moed model dir -> GGUF (Q8_0, BF16 LM head)")
    c.add_argument("--llama-cpp", required=True, help="llama.cpp source checkout")
    c.add_argument("--model-dir", required=True)
    c.add_argument("--gguf", required=True, help="output path")
    c.add_argument("--python", default=sys.executable,
                   help="Python with torch, transformers, safetensors, numpy")
    b = sub.add_parser("bench", help="alternate moed and llama.cpp decode")
    b.add_argument("--llama-bench", required=True,
                   help="llama.cpp build dir (or its llama-bench binary)")
    b.add_argument("--model-dir", required=True)
    b.add_argument("--gguf", required=True)
    b.add_argument("--layers", type=int, default=8,
                   help="layers of the model dir (it is built there if absent)")
    b.add_argument("--context", type=int, default=5, help="prompt tokens before decoding")
    b.add_argument("--tokens", type=int, default=32, help="decode tokens per round")
    b.add_argument("--rounds", type=int, default=4)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--reps", type=int, default=2,
                   help="llama-bench repetitions per round (its avg_ts is their mean)")
    b.add_argument("--bench-args", default="",
                   help="more llama-bench options, e.g. '--repack 0' (see the docstring)")
    b.add_argument("--batched-args", default="",
                   help="more llama-batched-bench options, e.g. '--no-repack'")
    b.add_argument("--torch-threads", type=int, default=None)
    args = ap.parse_args()
    if args.cmd == "convert":
        if shutil.which(args.python) is None and not os.path.exists(args.python):
            sys.exit(f"no Python at {args.python}")
        convert(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
