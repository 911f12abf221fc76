"""moed: local inference for large Mixture-of-Experts models."""
import os

# torch's OpenMP threads spin after each op and steal the cores from the CPU
# kernels' pinned pool (measured: decode at 19% of read bandwidth instead of
# 75%). Passive waiting must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from moed.errors import (CapacityError, CheckpointError, ConfigError, InvalidRequestError,
                         MoedError, UnsupportedArchitectureError)

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "MoedError", "CheckpointError", "ConfigError",
           "InvalidRequestError", "CapacityError", "UnsupportedArchitectureError"]


def __getattr__(name):
    # Lazy: `import moed` stays cheap (the CLI and server import it before torch is needed).
    if name == "LLM":
        from moed.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from moed.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
