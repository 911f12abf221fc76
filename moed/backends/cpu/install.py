"""The CPU backend applied to a built model in one pass: which module or operations
object each part of it gets. Speeds are in the benchmarks' output (tools/) and the
README, not here."""
import logging

from moed.backends.cpu.decode_stack import StackedLayers, build_decode_stack
from moed.backends.cpu.decode_stack import enabled as stack_enabled
from moed.backends.cpu.experts import CPUExpertLayer
from moed.backends.cpu.glue import (CPUGateLogits, CPUGroupedSigmoidRouter, CPURMSNorm,
                                    CPUSoftmaxRouter)
from moed.backends.cpu.gqa import CPUGQAOps
from moed.backends.cpu.isa import load_kernels
from moed.backends.cpu.linears import count_linears, install_cpu_linears
from moed.backends.cpu.mla import CPUMLAOps, LatentAbsorb
from moed.backends.cpu.runtime import default_threads
from moed.backends.cpu.store import _torch_layers, open_or_build
from moed.backends.torch import BackendInfo
from moed.backends.cpu.layout import int4_refusal
from moed.errors import InvalidRequestError
from moed.model.attention import GQAttention
from moed.model.deepseek_v3 import MLAttention
from moed.model.layers import Linear, RMSNorm
from moed.model.moe import GroupedSigmoidRouter, SoftmaxRouter

log = logging.getLogger(__name__)


def install(model, model_dir, experts=True, linears=True, deterministic=True, threads=None,
            verify_store=False, decode_stack=True):
    """Routed experts (with their routers) when `experts`; dense linears, attention,
    norms (and, with the experts, the decode stack) when `linears`. -> BackendInfo.
    `verify_store`: the packed stores' checksums read in full before use. Raises
    ConfigError for a forced ISA this CPU lacks. `decode_stack`: False keeps the layers'
    own loop (the hybrid engine wraps the routed experts, which the stack would skip)."""
    kernels = load_kernels()
    threads = threads or default_threads()
    info = BackendInfo()
    unpackable = experts and model.moe_layers() and unpackable_experts(model)
    if unpackable:
        info.notes.append(f"experts on torch: {unpackable}")
    elif experts and model.moe_layers():
        path = install_experts(model, model_dir, kernels, threads, verify_store)
        info.experts = f"cpu-{kernels.ISA}"
        info.routers = f"cpu ({install_routers(model, kernels, threads)})"
        log.debug("CPU experts from %s, %d threads", path, threads)
    if linears:
        installed = install_cpu_linears(model, model_dir, threads, kernels, verify_store)
        if installed:
            info.linears = f"cpu ({count_linears(installed)} linears)"
        info.attention = install_attention(model, installed, kernels, threads, deterministic)
        info.norms = f"cpu ({install_norms(model, kernels, threads)})"
        if info.experts != "torch" and decode_stack and stack_enabled():
            stack = build_decode_stack(model)
            if stack is not None:
                model.ops = StackedLayers(stack)
                info.decode_stack = f"on (layers {stack.first}..)"
    return info


def unpackable_experts(model):
    """Why the routed experts' weights cannot go to the kernels (GPTQ act-order), or None:
    they then stay on the reference, which dequantizes them exactly."""
    for i, moe in _torch_layers(model):
        ws = moe.experts
        for w in ws.gate + ws.up + ws.down:
            why = w.is_int4 and int4_refusal(w, f"layer {i} experts")
            if why:
                return why
    return None


def install_experts(model, model_dir, kernels, threads, verify=False):
    """Each MoE layer's TorchExperts -> a CPUExpertLayer over the model's packed expert
    store (built on first use). Returns the store's path."""
    layers = _torch_layers(model)
    store = open_or_build(model_dir, layers, verify=verify)
    for i, moe in layers:
        moe.experts = CPUExpertLayer(store.layer(i), threads, kernels)
    return store.path


def install_routers(model, kernels, threads):
    """Softmax routers (Mixtral, Qwen-MoE): logits, softmax and top-k in one call;
    DeepSeek's grouped sigmoid router and Qwen2-MoE's shared-expert gate: their logits
    from the same per-row dots (batch-invariant, unlike torch's matmul)."""
    n = 0
    for _, moe in model.moe_layers():
        if type(moe.shared_gate) is Linear:        # Qwen2-MoE's [1, D] shared-expert gate
            moe.shared_gate = CPUGateLogits(moe.shared_gate, threads, kernels)
        if type(moe.router) is SoftmaxRouter:
            moe.router = CPUSoftmaxRouter(moe.router, threads, kernels)
            n += 1
        elif type(moe.router) is GroupedSigmoidRouter:
            moe.router = CPUGroupedSigmoidRouter(moe.router, threads, kernels)
            n += 1
    return f"{n} routers"


def install_norms(model, kernels, threads):
    """Every RMS norm a layer applies to the residual stream, and the final one, with
    the residual add before it folded in."""
    n = 0
    for owner, name in [(layer, a) for layer in model.layers
                        for a in ("input_norm", "post_norm")] + [(model, "norm")]:
        if type(getattr(owner, name)) is RMSNorm:
            setattr(owner, name, CPURMSNorm(getattr(owner, name), threads, kernels))
            n += 1
    return f"{n} norms"


def install_attention(model, installed, kernels, threads, deterministic):
    """Every attention layer's operations on the kernels. The flash kernel takes prefill
    chunks where its BF16 dot products are the precision contract's (AVX-512), or
    everywhere when `deterministic`; the paged kernels take decodes except on generic
    without `deterministic` (torch's matmuls are faster than its plain C there)."""
    bf16_dots = kernels.ISA in ("avx512", "avx512emu")
    flash = bf16_dots or deterministic
    paged = kernels.ISA != "generic" or deterministic
    n = 0
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if isinstance(attn, GQAttention):
            attn.ops = CPUGQAOps(attn, kernels, threads, installed.get(f"layers.{i}.attn.qkv"),
                                 flash, paged)
        elif isinstance(attn, MLAttention):
            attn.ops = CPUMLAOps(attn, kernels, threads, flash, paged, deterministic,
                                 latent_absorb(attn, kernels, threads) if flash else None)
        else:
            continue
        n += 1
    forms = "+".join(f for f, on in (("flash prefill", flash), ("paged decode", paged)) if on)
    return f"cpu ({n} layers: {forms or 'store, norm+rope'})"


def latent_absorb(attn, kernels, threads):
    """MLA's absorbed products with kv_b as stored (a quarter of the bytes of its FP32
    copy, in FP8), or None when kv_b is in a form the row kernels do not read."""
    try:
        return LatentAbsorb(attn.kv_b.weight, attn.H, attn.dn, attn.dv, attn.r,
                            threads=threads, kernels=kernels)
    except (AttributeError, InvalidRequestError):
        return None
