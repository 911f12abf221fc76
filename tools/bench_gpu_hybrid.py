"""The hybrid engine on Qwen3-30B-A3B and DeepSeek-V3 layer shapes, run by the engine's
ModelRunner: decode, stream-loading prefill (SLP) and dual-batch overlap.

    python tools/bench_gpu_hybrid.py [--device auto|cuda|cpu] [--layers 4] [--context 1024]

Each model is its own class built over a synthetic checkpoint in memory (random weights;
every layer reads layer 0's tensors and expert e expert e % 16's; nothing on disk),
every layer a MoE layer, then set up as moed.backends.accel.install sets it up: dense
linears as DeviceLinear, routed experts as HybridExperts over one CPUExpertLayer (16
experts packed, their rows copied to all E: values repeat, memory does not) and, for
DeepSeek-V3, one StreamedExperts (ring length "auto").

(a) decode, batch 1, over --context cached tokens (random KV values): tok/s of the few
    layers and projected to the full model; the step's shares: CPU experts
    (HostBridge.take_times), PCIe (one layer's bridge copies timed alone, times the
    layers) and the device (the rest: its work the CPU experts did not hide).
(b) SLP prefill of DeepSeek-V3 at 4K, 16K and 32K tokens in the planner's chunks, beside
    PrefillPlanner.slp_s over planner.measure_gpu's constants (goal: >= 90% of it), and
    the longest projected to 61 layers from its time per layer (goal: >= 2000 tok/s).
(c) dual-batch overlap at batch 2 and 4: tok/s against batch 1 and the same batch run
    single; the share it hides of min(device time, CPU-expert time) of its two
    micro-batches run as single steps one after the other (goal: >= 80%).

Times: medians over --reps steps after 3 warm-up steps, synchronized on CUDA. Without
CUDA, or with --device cpu, the same code runs over the CPU device (copies capped at
2 GB/s) on small shapes: a smoke run, whose figures are no GPU's.
"""
import argparse
import gc
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.hybrid import HostBridge, HybridExperts, StepRoute
from moed.backends.accel.install import Accel
from moed.backends.accel.linears import install_device_linears
from moed.backends.accel.ring import RingBudget
from moed.backends.accel.streamed_experts import StreamedExperts
from moed.backends.cpu.experts import CPUExpertLayer
from moed.backends.cpu.packed import PackedExperts
from moed.engine.kv_cache import blocks_for
from moed.engine.model_runner import ModelRunner
from moed.engine.planner import (SLP_CHUNKS, DualBatchPolicy, MachineConstants, ModelShape,
                                 PrefillPlanner, measure_gpu)
from moed.model.formats import FP8_DTYPE, QuantConfig, Weight, block_grid
from moed.model.registry import model_class

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
       "weight_block_size": [128, 128]}
DEEPSEEK_V3 = {     # as published, but every layer MoE
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "vocab_size": 129280,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 0, "moe_layer_freq": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "tie_word_embeddings": False, "quantization_config": FP8}
QWEN3_30B_A3B = {   # as published (BF16)
    "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "vocab_size": 151936,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "norm_topk_prob": True, "tie_word_embeddings": False}
TWIN = {            # the CPU twin's shapes: small, FP8 blocks kept
    "deepseek_v3": dict(hidden_size=256, vocab_size=1024, intermediate_size=512,
                        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=2, num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "qwen3": dict(hidden_size=256, vocab_size=1024, intermediate_size=512,
                  moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)}
FULL_LAYERS = {"qwen3": 48, "deepseek_v3": 61}
POOL = 1 << 24                 # float32 random values every tensor is cut from
DISTINCT_EXPERTS = 16
BLOCK = 16                     # KV cache block size (the engine's default)
TWIN_BANDWIDTH = 2e9           # the CPU device's copy cap, bytes/s (PCIe-like time)


class SyntheticCheckpoint:
    """What the model classes read of a checkpoint (moed.model.checkpoint.Checkpoint's
    config, dir, `in`, weight, tensor), made up on first request: linears N(0, 1/in)
    (FP8 with block scales where the config is quantized, routers and the LM head
    BF16), norms 1, correction biases 0. A name is normalised first (layers.<N>. ->
    layers.0., experts.<e>. -> experts.<e % 16>.), so memory holds one layer."""

    def __init__(self, config, seed=0):
        self.config, self.dir = config, Path("synthetic")
        self.quant = QuantConfig.from_hf(config)
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(2 * POOL, generator=self.gen)
        self.pools = {}                      # dtype -> the pool in it
        self.cache = {}                      # normalised name -> Weight or tensor

    def __contains__(self, name):
        return True                          # every tensor a model asks for is here

    def weight(self, prefix, out_features, in_features):
        return self.cached(prefix, (out_features, in_features), self.make_weight)

    def tensor(self, name, shape, dtypes=None):
        return self.cached(name, tuple(shape), self.make_tensor)

    def cached(self, name, shape, make):
        key = re.sub(r"experts\.(\d+)\.", lambda m: f"experts.{int(m[1]) % DISTINCT_EXPERTS}.",
                     re.sub(r"layers\.\d+\.", "layers.0.", name))
        if key not in self.cache:
            self.cache[key] = make(key, shape)
        got = self.cache[key]
        assert tuple(got.shape) == shape, (name, got.shape, shape)
        return got

    def make_weight(self, prefix, shape):
        std = shape[1] ** -0.5
        if self.quant is None or prefix.endswith(".mlp.gate") or prefix == "lm_head" or \
                any(m in prefix for m in self.quant.modules_to_not_convert):
            return Weight(self.values(shape, torch.bfloat16, std))
        block = self.quant.block_size
        return Weight(self.values(shape, FP8_DTYPE), torch.full(block_grid(shape, block), std),
                      block)

    def make_tensor(self, name, shape):
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(shape)
        if name.endswith("embed_tokens.weight"):
            return self.values(shape, torch.bfloat16)
        return torch.ones(shape, dtype=torch.bfloat16)          # norms

    def values(self, shape, dtype, scale=1.0):
        """N(0, scale^2) values in dtype, cut from the pool at a random offset."""
        if dtype not in self.pools:
            self.pools[dtype] = self.pool.to(dtype)
        out = torch.empty(shape, dtype=dtype)
        flat, start = out.view(-1), int(torch.randint(POOL, (1,), generator=self.gen))
        for a in range(0, flat.numel(), POOL):
            n = min(POOL, flat.numel() - a)
            if scale == 1.0:
                flat[a:a + n].copy_(self.pools[dtype][start:start + n])
            else:
                torch.mul(self.pool[start:start + n], scale, out=flat[a:a + n])
        return out


class Seq:
    """What ModelRunner reads of a sequence."""

    def __init__(self, ids, block_table, num_computed=0, prefill_plan=None):
        self.ids, self.block_table = ids, block_table
        self.num_computed, self.prefill_plan = num_computed, prefill_plan

    def tokens(self, start, end):
        return self.ids[start:end]


def cpu_layer(ref):
    """The CPU kernels' layer of a TorchExperts' E experts: the first 16 packed, their
    packed rows copied to the others (E distinct rows of memory) -> (layer, a note)."""
    n, E = min(DISTINCT_EXPERTS, ref.num_experts), ref.num_experts
    t0 = time.perf_counter()
    p = CPUExpertLayer.from_weights(ref.gate[:n], ref.up[:n], ref.down[:n]).packed
    pack_s = time.perf_counter() - t0
    buffers = {}
    for k, b in p.buffers.items():
        buffers[k] = np.empty((E, *b.shape[1:]), dtype=b.dtype)
        for a in range(0, E, n):           # torch's copy: all cores
            torch.from_numpy(buffers[k][a:a + n]).copy_(torch.from_numpy(b[:E - a]))
    copy_s = time.perf_counter() - t0 - pack_s
    return CPUExpertLayer(PackedExperts(p.fmt, E, p.hidden, p.inter, buffers)), (
        f"{n} packed in {pack_s:.1f} s" + (f", copied to all {E} in {copy_s:.1f} s (packing "
                                            f"all: ~{pack_s * E / n:.0f} s)" if E > n else ""))


class Bench:
    """One synthetic model under the hybrid engine, its ModelRunner and KV blocks: four
    decodes of `context` cached tokens (random KV values), then one prompt's blocks."""

    def __init__(self, config, device, constants, free, context, prompts=()):
        t0 = time.perf_counter()
        self.device, self.cuda = device, device.kind == "cuda"
        self.model = model_class(config)(SyntheticCheckpoint(config), device.torch_device,
                                         torch.device("cpu"))
        linears = install_device_linears(self.model)
        moes = self.model.moe_layers()
        ref, shape = moes[0][1].experts, ModelShape.of(self.model)
        host, packed = cpu_layer(ref)
        chunks = [c for c in SLP_CHUNKS if shape.activation_bytes(c) <= free // 4]
        self.planner = PrefillPlanner(constants, shape, path="slp",
                                      slp_chunks=chunks or SLP_CHUNKS[:1])
        streamed = None
        if prompts:
            n = min(self.planner.plan(max(prompts)).chunk, max(prompts))
            budget = RingBudget(n * shape.active / shape.experts, constants.h2d_bps,
                                constants.gpu_flops, free // 4)
            streamed = StreamedExperts.from_reference(
                ref, device, "auto" if constants.has_gpu else 2, budget)
        self.bridge, route = HostBridge(device), StepRoute()
        for _, moe in moes:
            moe.experts = HybridExperts(host, self.bridge, route, streamed)
        self.layers, per = len(self.model.layers), blocks_for(context + 1, BLOCK)
        self.runner = ModelRunner(self.model, 4 * per + blocks_for(max(prompts, default=0), BLOCK),
                                  BLOCK, torch.float32, Accel(device, self.bridge, route,
                                                              streamed is not None))
        for cache in self.runner.kv_caches:
            cache.normal_()
        self.decodes = [self.seq(context + 1, i * per, num_computed=context) for i in range(4)]
        self.prompt_block = 4 * per
        self.built = (f"{self.layers} layers built in {time.perf_counter() - t0:.1f} s: "
                      f"{ref.num_experts} experts on cpu-{host.isa} ({packed}), {linears} "
                      f"DeviceLinear" + (f", ring {streamed.ring.length}" if streamed else ""))

    def seq(self, length, first_block, **kw):
        ids = torch.randint(self.model.vocab_size, (length,)).tolist()
        return Seq(ids, list(range(first_block, first_block + blocks_for(length, BLOCK))), **kw)

    def sync(self):
        return torch.cuda.synchronize() if self.cuda else None

    def step(self, chunks):
        """One runner step -> (seconds, seconds in the CPU experts)."""
        self.sync()
        t0 = time.perf_counter()
        self.runner.run(chunks, last_of=list(range(len(chunks))))
        self.sync()
        return time.perf_counter() - t0, self.bridge.take_times()

    def decode(self, batch, reps, dual=False):
        """Median (step s, CPU-expert s) of steps of `batch` decodes (positions kept)."""
        self.runner.dbo = DualBatchPolicy("on") if dual else None
        chunks = [(s, 1) for s in self.decodes[:batch]]
        times = [self.step(chunks) for _ in range(3 + reps)][3:]
        self.runner.dbo = None
        return statistics.median(t for t, _ in times), statistics.median(c for _, c in times)

    def prefill(self, n):
        """(seconds, plan) of an n-token prompt in the planner's SLP plan."""
        seq = self.seq(n, self.prompt_block, prefill_plan=self.planner.plan(n))
        chunk = seq.prefill_plan.chunk
        self.sync()
        t0 = time.perf_counter()
        for a in range(0, n, chunk):
            seq.num_computed = a
            self.runner.run([(seq, min(chunk, n - a))], last_of=[0])
        self.sync()
        return time.perf_counter() - t0, seq.prefill_plan

    def bridge_copies_s(self, T, reps=20):
        """Median seconds of one MoE layer's bridge copies of a T-token step (x, ids, w
        to the host, y back), timed alone on a stream of the device."""
        d, D, k = self.device, self.model.hidden_size, self.model.moe_layers()[0][1].router.k
        pairs = [(d.host_empty(s, t), d.empty(s, t)) for s, t in (
            ((T, D), torch.float32), ((T, k), torch.int64), ((T, k), torch.float32))]
        (y_host, y), stream, times = pairs[0], d.stream("pcie-probe"), []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            for host, dev in pairs:
                stream.copy(host, dev)
            stream.synchronize()
            stream.copy(y, y_host)
            stream.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])


def decode_figures(b, name, context, reps):
    """(a): batch 1 at `context`, the step's shares, the full model's tok/s -> step s."""
    step, cpu = b.decode(1, reps)
    pcie = min(b.bridge_copies_s(1) * len(b.model.moe_layers()), step - cpu)
    full = FULL_LAYERS[name]
    print(f"[{name}] (a) hybrid decode, batch 1, context {context}: {1 / step:7.1f} tok/s over "
          f"{b.layers} layers (step {step * 1e3:.2f} ms: device {(step - cpu - pcie) / step:4.0%}"
          f", PCIe {pcie / step:4.0%} (copies timed alone), CPU experts {cpu / step:4.0%}) -> "
          f"~{b.layers / (step * full):.1f} tok/s for the {full}-layer model", flush=True)
    return step


def dbo_figures(b, name, one, reps):
    """(c): dual-batch overlap at batch 2 and 4 against batch 1 (`one`: its step s)."""
    for batch in (2, 4):
        single, _ = b.decode(batch, reps)
        half, half_cpu = b.decode(batch // 2, reps)
        dual, _ = b.decode(batch, reps, dual=True)
        hideable = 2 * min(half - half_cpu, half_cpu)
        hidden = (2 * half - dual) / hideable if hideable > 0 else float("nan")
        print(f"[{name}] (c) dual-batch overlap, batch {batch}: {batch / dual:7.1f} tok/s "
              f"(x{batch * one / dual:.2f} batch 1, x{single / dual:.2f} batch {batch} single)"
              f"; hides {hidden:5.0%} of min(device {(half - half_cpu) * 1e3:.2f} ms, CPU "
              f"experts {half_cpu * 1e3:.2f} ms) of two batch-{batch // 2} steps (goal >= 80%)"
              + ("" if b.cuda else "; the CPU twin runs the two one after the other"),
              flush=True)


def prefill_figures(b, name, lengths):
    """(b): SLP prefill beside the planner's bound; the longest that ran projected to
    the full model. Raises after the last length if one failed."""
    shape, k = b.planner.shape, b.planner.constants
    pcie = shape.experts * shape.expert_params * shape.weight_bytes / k.h2d_bps
    b.prefill(min(lengths))                                             # warm-up
    failed, longest = [], None
    for n in lengths:
        try:
            took, plan = b.prefill(n)
        except Exception:
            traceback.print_exc()
            print(f"[{name}] (b) SLP prefill {n} tokens: FAILED", flush=True)
            failed.append(n)
            continue
        longest, bound = (n, took / b.layers), b.planner.slp_s(n, plan.chunk)
        print(f"[{name}] (b) SLP prefill {n:6d} tokens, chunk {plan.chunk}: {n / took:8.0f} "
              f"tok/s over {b.layers} layers ({took:.2f} s); planner bound {n / bound:8.0f} "
              f"tok/s (slp_s {bound:.2f} s; PCIe alone {pcie * 1e3:.0f} ms/layer) -> "
              f"{bound / took:5.1%} of the bound (goal >= 90%)", flush=True)
    if longest:
        n, s = longest
        print(f"[{name}] (b) projected {FULL_LAYERS[name]}-layer model, {n}-token prompt: "
              f"{n / (s * FULL_LAYERS[name]):6.0f} tok/s from {s:.3f} s/layer (the embedding "
              f"and LM head counted in) (goal >= 2000 tok/s on one H200)", flush=True)
    if failed:
        raise RuntimeError(f"SLP prefill failed at {failed} tokens")


def machine(device):
    """-> (MachineConstants with the GPU's figures, free device bytes, a summary)."""
    if device.kind == "cuda":
        (h2d, flops, free), name = measure_gpu(device.torch_device), \
            torch.cuda.get_device_name(device.torch_device)
    else:                                  # the twin's "GPU": FP32 matmuls on the host
        x, t0 = torch.randn(512, 512), time.perf_counter()
        for _ in range(20):
            x @ x
        h2d, flops, free = TWIN_BANDWIDTH, 40 * 512 ** 3 / (time.perf_counter() - t0), 8 << 30
        name = "no CUDA device: the CPU twin (small shapes, copies capped at 2 GB/s)"
    return (MachineConstants(h2d_bps=h2d, gpu_flops=flops, num_gpus=1, source="measured"),
            free, f"{name}: h2d {(h2d or 0) / 1e9:.1f} GB/s pinned, GEMM "
                  f"{(flops or 0) / 1e12:.2f} TFLOP/s, {free / 2 ** 30:.0f} GiB free")


def section(failures, what, fn, *args):
    """fn(*args), or None with the failure printed and noted: one section's failure
    hides none of the others."""
    try:
        return fn(*args)
    except Exception:
        traceback.print_exc()
        print(f"{what}: FAILED", flush=True)
        failures.append(what)
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of each model")
    ap.add_argument("--context", type=int, default=None, help="decode context (1024; twin 256)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    start = time.perf_counter()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        from moed.backends.accel.cuda_device import CUDADevice
        device, lengths = CUDADevice(0), (4096, 16384, 32768)
    else:
        device, lengths = CPUDevice(TWIN_BANDWIDTH, keep_log=False), (256, 512, 1024)
    context = args.context or (1024 if cuda else 256)
    consts, free, summary = machine(device)
    print(summary, flush=True)
    failures = []
    for name, config, prompts in (("qwen3", QWEN3_30B_A3B, ()),
                                  ("deepseek_v3", DEEPSEEK_V3, lengths)):
        config = dict(config, num_hidden_layers=args.layers, **({} if cuda else TWIN[name]))
        b = section(failures, f"[{name}] build", Bench, config, device, consts, free, context,
                    prompts)
        if b is not None:
            print(f"[{name}] {b.built}", flush=True)
            one = section(failures, f"[{name}] (a) decode", decode_figures, b, name, context,
                          args.reps)
            if one:
                section(failures, f"[{name}] (c) dual-batch overlap", dbo_figures, b, name,
                        one, args.reps)
            if prompts:
                section(failures, f"[{name}] (b) SLP prefill", prefill_figures, b, name,
                        prompts)
        b = None
        gc.collect()                       # the model's host and device memory
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        device.close()
    print(f"done in {time.perf_counter() - start:.0f} s" +
          (f"; FAILED: {', '.join(failures)}" if failures else ""), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
