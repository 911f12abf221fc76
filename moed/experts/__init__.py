"""The CPU expert engine: packed expert store + fused MoE kernels per instruction set."""
from moed.experts.layer import CPUExpertLayer

__all__ = ["CPUExpertLayer", "install_cpu_experts", "install_cpu_linears", "install_cpu_kernels"]


def install_cpu_experts(model, model_dir, threads=None):
    from moed.experts.install import install_cpu_experts as install
    return install(model, model_dir, threads)


def install_cpu_linears(model, model_dir, threads=None):
    from moed.experts.dense import install_cpu_linears as install
    return install(model, model_dir, threads)


def install_cpu_kernels(model, model_dir, threads=None):
    """Both CPU passes over a built model: routed experts (when it has MoE layers) and
    dense linears (unless MOED_LINEARS=torch). Returns (expert ISA or None, linears replaced)."""
    import os

    from moed.model.moe import TorchExperts
    pending = [m for _, m in model.moe_layers() if isinstance(m.experts, TorchExperts)]
    isa = install_cpu_experts(model, model_dir, threads) if pending else None
    if os.environ.get("MOED_LINEARS", "auto").strip().lower() == "torch":
        return isa, 0
    return isa, install_cpu_linears(model, model_dir, threads)
