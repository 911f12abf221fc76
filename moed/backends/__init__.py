"""Execution backends, applied to a built model from outside.

A model file is plain torch: its layers call an operations object (`attn.ops`) and
the routed-experts interface (`moe.experts.forward`), and a backend's install pass
swaps modules and sets `ops` on a built model, returning what it did (BackendInfo).

- `torch`  the reference: plain torch, the tests' oracle and every fallback.
- `cpu`    the compiled CPU kernels (one extension per instruction set, chosen at
           import from CPUID): routed experts, dense linears, attention, glue.
- `accel`  the accelerator backend (reserved; see its package).

`install` is the one place that decides which backend serves each part.
"""
import logging

from moed.backends.torch import BackendInfo
from moed.errors import ConfigError

log = logging.getLogger("moed.backends")

CHOICES = ("auto", "cpu", "torch")


def install(model, model_dir, experts="auto", linears="auto", deterministic=True,
            verify_store=False):
    """Apply the backends to a built model -> BackendInfo.

    `experts` (the routed experts and their routers) and `linears` (dense linears,
    attention, norms) are each 'auto', 'cpu' or 'torch'. With 'auto', a build without
    the compiled CPU backend falls back to the reference (noted in the answer); with
    'cpu' that is an error. A model on another device keeps the reference.
    `verify_store`: checksum every byte of the packed weight stores before use (a store
    failing it is rebuilt)."""
    for name, choice in (("experts", experts), ("linears", linears)):
        if choice not in CHOICES:
            raise ConfigError(f"{name} must be one of {', '.join(CHOICES)}, got {choice!r}",
                              field=name)
    if model.device.type != "cpu" or experts == linears == "torch":
        return BackendInfo()
    try:
        from moed.backends.cpu.install import install as install_cpu
        return install_cpu(model, model_dir, experts=experts != "torch",
                           linears=linears != "torch", deterministic=deterministic,
                           verify_store=verify_store)
    except ImportError as e:         # the compiled extension not built
        if "cpu" in (experts, linears):
            raise
        return BackendInfo(notes=[f"CPU kernels unavailable ({e}): the torch reference runs"])
