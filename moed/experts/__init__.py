"""The CPU expert engine: packed expert store + fused MoE kernels per instruction set."""
from moed.experts.layer import CPUExpertLayer

__all__ = ["CPUExpertLayer", "install_cpu_experts", "install_cpu_linears"]


def install_cpu_experts(model, model_dir, threads=None):
    from moed.experts.install import install_cpu_experts as install
    return install(model, model_dir, threads)


def install_cpu_linears(model, model_dir, threads=None):
    from moed.experts.dense import install_cpu_linears as install
    return install(model, model_dir, threads)

