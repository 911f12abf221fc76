"""Put the CPU expert engine behind every MoE layer of a built model."""
import logging

from moed.backends.cpu.experts import CPUExpertLayer, default_threads
from moed.backends.cpu.store import _torch_layers, open_or_build

log = logging.getLogger(__name__)


def install_cpu_experts(model, model_dir, threads=None):
    """Replace each MoE layer's TorchExperts with a CPUExpertLayer over the
    model's packed store (built on first use). Returns the ISA path used."""
    from moed.backends.cpu.isa import expert_kernels
    kernels = expert_kernels()               # fails clearly on a forced, unsupported ISA
    layers = _torch_layers(model)
    store = open_or_build(model_dir, layers)
    threads = threads or default_threads()
    for i, moe in layers:
        moe.experts = CPUExpertLayer(store.layer(i), threads, kernels)
    log.info("CPU experts: %d layers from %s, isa=%s, %d threads", len(layers), store.path,
             kernels.ISA, threads)
    return kernels.ISA
