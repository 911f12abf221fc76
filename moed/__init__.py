"""moed: local inference for large Mixture-of-Experts models."""
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
