"""The prefill planner: measured machine constants + a cost model -> how a prompt is
prefilled (which path, in chunks of how many tokens).

    constants = MachineConstants.load()          # measured once per machine, cached
    planner = PrefillPlanner(constants, ModelShape.of(model))
    plan = planner.plan(num_prompt_tokens)       # PrefillPlan(path, chunk, predicted_s)

Paths (DESIGN.md section 3): `cpu` (CPU-expert prefill, in chunks), `slp` (stream
the experts over PCIe to one GPU), `dslp` (each of several GPUs streams its share).
The GPU paths are candidates only when their constants (pinned host-to-device
bytes/s, GPU GEMM flop/s) are measured; on a CPU-only machine the planner chooses
the chunk size of the CPU path.

A plan depends on the prompt's length and the settings alone, never on the load:
with `deterministic: true` a request takes the same path however busy the engine
is, so its greedy output repeats. (Chunking never moves a logit on the CPU: its
kernels are batch-invariant.)
"""
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moed.errors import ConfigError

log = logging.getLogger("moed.planner")

VERSION = 1                            # of the cache file's fields
CHUNKS = (256, 512, 1024, 2048, 4096)  # candidate prefill chunk sizes, tokens
SLP_CHUNKS = (1024, 2048, 4096, 8192, 16384, 32768)   # the GPU paths' (device memory permitting)
PATHS = ("auto", "cpu", "slp", "dslp")
# The smallest chunk predicted within this of the fastest wins: a smaller chunk holds
# less activation memory and lets an arriving decode in sooner.
TOLERANCE = 0.03
ACTIVATION_BUDGET = 1 << 30            # bytes a chunk's activations may take
# What the kernels reach of the probes' figures (tools/bench_prefill.py, Qwen3-30B
# shape, FP8, avx512: ~60% of the BF16 dot peak at 256 tokens per expert; attention
# ~35%). The GEMM's register tiles fill with tokens per expert: half of its best at
# GEMM_HALF_TOKENS tokens per expert.
GEMM_EFFICIENCY = 0.6
GEMM_HALF_TOKENS = 8.0
ATTENTION_EFFICIENCY = 0.35
READ_EFFICIENCY = 0.8                  # of the streaming-read probe, for weight tiles
STEP_OVERHEAD_S = 2e-3                 # a step's fixed cost (scheduling, inputs, sampling)
# Sane ranges of the measured figures; outside them a figure is treated as missing.
READ_RANGE = (1e8, 1e13)               # bytes/s
FLOPS_RANGE = (1e9, 1e16)              # flop/s
# Used when a probe cannot run (no compiled kernels) or returns nonsense: a small
# machine's figures, so the plan errs towards the CPU path's default chunking.
DEFAULT_READ_BPS = 10e9
DEFAULT_CPU_FLOPS = 100e9


def _sane(value, lo_hi):
    lo, hi = lo_hi
    return value if isinstance(value, (int, float)) and math.isfinite(value) and \
        lo <= value <= hi else None


@dataclass(frozen=True)
class MachineConstants:
    """What the cost model knows of the machine. None: not measured (absent or absurd)."""
    cpu: str = ""                      # CPU model name
    threads: int = 1                   # kernel threads the figures were measured on
    cpu_read_bps: float = None         # streaming read, bytes/s (kernels' read probe)
    cpu_flops: float = None            # BF16 dot-product peak, flop/s (kernels' peak probe)
    h2d_bps: float = None              # pinned host -> GPU copy, bytes/s (GPU path: later)
    gpu_flops: float = None            # GPU BF16 GEMM, flop/s (GPU path: later)
    num_gpus: int = 0
    load_avg: float = None             # the 1-minute load average when measured
    source: str = "default"            # measured | cache | default

    def __post_init__(self):
        for name, rng in (("cpu_read_bps", READ_RANGE), ("cpu_flops", FLOPS_RANGE),
                          ("h2d_bps", READ_RANGE), ("gpu_flops", FLOPS_RANGE)):
            object.__setattr__(self, name, _sane(getattr(self, name), rng))
        if not isinstance(self.num_gpus, int) or self.num_gpus < 0:
            object.__setattr__(self, "num_gpus", 0)

    @property
    def read_bps(self):
        return self.cpu_read_bps or DEFAULT_READ_BPS

    @property
    def flops(self):
        return self.cpu_flops or DEFAULT_CPU_FLOPS

    @property
    def has_gpu(self):
        return self.num_gpus > 0 and self.h2d_bps is not None and self.gpu_flops is not None

    @classmethod
    def load(cls, threads=None, cache_dir=None, kernels=None):
        """This machine's constants: from the cache file keyed by CPU model and thread
        count, else measured (< 1 s) and cached. Never raises: what cannot be measured
        is None (the cost model then uses DEFAULT_*)."""
        from moed.backends.cpu.runtime import default_threads
        threads = threads or default_threads()
        cpu = cpu_model()
        path = cache_file(cpu, threads, cache_dir)
        cached = _read_cache(path)
        if cached is not None:
            consts = cls(**dict(cached, source="cache"))
            if not consts.measured_busy():
                return consts
            # measured on a busy machine (low figures, cached for good): once the machine
            # is quieter, measure again and keep the better of each figure
            fresh = measure(threads, kernels)
            best = lambda a, b: max((x for x in (a, b) if x is not None),  # noqa: E731
                                    default=None)
            consts = cls(cpu=consts.cpu, threads=threads, source="measured",
                         cpu_read_bps=best(consts.cpu_read_bps, fresh.cpu_read_bps),
                         cpu_flops=best(consts.cpu_flops, fresh.cpu_flops),
                         load_avg=fresh.load_avg)
            if consts.cpu_read_bps and consts.cpu_flops:
                _write_cache(path, consts)
            return consts
        consts = measure(threads, kernels)
        if consts.cpu_read_bps and consts.cpu_flops:     # an absurd figure: measure again
            _write_cache(path, consts)
        return consts

    def measured_busy(self):
        """Whether these figures were measured while other work held the CPUs (load
        average above BUSY_LOAD per thread) and the machine is quieter now."""
        if self.load_avg is None:
            return False
        now = load_average()
        return self.load_avg > BUSY_LOAD * self.threads and now is not None and \
            now < self.load_avg / 2

    def summary(self):
        g = lambda x, unit: "n/a" if x is None else f"{x / 1e9:.0f} {unit}"  # noqa: E731
        gpu = (f"; {self.num_gpus} GPU: h2d {g(self.h2d_bps, 'GB/s')}, "
               f"{g(self.gpu_flops, 'GFLOP/s')}") if self.num_gpus else "; no GPU"
        return (f"cpu read {g(self.cpu_read_bps, 'GB/s')}, {g(self.cpu_flops, 'GFLOP/s')} "
                f"on {self.threads} threads ({self.source}){gpu}")


BUSY_LOAD = 0.5              # load average per thread above which a probe reads low


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_file(cpu, threads, cache_dir=None):
    base = Path(cache_dir or os.environ.get("MOED_CACHE_DIR") or Path.home() / ".cache" / "moed")
    key = hashlib.sha256(f"v{VERSION}\0{cpu}\0{threads}".encode()).hexdigest()[:16]
    return base / "planner" / f"machine-{key}.json"


def _read_cache(path):
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    names = set(MachineConstants.__dataclass_fields__) - {"source"}
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return None
    return {k: v for k, v in doc.items() if k in names}


def _write_cache(path, consts):
    doc = dict(asdict(consts), version=VERSION)
    doc.pop("source")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    except OSError as e:             # a read-only cache dir: measure again next start
        log.warning("planner: cannot cache the machine's constants in %s: %s", path, e)


PROBE_BYTES = 64 << 20                 # beyond most L3s; filling it is most of the probe's time
# peak loop: ~20-60 ms a pass (shorter passes read high and scatter on a shared
# 2-core VM: 200k iterations gave 12..330 GFLOP/s, 5M a steady figure)
PROBE_ITERS = 5_000_000


def measure(threads, kernels=None):
    """Probe the CPU with the kernels' own loops: best of a few short passes."""
    try:
        import numpy as np
        if kernels is None:
            from moed.backends.cpu.isa import load_kernels
            kernels = load_kernels()
        t0 = time.perf_counter()
        buf = np.ones(PROBE_BYTES, dtype=np.uint8)
        read = max(PROBE_BYTES / kernels.read_seconds(buf.ctypes.data, PROBE_BYTES, threads)
                   for _ in range(3))
        peak = max(kernels.peak_flops(PROBE_ITERS, threads) for _ in range(3))
        log.info("planner: measured the CPU in %.2f s", time.perf_counter() - t0)
    except Exception as e:           # no compiled kernels, or a probe failed
        log.warning("planner: cannot measure the CPU (%s): default constants", e)
        return MachineConstants(cpu=cpu_model(), threads=threads)
    return MachineConstants(cpu=cpu_model(), threads=threads, cpu_read_bps=read,
                            cpu_flops=peak, load_avg=load_average(), source="measured")


@dataclass(frozen=True)
class ModelShape:
    """Per-layer figures of a model that the cost model needs (from its config)."""
    layers: int
    hidden: int                        # D
    dense_params: int                  # per layer: attention projections, router, dense MLP
    experts: int = 0                   # E routed experts per MoE layer (0: a dense model)
    active: int = 0                    # A experts per token
    expert_params: int = 0             # one routed expert's three matrices
    moe_layers: int = 0
    attention_flops: int = 0           # per layer and causal (query, key) pair
    weight_bytes: float = 1.0          # bytes per weight (FP8 1, BF16 2)

    @classmethod
    def of(cls, model):
        c, D = model.cfg, model.hidden_size
        get = lambda *names, default=None: next(  # noqa: E731
            (c.raw[n] for n in names if isinstance(c.raw.get(n), int)), default)
        H = get("num_attention_heads", default=1)
        KV = get("num_key_value_heads", default=H)
        d = get("head_dim", "qk_head_dim", default=D // H)
        E = get("num_experts", "num_local_experts", "n_routed_experts", default=0)
        A = get("num_experts_per_tok", default=0)
        inter = get("moe_intermediate_size", "intermediate_size", default=4 * D)
        moe = len(model.moe_layers())
        rank = get("kv_lora_rank")
        if rank:                     # MLA (DeepSeek): low-rank q and kv projections
            dn, dr = get("qk_nope_head_dim", default=128), get("qk_rope_head_dim", default=64)
            dv, q_rank = get("v_head_dim", default=128), get("q_lora_rank")
            q = (D * q_rank + q_rank * H * (dn + dr)) if q_rank else D * H * (dn + dr)
            attn = q + D * (rank + dr) + rank * H * (dn + dv) + H * dv * D
            pair = 2 * H * (dn + dr) + 2 * H * dv      # q.k and p.v per (query, key) pair
        else:
            attn = (2 * H * d + 2 * KV * d) * D
            pair = 4 * H * d
        # shared experts (DeepSeek's n_shared_experts, Qwen2-MoE's one) run every token
        shared = 3 * D * (get("n_shared_experts", default=0) * inter +
                          get("shared_expert_intermediate_size", default=0))
        dense_mlp = 3 * D * get("intermediate_size", default=inter)
        dense = attn + (E * D + shared) * (moe > 0) + \
            dense_mlp * (model.num_layers - moe) // max(1, model.num_layers)
        quant = "quantization_config" in c.raw
        return cls(layers=model.num_layers, hidden=D, dense_params=dense, experts=E, active=A,
                   expert_params=3 * D * inter, moe_layers=moe, attention_flops=pair,
                   weight_bytes=1.0 if quant else 2.0)

    def activation_bytes(self, tokens):
        """Float32 activations a chunk holds at once (hidden states, q/k/v, the experts'
        intermediate rows of every active expert), with slack."""
        per_token = 4 * (8 * self.hidden + 3 * self.active * self.expert_params // (3 * self.hidden or 1))
        return 2 * tokens * per_token


@dataclass(frozen=True)
class PrefillPlan:
    path: str                          # cpu | slp | dslp
    chunk: int                         # tokens per prefill step when no decode is running
    predicted_s: float                 # the cost model's prefill time
    reason: str = ""                   # auto | override | max_num_batched_tokens
    costs: dict = field(default_factory=dict, compare=False)   # (path, chunk) -> seconds

    def summary(self):
        return f"{self.path} chunks of {self.chunk} ({self.reason}, ~{self.predicted_s:.2f} s)"


class PrefillPlanner:
    """Chooses a prompt's prefill path and chunk size by the cost model below.

    `override`: "auto", or a chunk size in tokens (engine.prefill_chunk) that every
    prefill step without a decode takes. `min_chunk`: the step budget with decodes
    running (max_num_batched_tokens); the planner never chooses smaller. `path`:
    "auto", or the path every prompt takes (engine.prefill_path:
    cpu | slp | dslp; a GPU path needs the hybrid engine). `slp_chunks`: the chunk
    sizes device memory allows the GPU paths (the largest is best: the experts cross
    PCIe once per chunk)."""

    def __init__(self, constants, shape, override="auto", min_chunk=CHUNKS[0], path="auto",
                 slp_chunks=SLP_CHUNKS):
        if path not in PATHS:
            raise ConfigError(f"prefill_path must be one of {', '.join(PATHS)}, got {path!r}",
                              field="prefill_path")
        self.constants, self.shape = constants, shape
        self.override, self.min_chunk, self.path = override, min_chunk, path
        fits = [c for c in CHUNKS if shape.activation_bytes(c) <= ACTIVATION_BUDGET]
        self.chunks = sorted({min_chunk, *[c for c in fits if c > min_chunk]})
        self.slp_chunks = sorted({min_chunk, *[c for c in slp_chunks if c > min_chunk]})

    # -- the cost model
    def cpu_chunk_s(self, start, n):
        """Seconds of one CPU-path prefill step: tokens start..start+n-1 of a prompt.
        Per layer the weights are read once per chunk (every expert the chunk's tokens
        touch) and overlap the GEMM; attention grows with the context."""
        s, k = self.shape, self.constants
        touched = s.experts * (1 - (1 - s.active / s.experts) ** n) if s.experts else 0
        per_expert = n * s.active / s.experts if s.experts else n
        gemm = k.flops * GEMM_EFFICIENCY * per_expert / (per_expert + GEMM_HALF_TOKENS)
        dense = max(s.dense_params * s.weight_bytes / (k.read_bps * READ_EFFICIENCY),
                    2 * n * s.dense_params / (k.flops * GEMM_EFFICIENCY))
        experts = max(touched * s.expert_params * s.weight_bytes / (k.read_bps * READ_EFFICIENCY),
                      2 * n * s.active * s.expert_params / gemm) if s.experts else 0.0
        attention = s.attention_flops * n * (start + (n + 1) / 2) / (k.flops * ATTENTION_EFFICIENCY)
        return STEP_OVERHEAD_S + s.layers * (dense + attention) + s.moe_layers * experts

    def cpu_s(self, tokens, chunk):
        return sum(self.cpu_chunk_s(a, min(chunk, tokens - a)) for a in range(0, tokens, chunk))

    def slp_s(self, tokens, chunk, gpus=1):
        """SLP (gpus=1) or DSLP: per chunk and layer, max(the layer's experts (each GPU's
        share) over PCIe, the layer's compute on the GPUs). Only with GPU constants."""
        s, k = self.shape, self.constants
        if not k.has_gpu:
            return math.inf
        total = 0.0
        for a in range(0, tokens, chunk):
            n = min(chunk, tokens - a)
            load = s.experts * s.expert_params * s.weight_bytes / gpus / k.h2d_bps
            flops = 2 * n * (s.dense_params + s.active * s.expert_params) + \
                s.attention_flops * n * (a + (n + 1) / 2)
            total += STEP_OVERHEAD_S + s.layers * max(load, flops / gpus / k.gpu_flops)
        return total

    def costs(self, tokens):
        """{(path, chunk): predicted seconds} of every candidate for a prompt (a GPU
        path forced without GPU constants: infinite, it cannot be predicted)."""
        useful = lambda cs: [c for c in cs if c == cs[0] or c // 2 < tokens]  # noqa: E731
        out = {("cpu", c): self.cpu_s(tokens, c) for c in useful(self.chunks)}
        gpus = self.constants.num_gpus
        if self.constants.has_gpu or self.path == "slp":
            out.update({("slp", c): self.slp_s(tokens, c) for c in useful(self.slp_chunks)})
        if (self.constants.has_gpu and gpus > 1) or self.path == "dslp":
            out.update({("dslp", c): self.slp_s(tokens, c, max(2, gpus))
                        for c in useful(self.slp_chunks)})
        return out

    # -- the choice
    def plan(self, tokens):
        """The plan of a `tokens`-token prompt: a function of the length and the settings
        alone (never of the load)."""
        costs = self.costs(tokens)
        forced = self.path if self.path != "auto" else None
        if self.override != "auto":
            chunk = int(self.override)
            path = forced or "cpu"
            cost = self.cpu_s(tokens, chunk) if path == "cpu" else \
                self.slp_s(tokens, chunk, 1 if path == "slp" else max(2, self.constants.num_gpus))
            return PrefillPlan(path, chunk, cost, "override", costs)
        if forced:
            mine = {key: t for key, t in costs.items() if key[0] == forced}
            best = min(mine.values())
            if not math.isfinite(best):         # no GPU figures: the largest chunk
                key = max(mine)
            else:
                key = min((k for k, t in mine.items() if t <= best * (1 + TOLERANCE)),
                          key=lambda k: (k[1], mine[k]))
            return PrefillPlan(forced, key[1], mine[key], "override", costs)
        best = min(costs.values())
        path, chunk = min((key for key, t in costs.items() if t <= best * (1 + TOLERANCE)),
                          key=lambda key: (key[1], costs[key]))
        return PrefillPlan(path, chunk, costs[(path, chunk)], "auto", costs)

    def crossover(self, limit=1 << 17):
        """Smallest prompt length (tokens, a power of two) whose plan leaves the CPU, or None."""
        n = CHUNKS[0]
        while n <= limit:
            if self.plan(n).path != "cpu":
                return n
            n *= 2
        return None

    def summary(self):
        plans = [(t, self.plan(t)) for t in (512, 4096, 32768)]
        sample = ", ".join(f"{t}: {p.path} {p.chunk}" for t, p in plans)
        cross = self.crossover() if self.constants.has_gpu and self.path == "auto" else None
        return (f"{self.constants.summary()}; path {self.path}, chunk "
                f"{'auto' if self.override == 'auto' else self.override} (prompt tokens: "
                f"path and chunk {sample}"
                + (f"; GPU prefill from {cross} tokens" if cross else "") + ")")


def slp_chunks(shape, free_bytes):
    """The GPU paths' chunk sizes whose activations fit a quarter of free device memory
    (the smallest when none does)."""
    return [c for c in SLP_CHUNKS if shape.activation_bytes(c) <= free_bytes // 4] \
        or list(SLP_CHUNKS[:1])


# -- the GPU's constants (measured at every start: a machine's GPUs can change)
H2D_PROBE_BYTES = 256 << 20
GEMM_PROBE = 8192                      # a square BF16 GEMM's side


def measure_gpu(device):
    """(pinned host -> device bytes/s, BF16 GEMM flop/s, free device bytes) of one CUDA
    device, best of three short passes; (None, None, 0) when a probe fails."""
    import torch
    try:
        src = torch.empty(H2D_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(H2D_PROBE_BYTES, dtype=torch.uint8, device=device)
        a = torch.randn(GEMM_PROBE, GEMM_PROBE, device=device, dtype=torch.bfloat16)
        b = torch.randn(GEMM_PROBE, GEMM_PROBE, device=device, dtype=torch.bfloat16)

        def best(fn):
            fn()
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return min(times)
        h2d = H2D_PROBE_BYTES / best(lambda: dst.copy_(src, non_blocking=True))
        flops = 2 * GEMM_PROBE ** 3 / best(lambda: a @ b)
        src = dst = a = b = None          # the probes' buffers back before counting free memory
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return h2d, flops, free
    except Exception as e:           # a failed probe: the GPU paths are not predicted
        log.warning("planner: cannot measure the GPU (%s)", e)
        return None, None, 0


def with_gpu(constants, device):
    """constants with the GPU's figures measured now -> (constants, free device bytes),
    for one GPU; the engine sets num_gpus to the DSLP group's ranks when it runs one
    (moed.backends.accel.dslp), each rank streaming its share over its own link."""
    import dataclasses

    h2d, flops, free = measure_gpu(device)
    consts = dataclasses.replace(constants, h2d_bps=h2d, gpu_flops=flops, num_gpus=1)
    log.info("planner: GPU h2d %s, BF16 GEMM %s, %.1f GiB free",
             "n/a" if h2d is None else f"{h2d / 1e9:.1f} GB/s",
             "n/a" if flops is None else f"{flops / 1e12:.0f} TFLOP/s", free / 2 ** 30)
    return consts, free


# -- dual-batch overlap
DUAL_BATCH = ("auto", "on", "off")
# auto: on when the overlap would hide at least this share of a step (the smaller of
# its device time and its CPU-expert time, at the goal's 80% hidden)
DBO_MIN_GAIN = 0.10
DBO_EMA = 0.2                          # weight of a new step's time in the averages


class DualBatchPolicy:
    """Whether a decode step runs as two micro-batches (ModelRunner.run_dual).

    "on": every step of two or more decodes; "off": never; "auto": from the measured
    times of single-batch decode steps (device time = step - CPU experts), on when the
    overlap would hide DBO_MIN_GAIN of the step, and off again while measured dual steps
    are slower per token than single ones. `overlap`: False where the device is the CPU
    (nothing can overlap: auto stays off)."""

    def __init__(self, mode="auto", overlap=True):
        if mode not in DUAL_BATCH:
            raise ConfigError(f"dual_batch must be one of {', '.join(DUAL_BATCH)}, got "
                              f"{mode!r}", field="dual_batch")
        self.mode, self.overlap = mode, overlap
        self.single = None             # (step s per token, cpu-expert s per token), EMA
        self.dual = None               # step s per token of dual steps, EMA
        self.steps = 0                 # decode steps observed
        self.dual_steps = 0            # of which run as two micro-batches

    def use(self, chunks):
        if len(chunks) < 2 or any(n != 1 for _, n in chunks) or self.mode == "off":
            return False
        if self.mode == "on":
            return True
        if not self.overlap or self.single is None:
            return False
        step, cpu = self.single
        gain = 0.8 * min(cpu, step - cpu) / step
        if self.dual is not None and self.dual > step:
            # measured slower: try single steps again now and then (every 64th step)
            return self.steps % 64 == 0
        return gain >= DBO_MIN_GAIN

    def observe(self, batch, dual, step_s, cpu_s):
        """A decode step of `batch` sequences took step_s, cpu_s of it in CPU experts."""
        self.steps += 1
        per = step_s / batch
        if dual:
            self.dual_steps += 1
            self.dual = per if self.dual is None else (1 - DBO_EMA) * self.dual + DBO_EMA * per
        else:
            cur = (per, min(cpu_s, step_s) / batch)
            self.single = cur if self.single is None else tuple(
                (1 - DBO_EMA) * a + DBO_EMA * b for a, b in zip(self.single, cur))

    def summary(self):
        if self.single is None:
            return f"dual batch {self.mode}"
        step, cpu = self.single
        return (f"dual batch {self.mode}: decode step {step * 1e3:.2f} ms/token, "
                f"{100 * cpu / step:.0f}% in CPU experts")


# -- the decode steps' token budget from a TPOT target
TPOT_MIN_PREFILL = 16        # prompt tokens a step with decodes takes at least (progress)
TPOT_EMA = 0.2


class TPOTBudget:
    """Tokens of a step with decodes running, so that the step stays within the time
    per output token the deployment targets (engine.tpot_target_ms).

    From measured steps: a = a decode-only step's time (EMA), b = the time each prompt
    token adds (EMA over steps that carry at least TPOT_MIN_PREFILL prompt tokens,
    seeded by the cost model's figure). The budget is decodes + (target - a) / b prompt
    tokens, at least TPOT_MIN_PREFILL, at most max_tokens. On the CPU this moves no
    logit (the kernels give the same bits in any chunking)."""

    def __init__(self, target_s, max_tokens, per_token_s):
        if isinstance(target_s, bool) or not (isinstance(target_s, (int, float)) and
                                              math.isfinite(target_s) and target_s > 0):
            raise ConfigError(f"tpot_target_ms must be > 0, got {target_s!r}",
                              field="tpot_target_ms")
        self.target_s, self.max_tokens = float(target_s), max_tokens
        self.decode_s = None               # a
        self.per_token_s = per_token_s     # b

    @classmethod
    def from_ms(cls, target_ms, max_tokens, per_token_s):
        """From engine.tpot_target_ms (ConfigError for anything but a positive number)."""
        ok = isinstance(target_ms, (int, float)) and not isinstance(target_ms, bool)
        return cls(target_ms / 1e3 if ok else target_ms, max_tokens, per_token_s)

    def budget(self, decodes):
        if self.decode_s is None or self.per_token_s <= 0:     # not measured: cautious
            return min(decodes + TPOT_MIN_PREFILL, self.max_tokens)
        room = (self.target_s - self.decode_s) / self.per_token_s
        prefill = int(min(max(room, TPOT_MIN_PREFILL), self.max_tokens - decodes))
        return decodes + max(prefill, 0)

    def observe(self, decodes, prefill_tokens, step_s):
        if decodes == 0:
            return
        if prefill_tokens == 0:
            self.decode_s = step_s if self.decode_s is None else \
                (1 - TPOT_EMA) * self.decode_s + TPOT_EMA * step_s
        elif self.decode_s is None:        # only mixed steps so far: a from the seed's b
            self.decode_s = max(step_s - self.per_token_s * prefill_tokens, 0.0)
        elif prefill_tokens >= TPOT_MIN_PREFILL:
            b = max(step_s - self.decode_s, 0.0) / prefill_tokens
            self.per_token_s = (1 - TPOT_EMA) * self.per_token_s + TPOT_EMA * b

    def summary(self):
        base = f"TPOT target {self.target_s * 1e3:.0f} ms"
        if self.decode_s is None:
            return base + " (not measured yet)"
        return (f"{base}: decode step {self.decode_s * 1e3:.1f} ms, "
                f"{self.per_token_s * 1e3:.2f} ms a prompt token")


# -- the CPUs of the decode steps and of the prefill worker
DECODE_READ_SHARE = 0.9      # decoding keeps the fewest CPUs that read this much of all


def decode_cpus(read_bps, total):
    """How many of `total` CPUs the decode steps keep while the prefill worker runs:
    decode is bound by the memory's read rate and prefill by compute, so the decode
    steps get the fewest CPUs whose streaming read reaches DECODE_READ_SHARE of all the
    CPUs' (read_bps(k): bytes/s on k threads), and the worker every other one; at least
    one each. Falls back to half when a probe fails."""
    if total < 2:
        raise ConfigError("a prefill worker needs at least 2 CPUs (one for decoding)",
                          field="prefill_worker")
    if total == 2:
        return 1
    try:
        full = read_bps(total)
        lo, hi = 1, total - 1              # the smallest k with read(k) >= share * full
        while lo < hi:
            mid = (lo + hi) // 2
            if read_bps(mid) >= DECODE_READ_SHARE * full:
                hi = mid
            else:
                lo = mid + 1
        return lo
    except Exception as e:                 # noqa: BLE001 - a probe failed: half
        log.warning("planner: cannot measure the read rate per CPU count (%s): half", e)
        return total - max(1, total // 2)


def read_probe(kernels=None):
    """read_bps(k): the kernels' streaming read on k threads, bytes/s (best of 3)."""
    import numpy as np
    if kernels is None:
        from moed.backends.cpu.isa import load_kernels
        kernels = load_kernels()
    buf = np.ones(PROBE_BYTES, dtype=np.uint8)
    return lambda k: max(PROBE_BYTES / kernels.read_seconds(buf.ctypes.data, PROBE_BYTES, k)
                         for _ in range(3))
