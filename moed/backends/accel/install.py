"""The hybrid engine applied to a built model in one pass.

The model is built with its dense part on the device and its routed experts' weights
in host memory (`load_model(ckpt, device, expert_device="cpu")`). Then:

- on CUDA: every dense linear and the LM head become DeviceLinear (FP8 stays FP8 in
  device memory, widened to BF16 per tile, FP32 accumulation: the precision
  contract); attention, norms, routers and shared experts run their torch operations
  there, over a KV cache on the device;
- on the CPU device (the twin that CI runs): the CPU backend serves the dense part, as
  the twin of each device kernel;
- everywhere: each MoE layer's routed experts become HybridExperts: the CPU backend's
  layer over the packed expert store, reached through the HostBridge, and, when
  stream-loading prefill may be chosen, a StreamedExperts over the same weights.
"""
import logging
import os

from moed.backends.accel.hybrid import HostBridge, HybridExperts, StepRoute
from moed.backends.torch import BackendInfo

log = logging.getLogger(__name__)

PINNED_SHARE = 0.25    # of host memory, at most, for a pinned copy of the routed experts


class Accel:
    """What the engine keeps of the hybrid install: the device, the step route the
    model runner sets, the bridge's timings."""

    def __init__(self, device, bridge, route, slp, dslp=None):
        self.device, self.bridge, self.route, self.slp = device, bridge, route, slp
        self.dslp = dslp            # the DSLPGroup (rank 0's side), or None

    def close(self):
        if self.dslp is not None:
            self.dslp.close()
        close = getattr(self.device, "close", None)
        if close is not None:
            close()


def install(model, model_dir, device, *, deterministic=True, slp=False, ring_length=2,
            ring_budget=None, verify_store=False, dslp=None, dslp_optional=False):
    """-> (BackendInfo, Accel). `device`: a moed.backends.accel Device (CUDADevice or
    CPUDevice); `slp`: build the streamed experts (only when the planner may choose
    stream-loading prefill: they hold a host staging copy of the experts), every layer
    over one ring of ring_length slots ("auto": chosen under ring_budget, a RingBudget).
    `dslp`: a moed.backends.accel.dslp.RankSpec: the streamed rows go through a DSLP
    group of that many ranks instead (this process rank 0, on `device`), each rank
    streaming its share of the experts; dslp_optional: a group that cannot start is
    logged and SLP on `device` alone serves instead."""
    refs = {i: moe.experts for i, moe in model.moe_layers()}
    if device.kind == "cpu":
        from moed.backends.cpu.install import install as install_cpu
        info = install_cpu(model, model_dir, deterministic=deterministic,
                           verify_store=verify_store, decode_stack=False)
    else:
        info = install_device_dense(model, model_dir, device, verify_store)
    bridge, route = HostBridge(device), StepRoute()
    first = None
    staging = staging_for(refs.values()) if slp or dslp else None
    group = None
    if dslp is not None:
        import dataclasses
        from moed.backends.accel.dslp import DSLPGroup
        try:
            group = DSLPGroup(refs, dataclasses.replace(dslp, ring_length=ring_length,
                                                        budget=ring_budget, staging=staging),
                              device)
        except Exception as e:
            if not dslp_optional:
                raise
            log.warning("DSLP over %d ranks cannot start (%s): stream-loading prefill on "
                        "one device", dslp.world_size, e)
    for i, moe in model.moe_layers():
        streamed = None
        if group is not None:
            streamed = group.experts(i, fallback=moe.experts)
        elif slp:
            from moed.backends.accel.streamed_experts import StreamedExperts
            streamed = StreamedExperts.from_reference(refs[i], device, ring_length,
                                                      ring_budget, share=first,
                                                      staging=staging)
            streamed.layer = i
            first = first or streamed
        moe.experts = HybridExperts(moe.experts, bridge, route, streamed)
    where = f"{device.kind}" + ("" if device.kind == "cpu" else f" ({device.torch_device})")
    info.accel = f"hybrid on {where}: experts on the host" + (
        f", stream-loading prefill (one ring of {first.ring.length} slots, {staging} "
        f"staging)" if first else "") + (
        f", DSLP over {group.spec.world_size} ranks ({staging} staging)" if group else "")
    return info, Accel(device, bridge, route, slp or group is not None, group)


def staging_for(layers):
    """"pinned" (each layer packed once into host staging memory) when all layers'
    routed experts take at most PINNED_SHARE of the host's memory, else "bounce" (a
    few experts packed per load: no second copy of the experts)."""
    total = sum(sum(w.data.nbytes + (w.scale_inv.nbytes if w.is_fp8 else 0)
                    for ws in (ex.gate, ex.up, ex.down) for w in ws) for ex in layers)
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        memory = 0
    return "pinned" if total <= PINNED_SHARE * memory else "bounce"


def install_device_dense(model, model_dir, device, verify_store):
    """CUDA: the dense linears as DeviceLinear; the routed experts on the CPU kernels
    from the packed store (the torch reference on the host where they are not built)."""
    from moed.backends.accel.linears import install_device_linears
    n = install_device_linears(model)
    info = BackendInfo(linears=f"{device.kind} ({n} linears, bf16 tiles)",
                       attention=f"torch on {device.torch_device}",
                       norms=f"torch on {device.torch_device}",
                       routers=f"torch on {device.torch_device}")
    try:
        from moed.backends.cpu.install import install_experts
        from moed.backends.cpu.isa import load_kernels
        from moed.backends.cpu.runtime import default_threads
        kernels = load_kernels()
        install_experts(model, model_dir, kernels, default_threads(), verify_store)
        info.experts = f"cpu-{kernels.ISA}"
    except ImportError as e:
        info.notes.append(f"CPU kernels unavailable ({e}): the routed experts run the "
                          f"torch reference on the host")
    return info
