"""A Hugging Face checkpoint directory, memory-mapped.

config.json + one `model.safetensors`, or many shards listed by
`model.safetensors.index.json`. Tensors are views into the mapped files
(never read into memory as a whole); a missing, truncated or inconsistent
file raises CheckpointError naming it.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from moed.errors import CheckpointError
from moed.model.formats import (FP8_DTYPE, PLAIN_DTYPES, Int4, QuantConfig, Weight, block_grid,
                                 unpack_int4)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found", path=str(path))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})", path=str(path)) from e


class Checkpoint:
    """Name -> tensor over the safetensors files of one model directory."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found", path=str(self.dir))
        self.config = read_json(self.dir / "config.json")
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.dir / 'config.json'}: expected a JSON object",
                                  path=str(self.dir / "config.json"))
        self.quant = QuantConfig.from_hf(self.config)
        self._files = {}                              # file name -> safe_open handle
        self.weight_map = self._weight_map()          # tensor name -> file name

    def _weight_map(self):
        index = self.dir / INDEX_FILE
        if index.exists():
            data = read_json(index)
            wmap = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{index}: no 'weight_map'", path=str(index))
            return dict(wmap)
        single = self.dir / SINGLE_FILE
        if single.exists():
            return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.dir}: no *.safetensors files", path=str(self.dir))
        return {name: shard for shard in shards for name in self._open(shard).keys()}

    def _open(self, filename):
        handle = self._files.get(filename)
        if handle is None:
            path = self.dir / filename
            if not path.is_file():
                raise CheckpointError(f"{path}: shard file not found", path=str(path))
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:   # safetensors raises its own error types
                raise CheckpointError(f"{path}: unreadable safetensors file "
                                      f"(truncated or corrupt?): {e}", path=str(path)) from e
            self._files[filename] = handle
        return handle

    def __contains__(self, name):
        return name in self.weight_map

    def names(self):
        return self.weight_map.keys()

    def tensor(self, name, shape=None, dtypes=None):
        """The tensor `name` (a view of the mapped file), with shape/dtype checked."""
        filename = self.weight_map.get(name)
        if filename is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint",
                                  path=str(self.dir), tensor=name)
        handle = self._open(filename)
        path = self.dir / filename
        try:
            t = handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}",
                                  path=str(path), tensor=name) from e
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(shape)}", path=str(path), tensor=name)
        if dtypes is not None and t.dtype not in dtypes:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, "
                                  f"expected one of {[str(d) for d in dtypes]}",
                                  path=str(path), tensor=name)
        return t

    def weight(self, prefix, out_features, in_features):
        """The linear weight of module `prefix` [out, in]: INT4 with its group scales (and
        zero points), FP8 with its block scales, or plain."""
        if self.quant is not None and self.quant.is_int4:
            w = self._int4_weight(prefix, out_features, in_features)
            if w is not None:
                return w
        name = f"{prefix}.weight"
        data = self.tensor(name, shape=(out_features, in_features),
                           dtypes=PLAIN_DTYPES + (FP8_DTYPE,))
        if data.dtype != FP8_DTYPE:
            return Weight(data)
        scale_name = f"{prefix}.weight_scale_inv"
        if self.quant is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is FP8 but config.json has no "
                                  "quantization_config", path=str(self.dir), tensor=name)
        block = self.quant.block_size
        scale = self.tensor(scale_name, shape=block_grid(data.shape, block),
                            dtypes=(torch.float32, torch.bfloat16))
        return Weight(data, scale.float(), block)

    def _error(self, msg, name):
        return CheckpointError(f"{self.dir}: {msg}", path=str(self.dir), tensor=name)

    def _int4_weight(self, prefix, out_features, in_features):
        """INT4 `prefix` as published, or None where the module is stored unquantized."""
        q = self.quant
        if q.method == "compressed-tensors":
            return self._ct_weight(prefix, out_features, in_features)
        return self._gptq_weight(prefix, out_features, in_features)

    def _ct_weight(self, prefix, out, inp):
        q, name = self.quant, f"{prefix}.weight_packed"
        if q.ignores(prefix):
            if name in self:
                raise self._error(f"tensor {name!r} is packed but quantization_config.ignore "
                                  f"keeps {prefix!r} unquantized", name)
            return None
        if name not in self:
            return None              # not a quantized target (DeepSeek's router: no Linear)
        words = self.tensor(name, shape=(out, -(-inp // 8)), dtypes=(torch.int32,))
        shape_name = f"{prefix}.weight_shape"
        if shape_name in self:
            stored = [int(v) for v in self.tensor(shape_name).flatten().tolist()]
            if stored != [out, inp]:
                raise self._error(f"tensor {shape_name!r} is {stored}, expected {[out, inp]}",
                                  shape_name)
        G = q.group_size
        scales = self.tensor(f"{prefix}.weight_scale", shape=(out, -(-inp // G)),
                             dtypes=(torch.bfloat16, torch.float16, torch.float32))
        return Weight(words, int4=Int4(inp, G, scales))

    def _gptq_weight(self, prefix, out, inp):
        q, name = self.quant, f"{prefix}.qweight"
        if name not in self:
            return None              # kept unquantized (routers, lm_head)
        if inp % 8:
            raise self._error(f"tensor {name!r}: {inp} input features are not a multiple "
                              "of 8 (GPTQ packs 8 rows a word)", name)
        G = q.group_size
        ng = -(-inp // G)
        qweight = self.tensor(name, shape=(inp // 8, out), dtypes=(torch.int32,))
        scales = self.tensor(f"{prefix}.scales", shape=(ng, out),
                             dtypes=(torch.float16, torch.bfloat16, torch.float32))
        qzeros = self.tensor(f"{prefix}.qzeros", shape=(ng, -(-out // 8)), dtypes=(torch.int32,))
        zeros = unpack_int4(qzeros, out).to(torch.int16) + q.zero_offset    # [groups, out]
        zeros = None if bool((zeros == 8).all()) else zeros.t().to(torch.uint8).contiguous()
        return Weight(qweight.t(), int4=Int4(inp, G, scales.t(), zeros,
                                              self._g_idx(prefix, inp, G, ng)))

    def _g_idx(self, prefix, inp, G, ng):
        """GPTQ's g_idx, or None where it is the plain k // G."""
        name = f"{prefix}.g_idx"
        if name not in self:
            if self.quant.desc_act:
                raise self._error(f"tensor {name!r} is missing: quantization_config.desc_act "
                                  "is true (act-order needs each column's group)", name)
            return None
        g_idx = self.tensor(name, shape=(inp,), dtypes=(torch.int32, torch.int64))
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= ng:
            raise self._error(f"tensor {name!r} has groups outside [0, {ng})", name)
        if torch.equal(g_idx.long(), torch.arange(inp) // G):
            return None
        return g_idx.to(torch.int32)

    def vector(self, name, size, dtype=None):
        """A 1-D tensor such as a norm weight or a bias."""
        return self.tensor(name, shape=(size,), dtypes=None if dtype is None else (dtype,))
