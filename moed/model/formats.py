"""Weight formats as published, and their exact reference dequantization.

- BF16 / FP16 / FP32: used as stored.
- FP8 e4m3 with block scales (DeepSeek-V3/R1, Qwen3-*-FP8): `weight` is
  float8_e4m3fn [out, in]; `weight_scale_inv` is float32
  [ceil(out/bo), ceil(in/bi)] for `weight_block_size` [bo, bi] (128x128 as
  published). Edge blocks are partial when a dimension is not a multiple of
  the block. The real value is weight * weight_scale_inv (the name is
  historical: it is the inverse of the quantization scale).
"""
from dataclasses import dataclass

import torch

from moed.errors import CheckpointError

PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class QuantConfig:
    """What `quantization_config` in config.json says (None when unquantized)."""
    method: str                      # "fp8"
    block_size: tuple                # (rows, cols), (128, 128) as published
    modules_to_not_convert: tuple    # name fragments that stay unquantized

    @classmethod
    def from_hf(cls, cfg):
        q = cfg.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise CheckpointError(f"config.json: quantization_config.quant_method={method!r} "
                                  "is not supported (only 'fp8' with block scales)",
                                  path="config.json")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise CheckpointError(f"config.json: quantization_config.fmt={fmt!r} is not "
                                  "supported (only 'e4m3')", path="config.json")
        block = q.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError("config.json: quantization_config.weight_block_size must "
                                  f"be two positive ints, got {block!r}", path="config.json")
        skip = tuple(q.get("modules_to_not_convert") or ())
        return cls("fp8", tuple(block), skip)


def block_grid(shape, block):
    """Scale-grid shape for a [out, in] weight: ceil division by the block."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


@dataclass
class Weight:
    """One linear weight exactly as stored: data [out, in] (+ FP8 block scales)."""
    data: torch.Tensor                  # [out, in], as stored (maybe a mmap view)
    scale_inv: torch.Tensor = None      # [ceil(out/bo), ceil(in/bi)] float32, FP8 only
    block: tuple = None                 # (bo, bi), FP8 only

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def is_fp8(self):
        return self.scale_inv is not None

    def dequantize(self, dtype=torch.float32):
        """Exact: FP8 and BF16 values are all representable in float32."""
        if not self.is_fp8:
            return self.data.to(dtype)
        return dequantize_fp8(self.data, self.scale_inv, self.block).to(dtype)

    def to(self, device):
        scale = None if self.scale_inv is None else self.scale_inv.to(device)
        return Weight(self.data.to(device), scale, self.block)


def dequantize_fp8(data, scale_inv, block):
    """float32 [out, in] = fp8 data * block scale broadcast over each block."""
    out, inp = data.shape
    scale = scale_inv.float()
    scale = scale.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return data.float() * scale


def quantize_fp8(w, block=(128, 128)):
    """float [out, in] -> (fp8 data, float32 scale_inv) the way DeepSeek publishes it:
    per block, scale = amax / 448 (e4m3 max), data = round(w / scale)."""
    out, inp = w.shape
    gr, gc = block_grid(w.shape, block)
    pad = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    pad[:out, :inp] = w.float()
    tiles = pad.view(gr, block[0], gc, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / 448.0
    q = (tiles / scale_inv[:, None, :, None]).clamp(-448, 448)
    data = q.reshape(gr * block[0], gc * block[1])[:out, :inp].to(FP8_DTYPE)
    return data.contiguous(), scale_inv.float().contiguous()
