"""The transformers reference model for a checkpoint directory (test helper).

transformers runs FP8 block-quantized and INT4 checkpoints only through its own
quantizers (which need a GPU, extra packages, or re-quantize activations), so
for those we write a dequantized copy once per model directory: every FP8
weight becomes float32 data * block scale (exact: an e4m3 value times a float32
scale is a float32), every INT4 weight (code - zero) * group scale (exact too),
the scale, zero-point and group tensors and `quantization_config` are dropped
(and Kimi-K2's `model_type` reads as the DeepSeek-V3 it is). The
model then runs in float32 with eager attention on the CPU, and loading must
report no missing, unexpected or mismatched keys.
"""
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moed.model.checkpoint import Checkpoint
from moed.model.formats import FP8_DTYPE, dequantize_fp8

_models = {}          # resolved model dir -> loaded transformers model
_copies = {}          # resolved model dir -> TemporaryDirectory of its dequantized copy
SCALE_SUFFIX = "_scale_inv"


def shard_files(model_dir):
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def dequantized_tensors(model_dir, block):
    """name -> tensor with every FP8 weight replaced by its exact float32 value."""
    handles = [safe_open(str(model_dir / f), framework="pt") for f in shard_files(model_dir)]
    where = {name: h for h in handles for name in h.keys()}
    out = {}
    for name, h in where.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        t = h.get_tensor(name)
        if t.dtype == FP8_DTYPE:
            scale = where[name + SCALE_SUFFIX].get_tensor(name + SCALE_SUFFIX)
            t = dequantize_fp8(t, scale, block)
        out[name] = t.contiguous()
    return out


INT4_PARTS = {"weight_packed": "ct", "weight_scale": None, "weight_shape": None,
              "qweight": "gptq", "qzeros": None, "scales": None, "g_idx": None}


def int4_dequantized_tensors(model_dir):
    """name -> tensor with every INT4 weight (its parts) replaced by `<prefix>.weight`,
    its exact float32 value, read by moed's own checkpoint reader."""
    ckpt = Checkpoint(model_dir)
    out = {}
    for name in ckpt.names():
        prefix, _, part = name.rpartition(".")
        if part not in INT4_PARTS:
            out[name] = ckpt.tensor(name).contiguous()
        elif INT4_PARTS[part] == "ct":
            rows, inp = ckpt.tensor(f"{prefix}.weight_shape").tolist()
            out[f"{prefix}.weight"] = ckpt.weight(prefix, rows, inp).dequantize()
        elif INT4_PARTS[part] == "gptq":
            words, rows = ckpt.tensor(name).shape
            out[f"{prefix}.weight"] = ckpt.weight(prefix, rows, words * 8).dequantize()
    return out


def dequantized_copy(model_dir):
    """Directory of a float32 copy of a quantized checkpoint (made once per process)."""
    if model_dir not in _copies:
        cfg = json.loads((model_dir / "config.json").read_text())
        q = cfg.pop("quantization_config", None) or {"quant_method": None}
        if cfg.get("model_type") == "kimi_k2":
            cfg["model_type"] = "deepseek_v3"
        tensors = (int4_dequantized_tensors(model_dir)
                   if q["quant_method"] in ("compressed-tensors", "gptq")
                   else dequantized_tensors(model_dir, tuple(q.get("weight_block_size", ()))))
        tmp = tempfile.TemporaryDirectory(prefix="moed-hf-ref-")
        dst = Path(tmp.name)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "config.json").write_text(json.dumps(cfg))
        gen = model_dir / "generation_config.json"
        if gen.exists():
            shutil.copy(gen, dst / gen.name)
        _copies[model_dir] = tmp
    return Path(_copies[model_dir].name)


def load_reference(model_dir):
    from transformers import AutoModelForCausalLM
    cfg = json.loads((model_dir / "config.json").read_text())
    src = (dequantized_copy(model_dir)
           if cfg.get("quantization_config") or cfg.get("model_type") == "kimi_k2" else model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.float32, attn_implementation="eager",
        output_loading_info=True, device_map=None)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info.get("error_msgs"), f"{model_dir}: {problems or info}"
    return model.eval()


def hf_model(model_dir):
    """transformers' float32 model for `model_dir` (cached per directory)."""
    key = Path(model_dir).resolve()
    if key not in _models:
        _models[key] = load_reference(key)
    return _models[key]
