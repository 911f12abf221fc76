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

log = logging.getLogger("moed.planner")

VERSION = 1                            # of the cache file's fields
CHUNKS = (256, 512, 1024, 2048, 4096)  # candidate prefill chunk sizes, tokens
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
            return cls(**dict(cached, source="cache"))
        consts = measure(threads, kernels)
        if consts.cpu_read_bps and consts.cpu_flops:     # an absurd figure: measure again
            _write_cache(path, consts)
        return consts

    def summary(self):
        g = lambda x, unit: "n/a" if x is None else f"{x / 1e9:.0f} {unit}"  # noqa: E731
        gpu = (f"; {self.num_gpus} GPU: h2d {g(self.h2d_bps, 'GB/s')}, "
               f"{g(self.gpu_flops, 'GFLOP/s')}") if self.num_gpus else "; no GPU"
        return (f"cpu read {g(self.cpu_read_bps, 'GB/s')}, {g(self.cpu_flops, 'GFLOP/s')} "
                f"on {self.threads} threads ({self.source}){gpu}")


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
                            cpu_flops=peak, source="measured")


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
        attn = (2 * H * d + 2 * KV * d) * D
        dense_mlp = 3 * D * get("intermediate_size", default=inter)
        dense = attn + E * D + dense_mlp * (model.num_layers - moe) // max(1, model.num_layers)
        quant = "quantization_config" in c.raw
        return cls(layers=model.num_layers, hidden=D, dense_params=dense, experts=E, active=A,
                   expert_params=3 * D * inter, moe_layers=moe, attention_flops=4 * H * d,
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
    running (max_num_batched_tokens); the planner never chooses smaller."""

    def __init__(self, constants, shape, override="auto", min_chunk=CHUNKS[0]):
        self.constants, self.shape = constants, shape
        self.override, self.min_chunk = override, min_chunk
        fits = [c for c in CHUNKS if shape.activation_bytes(c) <= ACTIVATION_BUDGET]
        self.chunks = sorted({min_chunk, *[c for c in fits if c > min_chunk]})

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
        """{(path, chunk): predicted seconds} of every candidate for a prompt."""
        out = {("cpu", c): self.cpu_s(tokens, c) for c in self.chunks
               if c == self.chunks[0] or c // 2 < tokens}       # larger ones: the same steps
        if self.constants.has_gpu:
            out.update({("slp", c): self.slp_s(tokens, c) for c in self.chunks})
            if self.constants.num_gpus > 1:
                out.update({("dslp", c): self.slp_s(tokens, c, self.constants.num_gpus)
                            for c in self.chunks})
        return out

    # -- the choice
    def plan(self, tokens):
        """The plan of a `tokens`-token prompt: a function of the length and the settings
        alone (never of the load)."""
        costs = self.costs(tokens)
        if self.override != "auto":
            chunk = int(self.override)
            return PrefillPlan("cpu", chunk, self.cpu_s(tokens, chunk), "override", costs)
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
        sample = ", ".join(f"{t}: {self.plan(t).chunk}" for t in (512, 4096))
        return (f"{self.constants.summary()}; chunk "
                f"{'auto' if self.override == 'auto' else self.override} (prompt tokens: "
                f"chunk {sample})")
