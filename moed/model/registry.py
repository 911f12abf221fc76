"""config.json `architectures` -> model class."""
from moed.errors import UnsupportedArchitectureError
from moed.model.deepseek_v3 import DeepseekV3ForCausalLM
from moed.model.mixtral import MixtralForCausalLM, Qwen2MoeForCausalLM
from moed.model.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES = {cls.architecture: cls for cls in (
    DeepseekV3ForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM)}


def model_class(config, path="config.json"):
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise UnsupportedArchitectureError(f"{path}: field 'architectures' is missing or empty",
                                           path=path)
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"{path}: architecture {archs[0]!r} is not supported "
        f"(supported: {', '.join(sorted(ARCHITECTURES))})", path=path)


def load_model(ckpt, device, expert_device=None):
    """The checkpoint's model on device, its routed experts' weights on expert_device
    (default: device)."""
    cls = model_class(ckpt.config, str(ckpt.dir / "config.json"))
    return cls(ckpt, device, expert_device)
