"""What bench_decode.py and bench_prefill.py share: the Qwen3-30B-A3B-shaped FP8
checkpoint (random weights), the machine probes (streaming read bandwidth and
BF16 dot-product peak, measured in the same run), the engine with or without
the CPU kernels, and a clock that splits a step into kernels / attention / rest.
"""
import os
import time
from pathlib import Path

import numpy as np

import moed  # noqa: F401  before torch: it sets OMP_WAIT_POLICY, read when torch loads OpenMP

QWEN3_30B = {"hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128,
             "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4,
             "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936,
             "mlp_only_layers": [], "decoder_sparse_step": 1, "max_position_embeddings": 8192,
             "max_window_layers": 48}


# --fmt -> (the tiny builder's format, the quant_method its config.json names)
FORMATS = {"fp8": ("fp8", "fp8"), "int4": ("int4-ct", "compressed-tensors")}


def qwen3_30b_shaped(model_dir, layers, fmt="fp8"):
    """The checkpoint in model_dir (built there once; reused while its config matches).
    fmt: fp8 (128 x 128 block scales, as Qwen publishes) | int4 (compressed-tensors
    pack-quantized, symmetric, group 32, BF16 scales; the LM head and routers BF16)."""
    import json

    from moed.testing.tiny import build_tiny_model
    d = Path(model_dir)
    want = dict(QWEN3_30B, num_hidden_layers=layers)
    builder_fmt, method = FORMATS[fmt]
    cfg = d / "config.json"
    if cfg.exists():
        have = json.loads(cfg.read_text())
        if all(have.get(k) == v for k, v in want.items()) and \
                (have.get("quantization_config") or {}).get("quant_method") == method:
            return d
    t0 = time.perf_counter()
    build_tiny_model(d, "qwen3_moe", fmt=builder_fmt, overrides=want,
                     int4={"group_size": 32} if fmt == "int4" else None)
    print(f"built {d} ({layers} layers, {fmt}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


_READ_BUF = None


def read_probe(kernels, threads, nbytes):
    """Streaming-read bandwidth (bytes/s) over the first nbytes of a 1 GiB buffer."""
    buf = _read_buf()
    nbytes = min(nbytes, buf.nbytes)
    return nbytes / kernels.read_seconds(buf.ctypes.data, nbytes, threads)


def _read_buf():
    global _READ_BUF
    if _READ_BUF is None:
        _READ_BUF = np.ones(1 << 30, dtype=np.uint8)           # 1 GiB: far beyond L3
    return _READ_BUF


def machine(kernels, threads):
    """(read bytes/s, BF16 dot peak flop/s), best of 3: the machine is shared."""
    buf = _read_buf()
    read = max(buf.nbytes / kernels.read_seconds(buf.ctypes.data, buf.nbytes, threads)
               for _ in range(3))
    peak = max(kernels.peak_flops(2_000_000, threads) for _ in range(3))
    return read, peak


def engine(model_dir, fast, **kwargs):
    """LLM with the CPU kernels (experts + dense linears) or the torch reference
    (what MOED_EXPERTS=torch MOED_LINEARS=torch selects)."""
    from moed import LLM
    choice = "cpu" if fast else "torch"
    llm = LLM(str(model_dir), device="cpu", experts=choice, linears=choice, **kwargs)
    print(f"  {'engine' if fast else 'torch'}: experts {llm.model_info['experts']}, linears "
          f"{llm.engine.backends.linears}", flush=True)
    return llm


class StepClock:
    """Per engine step: wall seconds, whether every sequence decoded one token, and
    the seconds inside the weight kernels (dense linears, routers, routed experts; CPU or
    torch path) and inside attention proper (`attend`: scores, softmax, values),
    plus the bytes of the distinct routed experts the step read.

    `after_step(step dict)`, if given, runs after each step outside its clock: the
    decode benchmark puts a read probe there, so that every step has a bandwidth
    figure taken the moment after it (the free bandwidth of a shared machine moves
    within seconds)."""

    def __init__(self, after_step=None):
        self.steps = []              # [dict(wall, decode, kernels, attention, stack, expert_bytes)]
        self.after_step = after_step
        self._cur = None
        self._patched = []

    def __enter__(self):
        from moed.engine.llm_engine import LLMEngine
        from moed.engine.model_runner import ModelRunner
        from moed.backends.cpu.linears import CPULinear
        from moed.backends.cpu.experts import CPUExpertLayer
        from moed.model.attention import GQAttention
        from moed.model.layers import Linear
        from moed.backends.cpu.glue import CPUSoftmaxRouter
        from moed.model.moe import TorchExperts
        # a compiled router call is mostly its FP32 weight read (the torch path's
        # router is a Linear, counted here too); its softmax/top-k rides along
        for cls, name in ((CPULinear, "__call__"), (Linear, "__call__"),
                          (CPUExpertLayer, "forward"), (TorchExperts, "forward"),
                          (CPUSoftmaxRouter, "__call__")):
            self._wrap(cls, name, "kernels")
        self._wrap(GQAttention, "attend", "attention")
        self._wrap_stack()
        self._wrap_step(LLMEngine, ModelRunner)
        return self

    def __exit__(self, *exc):
        for cls, name, fn in reversed(self._patched):
            setattr(cls, name, fn)
        self._patched = []

    def decode_steps(self):
        return [s for s in self.steps if s["decode"]]

    def _wrap(self, cls, name, bucket):
        fn = getattr(cls, name)
        clock = self

        def timed(obj, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(obj, *args, **kwargs)
            cur = clock._cur
            if cur is not None:
                cur[bucket] += time.perf_counter() - t0
                if name == "forward":      # routed experts: counted after the step's clock
                    cur["routed"].append((obj, args[1]))
            return out
        self._patched.append((cls, name, fn))
        setattr(cls, name, timed)

    def _wrap_stack(self):
        """The decode stack (moed.backends.cpu.decode_stack): every layer's kernels, attention
        and glue in one compiled call, timed as "stack"; its routed experts counted from
        the expert ids it keeps per layer."""
        from moed.backends.cpu.decode_stack import DecodeStack
        fn, clock = DecodeStack.__call__, self

        def timed(stack, *args):
            t0 = time.perf_counter()
            out = fn(stack, *args)
            cur = clock._cur
            if cur is not None:
                cur["stack"] += time.perf_counter() - t0
                if out is not None:
                    layers = stack.model.layers[stack.first:]
                    cur["routed"] += [(layer.mlp.experts, ids)
                                      for layer, ids in zip(layers, stack.routed)]
            return out
        self._patched.append((DecodeStack, "__call__", fn))
        DecodeStack.__call__ = timed

    def _wrap_step(self, engine_cls, runner_cls):
        step, run = engine_cls.step, runner_cls.run
        clock = self

        def timed_step(eng):
            clock._cur = dict(wall=0.0, decode=False, kernels=0.0, attention=0.0, stack=0.0,
                              routed=[])
            t0 = time.perf_counter()
            out = step(eng)
            cur = clock._cur
            cur["wall"] = time.perf_counter() - t0
            cur["expert_bytes"] = sum(len(ids.unique()) * expert_bytes(experts)
                                      for experts, ids in cur.pop("routed"))
            clock.steps.append(cur)
            clock._cur = None
            if clock.after_step is not None:
                clock.after_step(clock.steps[-1])
            return out

        def noted_run(runner, chunks, *args, **kwargs):
            if clock._cur is not None:
                clock._cur["decode"] = all(n == 1 for _, n in chunks)
            return run(runner, chunks, *args, **kwargs)
        self._patched += [(engine_cls, "step", step), (runner_cls, "run", run)]
        engine_cls.step, runner_cls.run = timed_step, noted_run


def expert_bytes(experts):
    """Bytes one routed expert's three matrices occupy (what a token reads per expert)."""
    if hasattr(experts, "packed"):
        return experts.packed.expert_bytes()
    ws = (experts.gate[0], experts.up[0], experts.down[0])
    return sum(w.data.nbytes + (0 if w.scale_inv is None else w.scale_inv.nbytes) for w in ws)


def dense_bytes(model):
    """Bytes of every packed dense matrix a step reads once (CPU path), and of the torch
    Linears left (routers). A fused matrix (q/k/v, gate/up) and its parts' row views
    share memory: each byte is counted once."""
    from moed.backends.cpu.linears import CPULinear
    from moed.backends.cpu.glue import CPUGateLogits
    from moed.model.layers import Linear
    spans, torch_ = [], 0
    seen = set()

    def visit(obj):
        nonlocal torch_
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, CPUGateLogits):           # the compiled gates read their own copy
            torch_ += obj.weight.nbytes
        elif isinstance(obj, CPULinear):
            for a in (obj.packed.units, obj.packed.scales):
                spans.append((a.ctypes.data, a.ctypes.data + a.nbytes))
        elif isinstance(obj, Linear):
            torch_ += obj.weight.data.nbytes + (0 if obj.weight.scale_inv is None
                                                else obj.weight.scale_inv.nbytes)
        elif type(obj).__module__.startswith("moed.") and hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                if k not in ("experts", "rotary", "packed"):
                    visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
    for layer in model.layers:
        visit(layer)
    visit(model.lm_head)
    cpu, end = 0, 0
    for a, b in sorted(spans):                 # union of the byte ranges
        cpu += max(0, b - max(a, end))
        end = max(end, b)
    return cpu, torch_


def env_threads():
    return int(os.environ.get("MOED_THREADS") or len(os.sched_getaffinity(0)))


def add_model_args(ap):
    """The options every model benchmark takes."""
    ap.add_argument("--layers", type=int, default=12,
                    help="decoder layers (12: as many as fit; see bench_decode.py)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--fmt", default="fp8", choices=sorted(FORMATS),
                    help="weights: fp8 (as Qwen publishes) or int4 (group 32)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads for what stays in torch (default: torch's)")


def model_setup(args):
    """Thread settings, cache dir and the Qwen3-30B-shaped model for a benchmark run.
    -> (tempdir kept alive by the caller, model dir, kernels, threads, threads line)."""
    import tempfile

    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault("MOED_CACHE_DIR", os.path.join(args.model_dir or tmp.name, "cache"))
    model = qwen3_30b_shaped(args.model_dir or os.path.join(tmp.name, "model"), args.layers,
                             args.fmt)
    from moed.backends.cpu.isa import load_kernels
    kernels, threads = load_kernels(), env_threads()
    line = (f"isa={kernels.ISA}, {threads} threads (torch {torch.get_num_threads()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    return tmp, model, kernels, threads, line
