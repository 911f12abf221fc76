"""FP8 block-scale dequantization is exact, including partial edge blocks."""
import pytest
import torch

from moed.errors import CheckpointError
from moed.model.formats import QuantConfig, Weight, block_grid, dequantize_fp8, quantize_fp8


@pytest.mark.parametrize("shape", [(128, 128), (200, 136), (7, 300), (257, 129)])
def test_dequantize_matches_per_element_definition(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 3
    data, scale = quantize_fp8(w)
    assert data.dtype == torch.float8_e4m3fn
    assert tuple(scale.shape) == block_grid(shape, (128, 128))
    deq = dequantize_fp8(data, scale, (128, 128))
    # definition: element (i, j) times the scale of block (i // 128, j // 128)
    rows = torch.arange(shape[0])[:, None] // 128
    cols = torch.arange(shape[1])[None, :] // 128
    assert torch.equal(deq, data.float() * scale[rows, cols])
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 of the block's scale range
    assert (deq - w).abs().max() <= (scale[rows, cols] * 448 * 2 ** -4).max()


def test_weight_dequantize_plain_is_exact_upcast():
    w = torch.randn(5, 7).to(torch.bfloat16)
    assert torch.equal(Weight(w).dequantize(), w.float())


def test_quant_config_reads_published_fields():
    q = QuantConfig.from_hf({"quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128]}})
    assert q.block_size == (128, 128)
    assert QuantConfig.from_hf({}) is None


@pytest.mark.parametrize("qc,culprit", [
    ({"quant_method": "awq"}, "quant_method"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt"),
])
def test_unsupported_quantization_names_the_field(qc, culprit):
    with pytest.raises(CheckpointError, match=culprit):
        QuantConfig.from_hf({"quantization_config": qc})


# -- INT4: compressed-tensors pack-quantized and GPTQ
from safetensors import safe_open                                            # noqa: E402

from moed.model.checkpoint import Checkpoint                                 # noqa: E402
from moed.model.formats import pack_int4, quantize_int4, unpack_int4         # noqa: E402
from moed.testing.tiny import build_tiny_model                               # noqa: E402


def raw_tensors(model_dir):
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def nibble(word, i):
    return (int(word) >> (4 * i)) & 15


def test_int4_words_round_trip():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 37), generator=g, dtype=torch.uint8)
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and tuple(words.shape) == (5, 5)
    assert torch.equal(unpack_int4(words, 37), codes)
    assert nibble(words[2, 3], 4) == codes[2, 28]          # code 8j + i: bits 4i of word j


@pytest.mark.parametrize("sym", [True, False])
def test_quantize_int4_is_round_to_nearest_within_half_a_step(sym):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 96, generator=g)
    codes, p = quantize_int4(w, 32, torch.float16, symmetric=sym)
    deq = Weight(pack_int4(codes), int4=p).dequantize()
    step = p.scales.float().repeat_interleave(32, 1)
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()


def test_compressed_tensors_layout_as_published(tmp_path):
    # per element, from the raw tensors: code of column k is nibble k % 8 of word k // 8,
    # value (code - 8) * weight_scale[o, k // G]
    d = build_tiny_model(tmp_path / "m", "qwen3_moe", "int4-ct")
    raw, ckpt = raw_tensors(d), Checkpoint(d)
    prefix = "model.layers.1.mlp.experts.3.down_proj"
    packed, scale = raw[f"{prefix}.weight_packed"], raw[f"{prefix}.weight_scale"]
    out, inp = raw[f"{prefix}.weight_shape"].tolist()
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (out, -(-inp // 8))
    assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (out, -(-inp // 32))
    deq = ckpt.weight(prefix, out, inp).dequantize()
    for o, k in [(0, 0), (7, 9), (out - 1, inp - 1), (50, 100)]:
        want = (nibble(packed[o, k // 8], k % 8) - 8) * float(scale[o, k // 32])
        assert deq[o, k].item() == want
    # what `ignore` keeps stays BF16; routers are not quantized targets
    assert "lm_head.weight" in raw and "model.layers.1.mlp.gate.weight" in raw
    assert ckpt.weight("model.layers.1.mlp.gate", 8, 160).fmt == "bfloat16"
    assert ckpt.weight("model.layers.0.self_attn.q_proj", 192, 160).is_int4


@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, False), (False, True)])
def test_gptq_layout_as_published(tmp_path, sym, desc_act):
    # qweight [in/8, out]: row k's code is nibble k % 8 of qweight[k // 8, o]; qzeros
    # [groups, out/8] hold zero - 1 (v1); the group of column k is g_idx[k]
    d = build_tiny_model(tmp_path / "m", "qwen3_moe", "int4-gptq",
                         int4={"sym": sym, "desc_act": desc_act, "group_size": 32})
    raw, ckpt = raw_tensors(d), Checkpoint(d)
    prefix = "model.layers.1.mlp.experts.2.gate_proj"
    qw, qz, sc, gi = (raw[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx"))
    inp, out = qw.shape[0] * 8, qw.shape[1]
    assert sc.dtype == torch.float16 and tuple(sc.shape) == (-(-inp // 32), out)
    assert tuple(qz.shape) == (-(-inp // 32), -(-out // 8)) and tuple(gi.shape) == (inp,)
    if desc_act:
        assert not torch.equal(gi.long(), torch.arange(inp) // 32)     # a real permutation
        assert torch.equal(torch.bincount(gi.long()), torch.full((inp // 32,), 32))
    w = ckpt.weight(prefix, out, inp)
    deq = w.dequantize()
    for o, k in [(0, 0), (5, 77), (out - 1, inp - 1), (100, 131)]:
        g = int(gi[k])
        zero = nibble(qz[g, o // 8], o % 8) + 1
        want = (nibble(qw[k // 8, o], k % 8) - zero) * float(sc[g, o])
        assert deq[o, k].item() == want
    assert (w.int4.zeros is None) == sym


def test_gptq_v1_and_v2_store_the_same_weights(tmp_path):
    v1 = build_tiny_model(tmp_path / "v1", "qwen3_moe", "int4-gptq",
                          int4={"sym": False, "checkpoint_format": "gptq"})
    v2 = build_tiny_model(tmp_path / "v2", "qwen3_moe", "int4-gptq",
                          int4={"sym": False, "checkpoint_format": "gptq_v2"})
    p = "model.layers.1.mlp.experts.0.up_proj"
    z1, z2 = raw_tensors(v1)[f"{p}.qzeros"], raw_tensors(v2)[f"{p}.qzeros"]
    assert nibble(z1[0, 0], 0) + 1 == nibble(z2[0, 0], 0)          # v1 stores zero - 1
    a, b = Checkpoint(v1).weight(p, 136, 160), Checkpoint(v2).weight(p, 136, 160)
    assert torch.equal(a.dequantize(), b.dequantize())


def ct_config(**weights):
    w = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
         "symmetric": True, "dynamic": False, "actorder": None}
    w.update(weights)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"weights": w, "input_activations": None,
                                          "targets": ["Linear"]}}, "ignore": ["lm_head"]}


def gptq_config(**fields):
    q = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    q.update(fields)
    return q


@pytest.mark.parametrize("qc,culprit", [
    (ct_config(num_bits=8), "num_bits"),
    (ct_config(group_size=16), "group_size"),
    (ct_config(symmetric=False), "symmetric"),
    (ct_config(strategy="channel"), "strategy"),
    (ct_config(actorder="group"), "actorder"),
    ({**ct_config(), "format": "float-quantized"}, "format"),
    (gptq_config(bits=3), "bits"),
    (gptq_config(group_size=-1), "group_size"),
    (gptq_config(checkpoint_format="marlin"), "checkpoint_format"),
    (gptq_config(desc_act="yes"), "desc_act"),
])
def test_unsupported_int4_configs_name_the_field(qc, culprit):
    with pytest.raises(CheckpointError, match=culprit):
        QuantConfig.from_hf({"quantization_config": qc})


def test_int4_configs_as_published():
    q = QuantConfig.from_hf({"quantization_config": ct_config()})
    assert (q.method, q.group_size, q.ignores("lm_head"), q.ignores("model.lm")) == \
        ("compressed-tensors", 32, True, False)
    q = QuantConfig.from_hf({"quantization_config": gptq_config(checkpoint_format="gptq_v2")})
    assert (q.method, q.group_size, q.zero_offset) == ("gptq", 128, 0)
    assert QuantConfig.from_hf({"quantization_config": gptq_config()}).zero_offset == 1


def broken_copy(src, dst, drop=None, config=None):
    import json
    import shutil
    from safetensors.torch import save_file
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors = {n: t for n, t in raw_tensors(src).items() if n != drop}
    save_file(tensors, str(dst / "model.safetensors"))
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_int4_tensors_name_the_tensor(tmp_path):
    d = build_tiny_model(tmp_path / "m", "qwen3_moe", "int4-gptq", int4={"desc_act": True})
    p = "model.layers.1.mlp.experts.0.up_proj"
    bad = broken_copy(d, tmp_path / "no-gidx", drop=f"{p}.g_idx")
    with pytest.raises(CheckpointError, match=f"{p}.g_idx"):
        Checkpoint(bad).weight(p, 136, 160)
    with pytest.raises(CheckpointError, match=f"{p}.qweight"):
        Checkpoint(d).weight(p, 136, 168)                   # shape against the config's
    ct = build_tiny_model(tmp_path / "ct", "qwen3_moe", "int4-ct")
    q = "model.layers.0.self_attn.q_proj"
    bad = broken_copy(ct, tmp_path / "ignored", config={"ignore": [q]})
    with pytest.raises(CheckpointError, match=f"{q}.weight_packed"):
        Checkpoint(bad).weight(q, 192, 160)


def test_kimi_k2_model_type_loads_as_deepseek_v3(tmp_path):
    from moed.model.registry import model_class
    d = build_tiny_model(tmp_path / "k", "deepseek_v3", "int4-ct",
                         overrides={"model_type": "kimi_k2"})
    ckpt = Checkpoint(d)
    assert ckpt.config["model_type"] == "kimi_k2"
    assert model_class(ckpt.config).architecture == "DeepseekV3ForCausalLM"
