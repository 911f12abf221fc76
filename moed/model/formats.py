"""Weight formats as published, and their exact reference dequantization.

- BF16 / FP16 / FP32: used as stored.
- FP8 e4m3 with block scales (DeepSeek-V3/R1, Qwen3-*-FP8): `weight` is
  float8_e4m3fn [out, in]; `weight_scale_inv` is float32
  [ceil(out/bo), ceil(in/bi)] for `weight_block_size` [bo, bi] (128x128 as
  published). Edge blocks are partial when a dimension is not a multiple of
  the block. The real value is weight * weight_scale_inv (the name is
  historical: it is the inverse of the quantization scale).
- INT4, group-quantized along the input dimension (W4A16), in either of two
  published layouts, both with 8 codes a little-endian int32 word, the code of
  column 8j + i in bits 4i..4i+3 of word j:
  compressed-tensors `pack-quantized` (Kimi-K2-Thinking): `weight_packed`
  int32 [out, ceil(in/8)], `weight_scale` BF16/FP16 [out, ceil(in/G)],
  `weight_shape` [2]; symmetric, the code is q + 8 (value q in [-8, 7]).
  GPTQ (AutoGPTQ / gptqmodel; Qwen's MoE GPTQ checkpoints): `qweight` int32
  [in/8, out] (packed along the input rows), `qzeros` int32 [ceil(in/G),
  out/8] (packed along the output columns), `scales` FP16 [ceil(in/G), out],
  `g_idx` int32 [in] (the group of each input column; not monotone under
  act-order, `desc_act`). `checkpoint_format` "gptq" (v1) stores each zero
  point minus one, "gptq_v2" stores it as is.
  Either way the real value is (code - zero) * scale of (row, group of the
  column): exact in float32 (a 5-bit integer times a BF16/FP16 scale).
"""
import re
from dataclasses import dataclass

import torch

from moed.errors import CheckpointError

PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn


INT4_GROUPS = (32, 64, 128)       # group sizes the CPU kernels take (a divisor of 128)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}   # checkpoint_format -> stored zero = zero - this


def _bad(field, value, expected):
    return CheckpointError(f"config.json: quantization_config.{field}={value!r} is not "
                           f"supported ({expected})", path="config.json")


@dataclass(frozen=True)
class QuantConfig:
    """What `quantization_config` in config.json says (None when unquantized)."""
    method: str                      # "fp8" | "compressed-tensors" | "gptq"
    block_size: tuple = None         # FP8: (rows, cols), (128, 128) as published
    modules_to_not_convert: tuple = ()   # FP8: name fragments that stay unquantized
    group_size: int = None           # INT4: input columns per scale
    symmetric: bool = True           # INT4
    desc_act: bool = False           # GPTQ: act-order (g_idx not monotone)
    zero_offset: int = 0             # GPTQ: what the stored zero points lack (v1: 1)
    ignore: tuple = ()               # compressed-tensors: names / "re:" patterns kept BF16

    @property
    def is_int4(self):
        return self.method in ("compressed-tensors", "gptq")

    def ignores(self, prefix):
        """compressed-tensors: whether module `prefix` stays unquantized (its `ignore`)."""
        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.fullmatch(pat[3:], prefix):
                    return True
            elif pat == prefix:
                return True
        return False

    @classmethod
    def from_hf(cls, cfg):
        q = cfg.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method == "compressed-tensors":
            return cls._compressed_tensors(q)
        if method == "gptq":
            return cls._gptq(q)
        if method != "fp8":
            raise _bad("quant_method", method, "'fp8' with block scales, 'compressed-tensors' "
                       "pack-quantized W4A16, 'gptq' 4-bit")
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

    @classmethod
    def _compressed_tensors(cls, q):
        if q.get("format") != "pack-quantized":
            raise _bad("format", q.get("format"), "only 'pack-quantized'")
        groups = q.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise _bad("config_groups", groups, "one or more groups of weight arguments")
        args = None
        for name, g in groups.items():
            where = f"config_groups.{name}"
            if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
                raise _bad(f"{where}.weights", None if not isinstance(g, dict)
                           else g.get("weights"), "the weights' quantization arguments")
            for act in ("input_activations", "output_activations"):
                if g.get(act) is not None:
                    raise _bad(f"{where}.{act}", g[act], "weights only: activations stay BF16")
            w = g["weights"]
            if args is not None and w != args:
                raise _bad(f"{where}.weights", w, "every group with the same weight arguments")
            args = w
            _check_ct_weights(args, f"{where}.weights")
        ignore = q.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise _bad("ignore", ignore, "a list of module names and 're:' patterns")
        return cls("compressed-tensors", group_size=args["group_size"], symmetric=True,
                   ignore=tuple(ignore))

    @classmethod
    def _gptq(cls, q):
        if q.get("bits") != 4:
            raise _bad("bits", q.get("bits"), "only 4")
        if q.get("group_size") not in INT4_GROUPS:
            raise _bad("group_size", q.get("group_size"),
                       f"one of {list(INT4_GROUPS)}: the CPU kernels' groups divide 128")
        fmt = q.get("checkpoint_format", q.get("format", "gptq"))
        if fmt not in GPTQ_FORMATS:
            raise _bad("checkpoint_format", fmt, f"one of {sorted(GPTQ_FORMATS)}")
        for flag in ("desc_act", "sym"):
            if not isinstance(q.get(flag, False if flag == "desc_act" else True), bool):
                raise _bad(flag, q.get(flag), "true or false")
        return cls("gptq", group_size=q["group_size"], symmetric=q.get("sym", True),
                   desc_act=q.get("desc_act", False), zero_offset=GPTQ_FORMATS[fmt])


def _check_ct_weights(w, where):
    expect = {"num_bits": (4, "only 4"), "type": ("int", "only 'int'"),
              "strategy": ("group", "only 'group'"), "symmetric": (True, "only true"),
              "dynamic": (False, "only false: scales as stored")}
    for key, (value, why) in expect.items():
        if w.get(key, value) != value or (key in ("num_bits", "strategy") and key not in w):
            raise _bad(f"{where}.{key}", w.get(key), why)
    if w.get("actorder") not in (None, False):
        raise _bad(f"{where}.actorder", w.get("actorder"), "only null")
    if w.get("group_size") not in INT4_GROUPS:
        raise _bad(f"{where}.group_size", w.get("group_size"),
                   f"one of {list(INT4_GROUPS)}: the CPU kernels' groups divide 128")


def block_grid(shape, block):
    """Scale-grid shape for a [out, in] weight: ceil division by the block."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


@dataclass
class Int4:
    """The group parameters of an INT4 weight: value[o, k] = (code[o, k] - zero[o, g])
    * scale[o, g], g = group[k]."""
    in_features: int
    group: int                          # G, input columns per group (a divisor of 128)
    scales: torch.Tensor                # [out, ceil(in/G)] BF16 or FP16 (maybe a view)
    zeros: torch.Tensor = None          # [out, ceil(in/G)] uint8 in 0..15; None: all 8
    g_idx: torch.Tensor = None          # [in] int32 group of each column; None: k // G

    @property
    def groups(self):
        return self.scales.shape[1]

    def group_index(self):
        """[in] int64 group of each input column."""
        if self.g_idx is None:
            return torch.arange(self.in_features) // self.group
        return self.g_idx.long()

    def zero_points(self):
        """[out, groups] int32 zero points (8 where symmetric)."""
        if self.zeros is None:
            return torch.full(tuple(self.scales.shape), 8, dtype=torch.int32)
        return self.zeros.to(torch.int32)

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return Int4(self.in_features, self.group, move(self.scales), move(self.zeros),
                    move(self.g_idx))


@dataclass
class Weight:
    """One linear weight exactly as stored: data [out, in] (+ FP8 block scales), or INT4
    codes as int32 words [out, ceil(in/8)] (+ group parameters)."""
    data: torch.Tensor                  # [out, in], as stored (maybe a mmap view); INT4:
                                        # int32 [out, ceil(in/8)] (maybe a transposed view)
    scale_inv: torch.Tensor = None      # [ceil(out/bo), ceil(in/bi)] float32, FP8 only
    block: tuple = None                 # (bo, bi), FP8 only
    int4: Int4 = None                   # INT4 only

    @property
    def shape(self):
        if self.int4 is not None:
            return (self.data.shape[0], self.int4.in_features)
        return tuple(self.data.shape)

    @property
    def is_fp8(self):
        return self.scale_inv is not None

    @property
    def is_int4(self):
        return self.int4 is not None

    @property
    def fmt(self):
        """'int4', 'fp8' or the stored dtype's name ('bfloat16', ...)."""
        if self.is_int4:
            return "int4"
        return "fp8" if self.is_fp8 else str(self.data.dtype).replace("torch.", "")

    @property
    def nbytes(self):
        """Bytes as stored (what a pass over the weight reads)."""
        parts = [self.data, self.scale_inv] + ([self.int4.scales, self.int4.zeros]
                                               if self.is_int4 else [])
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def codes(self):
        """INT4: uint8 [out, in] codes, unpacked from the words."""
        return unpack_int4(self.data, self.int4.in_features)

    def dequantize(self, dtype=torch.float32):
        """Exact: FP8, BF16 and INT4 values (a 5-bit integer times a 16-bit scale) are
        all representable in float32."""
        if self.is_int4:
            return dequantize_int4(self.codes(), self.int4).to(dtype)
        if not self.is_fp8:
            return self.data.to(dtype)
        return dequantize_fp8(self.data, self.scale_inv, self.block).to(dtype)

    def to(self, device):
        scale = None if self.scale_inv is None else self.scale_inv.to(device)
        int4 = None if self.int4 is None else self.int4.to(device)
        return Weight(self.data.to(device), scale, self.block, int4)

    def row_slice(self, r0, r1):
        """Rows [r0, r1) (FP8: r0 on a scale block)."""
        if self.is_int4:
            p = self.int4
            zeros = None if p.zeros is None else p.zeros[r0:r1]
            return Weight(self.data[r0:r1], int4=Int4(p.in_features, p.group, p.scales[r0:r1],
                                                       zeros, p.g_idx))
        if self.is_fp8:
            bo = self.block[0]
            assert r0 % bo == 0
            return Weight(self.data[r0:r1], self.scale_inv[r0 // bo:-(-r1 // bo)], self.block)
        return Weight(self.data[r0:r1])


def concat_rows(weights, align=128):
    """Weights of one format and input width stacked by rows (fused q/k/v, gate/up), each
    but the last padded with zero rows to a multiple of `align` (FP8: its scale blocks)."""
    def padded(t, fill=0):
        return [torch.cat([t(w), t(w).new_full((-w.shape[0] % align,) + t(w).shape[1:], fill)])
                for w in weights[:-1]] + [t(weights[-1])]
    first = weights[0]
    data = torch.cat(padded(lambda w: w.data))
    if first.is_int4:
        p = first.int4
        asym = any(w.int4.zeros is not None for w in weights)
        scales = torch.cat(padded(lambda w: w.int4.scales.float()))
        zeros = torch.cat(padded(lambda w: w.int4.zero_points().to(torch.uint8), 8)) if asym else None
        return Weight(data, int4=Int4(p.in_features, p.group, scales, zeros, p.g_idx))
    scale = torch.cat([w.scale_inv for w in weights]) if first.is_fp8 else None
    return Weight(data, scale, first.block)


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


# -- INT4
def unpack_int4(words, n):
    """int32 words [rows, ceil(n/8)] -> uint8 codes [rows, n]: code 8j + i is bits
    4i..4i+3 of word j."""
    w = words.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    codes = (w[:, :, None] >> shifts) & 15                 # [rows, words, 8]
    return codes.reshape(w.shape[0], -1)[:, :n].to(torch.uint8)


def pack_int4(codes):
    """uint8 codes [rows, n] in 0..15 -> int32 words [rows, ceil(n/8)] (unpack_int4's inverse)."""
    rows, n = codes.shape
    pad = torch.zeros(rows, -(-n // 8) * 8, dtype=torch.int64)
    pad[:, :n] = codes.to(torch.int64)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (pad.view(rows, -1, 8) << shifts).sum(-1)       # < 2^32
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def dequantize_int4(codes, p):
    """float32 [out, in] = (code - zero) * scale of (row, group of the column)."""
    g = p.group_index()
    zero = p.zero_points()[:, g]
    return (codes.to(torch.int32) - zero).float() * p.scales.float()[:, g]


def quantize_int4(w, group, scale_dtype=torch.bfloat16, symmetric=True, g_idx=None, min_zero=0):
    """float [out, in] -> (uint8 codes [out, in], Int4) the way GPTQ's / compressed-tensors'
    round-to-nearest publishes it: per (row, group), symmetric scale = amax / 7 rounded to
    scale_dtype, q = clamp(round(w / scale), -8, 7), code = q + 8; asymmetric scale = (max - min) / 15, zero = round(-min / scale),
    code = clamp(round(w / scale) + zero, 0, 15). g_idx [in] (act-order) assigns the
    columns to groups; default k // group. min_zero 1 keeps zero points a GPTQ v1 file
    (zero - 1 in a nibble) can hold."""
    out, inp = w.shape
    g = torch.arange(inp) // group if g_idx is None else g_idx.long()
    ngroups = -(-inp // group)
    w = w.float()
    lo = torch.full((out, ngroups), float("inf")).scatter_reduce(1, g.expand(out, -1), w, "amin")
    hi = torch.full((out, ngroups), -float("inf")).scatter_reduce(1, g.expand(out, -1), w, "amax")
    if symmetric:
        scale = (torch.maximum(hi.abs(), lo.abs()) / 7).clamp(min=1e-8).to(scale_dtype)
        zero = torch.full((out, ngroups), 8, dtype=torch.int32)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(scale_dtype)
        zero = (-lo / scale.float()).round().clamp(min_zero, 15).to(torch.int32)
    codes = (w / scale.float()[:, g]).round() + zero[:, g]
    codes = codes.clamp(0, 15).to(torch.uint8)
    zeros = None if symmetric else zero.to(torch.uint8)
    gi = None if g_idx is None else g_idx.to(torch.int32)
    return codes, Int4(inp, group, scale.contiguous(), zeros, gi)
