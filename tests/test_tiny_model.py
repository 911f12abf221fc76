"""The tiny checkpoint builder writes what the publishers write: config fields,
tensor names, FP8 tensors with block scales, shards with a consistent index,
and a model transformers loads without missing keys and with peaked logits."""
import json
import re

import pytest
import torch
from safetensors import safe_open

from moed.errors import ConfigError
from moed.model.formats import FP8_DTYPE, dequantize_fp8
from moed.testing.tiny import build_tiny_model

from hf_reference import hf_model

ARCHS = ["deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe"]
FORMATS = ["bf16", "fp8"]
BLOCK = 128

# config.json fields each publisher spells this way (beyond the common ones)
COMMON_FIELDS = {"architectures", "model_type", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "tie_word_embeddings", "torch_dtype", "bos_token_id", "eos_token_id"}
ARCH_FIELDS = {
    "deepseek_v3": {"moe_intermediate_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
                    "num_experts_per_tok", "n_group", "topk_group", "topk_method",
                    "scoring_func", "norm_topk_prob", "routed_scaling_factor",
                    "first_k_dense_replace", "moe_layer_freq", "rope_scaling"},
    "qwen3_moe": {"head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "rope_scaling"},
    "mixtral": {"num_local_experts", "num_experts_per_tok", "sliding_window"},
    "qwen2_moe": {"moe_intermediate_size", "shared_expert_intermediate_size", "num_experts",
                  "num_experts_per_tok", "decoder_sparse_step", "mlp_only_layers",
                  "norm_topk_prob"},
}
ARCHITECTURE = {"deepseek_v3": "DeepseekV3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# a few names exactly as in the published checkpoints (layer 1 is a sparse layer)
PUBLISHED_NAMES = {
    "deepseek_v3": ["model.layers.0.mlp.gate_proj.weight",
                    "model.layers.1.self_attn.q_a_proj.weight",
                    "model.layers.1.self_attn.q_a_layernorm.weight",
                    "model.layers.1.self_attn.q_b_proj.weight",
                    "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                    "model.layers.1.self_attn.kv_a_layernorm.weight",
                    "model.layers.1.self_attn.kv_b_proj.weight",
                    "model.layers.1.self_attn.o_proj.weight",
                    "model.layers.1.mlp.gate.weight",
                    "model.layers.1.mlp.gate.e_score_correction_bias",
                    "model.layers.1.mlp.experts.7.gate_proj.weight",
                    "model.layers.1.mlp.shared_experts.up_proj.weight"],
    "qwen3_moe": ["model.layers.0.mlp.down_proj.weight",
                  "model.layers.1.self_attn.q_norm.weight",
                  "model.layers.1.self_attn.k_norm.weight",
                  "model.layers.1.mlp.gate.weight",
                  "model.layers.1.mlp.experts.7.down_proj.weight"],
    "mixtral": ["model.layers.1.block_sparse_moe.gate.weight",
                "model.layers.1.block_sparse_moe.experts.7.w1.weight",
                "model.layers.1.block_sparse_moe.experts.7.w2.weight",
                "model.layers.1.block_sparse_moe.experts.7.w3.weight",
                "model.layers.1.self_attn.k_proj.weight"],
    "qwen2_moe": ["model.layers.1.self_attn.q_proj.bias",
                  "model.layers.1.self_attn.k_proj.bias",
                  "model.layers.1.self_attn.v_proj.bias",
                  "model.layers.1.mlp.shared_expert.gate_proj.weight",
                  "model.layers.1.mlp.shared_expert_gate.weight",
                  "model.layers.1.mlp.experts.7.up_proj.weight"],
}
ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|shared_expert_gate)\.weight$")


def read_all(model_dir):
    """name -> (tensor, shard file name) over every *.safetensors in the directory."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = (f.get_tensor(name), path.name)
    return out


def config(model_dir):
    return json.loads((model_dir / "config.json").read_text())


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_config_as_published(tiny_model_dir, arch, fmt):
    d = tiny_model_dir(arch, fmt)
    c, gen = config(d), json.loads((d / "generation_config.json").read_text())
    assert COMMON_FIELDS | ARCH_FIELDS[arch] <= set(c)
    assert c["architectures"] == [ARCHITECTURE[arch]] and c["model_type"] == arch
    assert c["eos_token_id"] == gen["eos_token_id"] and c["bos_token_id"] == gen["bos_token_id"]
    tok = json.loads((d / "tokenizer.json").read_text())
    n_tokens = len(tok["model"]["vocab"]) + sum(
        t["content"] not in tok["model"]["vocab"] for t in tok["added_tokens"])
    assert c["vocab_size"] >= n_tokens
    if fmt == "fp8":
        q = c["quantization_config"]
        assert q["quant_method"] == "fp8" and q["weight_block_size"] == [BLOCK, BLOCK]
        assert q["activation_scheme"] == "dynamic" and q["fmt"] == "e4m3"
    else:
        assert "quantization_config" not in c


def test_deepseek_routing_and_yarn_fields(tiny_model_dir):
    c = config(tiny_model_dir("deepseek_v3", "fp8"))
    assert c["topk_method"] == "noaux_tc" and c["scoring_func"] == "sigmoid"
    assert c["n_routed_experts"] % c["n_group"] == 0 and c["topk_group"] < c["n_group"]
    rs = c["rope_scaling"]
    assert rs["type"] == "yarn"
    assert {"beta_fast", "beta_slow", "mscale", "mscale_all_dim"} <= set(rs)
    assert rs["factor"] * rs["original_max_position_embeddings"] == c["max_position_embeddings"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_kimi_k2_is_deepseek_v3_with_a_tiktoken_tokenizer(tiny_model_dir, fmt):
    """Kimi-K2 as published: DeepSeek-V3's architecture and tensors under model_type
    kimi_k2, remote code named in auto_map, tiktoken.model and no tokenizer.json."""
    d, ds = tiny_model_dir("kimi_k2", fmt), tiny_model_dir("deepseek_v3", fmt)
    c = config(d)
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "kimi_k2"
    assert COMMON_FIELDS | ARCH_FIELDS["deepseek_v3"] <= set(c)
    assert c["n_group"] == c["topk_group"] == 1 and "AutoModelForCausalLM" in c["auto_map"]
    assert (d / "tiktoken.model").is_file() and not (d / "tokenizer.json").exists()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "TikTokenTokenizer" and "add_bos_token" not in tc
    assert tc["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    ranks = len((d / "tiktoken.model").read_text().splitlines())
    assert min(map(int, tc["added_tokens_decoder"])) == ranks
    assert c["vocab_size"] >= ranks + len(tc["added_tokens_decoder"])
    assert set(read_all(d)) == set(read_all(ds))


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_names_as_published(tiny_model_dir, arch):
    bf16 = read_all(tiny_model_dir(arch, "bf16"))
    fp8 = read_all(tiny_model_dir(arch, "fp8"))
    for name in PUBLISHED_NAMES[arch] + ["model.embed_tokens.weight", "model.norm.weight",
                                         "lm_head.weight",
                                         "model.layers.0.input_layernorm.weight",
                                         "model.layers.0.post_attention_layernorm.weight"]:
        assert name in bf16 and name in fp8, name
    # FP8 adds exactly one scale per quantized weight and nothing else
    assert set(fp8) - set(bf16) == {n + "_scale_inv" for n, (t, _) in fp8.items()
                                    if t.dtype == FP8_DTYPE}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_tensors_follow_the_publishers(tiny_model_dir, arch):
    tensors = read_all(tiny_model_dir(arch, "fp8"))
    partial_edges = multi_block = 0
    for name, (t, _) in tensors.items():
        in_layer_linear = (name.startswith("model.layers.") and name.endswith(".weight")
                           and t.dim() == 2 and not ROUTER.search(name))
        if name.endswith("_scale_inv"):
            w = tensors[name[:-len("_scale_inv")]][0]
            assert w.dtype == FP8_DTYPE and t.dtype == torch.float32
            assert tuple(t.shape) == (-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK))
            partial_edges += bool(w.shape[0] % BLOCK or w.shape[1] % BLOCK)
            multi_block += max(t.shape) >= 2
        elif in_layer_linear:
            assert t.dtype == FP8_DTYPE, name
            assert name + "_scale_inv" in tensors, name
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
        else:                         # embeddings, lm_head, norms, routers, biases
            assert t.dtype == torch.bfloat16, name
    assert partial_edges and multi_block


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_checkpoint_is_all_bf16(tiny_model_dir, arch):
    for name, (t, _) in read_all(tiny_model_dir(arch, "bf16")).items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name


def test_dims_ragged_with_dense_layers(tiny_model_dir):
    ds = config(tiny_model_dir("deepseek_v3", "bf16"))
    qw = config(tiny_model_dir("qwen3_moe", "bf16"))
    for c in (ds, qw):
        assert c["hidden_size"] % BLOCK and c["hidden_size"] > BLOCK
        assert c["moe_intermediate_size"] % BLOCK and c["intermediate_size"] > 2 * BLOCK
    assert ds["first_k_dense_replace"] == 1 and qw["mlp_only_layers"] == [0]
    assert qw["head_dim"] != qw["hidden_size"] // qw["num_attention_heads"]


def test_fp8_dequantizes_to_the_bf16_weights(tiny_model_dir):
    """Both formats come from the same float32 values: e4m3 keeps 3 mantissa bits,
    so each FP8 weight x its block scale is within ~2^-4 of the BF16 one. A scale
    grid placed wrongly (transposed, off by a block) would be off by far more."""
    bf16 = read_all(tiny_model_dir("qwen3_moe", "bf16"))
    fp8 = read_all(tiny_model_dir("qwen3_moe", "fp8"))
    checked = 0
    for name, (t, _) in fp8.items():
        if t.dtype != FP8_DTYPE:
            continue
        deq = dequantize_fp8(t, fp8[name + "_scale_inv"][0], (BLOCK, BLOCK))
        ref = bf16[name][0].float()
        err = ((deq - ref).abs() / ref.abs().clamp(min=1e-3)).median()
        assert err < 2 ** -4, (name, err)
        assert (deq - ref).abs().max() <= ref.abs().max() / 8, name
        checked += 1
    assert checked > 50


def test_qwen3_fp8_keeps_listed_modules_bf16(tiny_model_dir):
    d = tiny_model_dir("qwen3_moe", "fp8")
    keep = config(d)["quantization_config"]["modules_to_not_convert"]
    tensors = read_all(d)
    assert "lm_head" in keep and "model.layers.1.mlp.gate" in keep
    for module in keep:
        matches = [t for n, (t, _) in tensors.items() if n.startswith(module + ".")]
        assert matches and all(t.dtype != FP8_DTYPE for t in matches), module


# ---------------------------------------------------------------- shards

@pytest.mark.parametrize("arch", ARCHS)
def test_index_matches_the_shards(tiny_model_dir, arch):
    d = tiny_model_dir(arch, "fp8")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    tensors = read_all(d)
    assert index["weight_map"] == {n: shard for n, (_, shard) in tensors.items()}
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total = sum(t.numel() * t.element_size() for t, _ in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert not (d / "model.safetensors").exists()


def test_single_and_many_shards(tmp_path):
    one = build_tiny_model(tmp_path / "one", "mixtral", "fp8", num_shards=1)
    assert [p.name for p in one.glob("*.safetensors")] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    five = build_tiny_model(tmp_path / "five", "mixtral", "fp8", num_shards=5)
    index = json.loads((five / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5
    assert {n: (t.dtype, t.shape) for n, (t, _) in read_all(five).items()} == {
        n: (t.dtype, t.shape) for n, (t, _) in read_all(one).items()}


# ---------------------------------------------------------------- transformers

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_it_with_peaked_logits(tiny_model_dir, arch, fmt):
    """hf_model asserts no missing/unexpected/mismatched keys. Logits must be
    peaked (std of several units, clear top-1 margins, varied argmax) so greedy
    comparisons are not decided by near-ties."""
    ref = hf_model(tiny_model_dir(arch, fmt))
    ids = torch.randint(0, 480, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ref(ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    print(f"\n{arch} {fmt}: logit std {logits.std():.2f}, top-1 margin median "
          f"{margins.median():.2f} min {margins.min():.3f}")
    assert torch.isfinite(logits).all()
    assert logits.std() > 3 and margins.median() > 0.5 and margins.min() > 1e-3
    assert logits.argmax(-1).unique().numel() > 10


# ---------------------------------------------------------------- determinism, options

def test_same_seed_same_bytes(tmp_path):
    a = build_tiny_model(tmp_path / "a", "deepseek_v3", "fp8", seed=3)
    b = build_tiny_model(tmp_path / "b", "deepseek_v3", "fp8", seed=3)
    c = build_tiny_model(tmp_path / "c", "deepseek_v3", "fp8", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names
               if n.endswith(".safetensors"))


def test_overrides_reshape_the_model(tmp_path):
    d = build_tiny_model(tmp_path / "m", "qwen3_moe", "fp8", overrides={
        "hidden_size": 288, "num_hidden_layers": 4, "num_experts": 16, "mlp_only_layers": []})
    c, tensors = config(d), read_all(d)
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_experts"]) == (288, 4, 16)
    assert tensors["model.layers.3.mlp.experts.15.gate_proj.weight"][0].shape == (136, 288)
    assert tensors["model.layers.0.mlp.gate.weight"][0].shape == (16, 288)
    assert tensors["model.layers.3.mlp.experts.15.gate_proj.weight_scale_inv"][0].shape == (2, 3)


def test_cli(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "tools" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "m"
    assert cli.main(["--arch", "mixtral", "--format", "fp8", "--out", str(out), "--shards", "3",
                     "--tokenizer-vocab", "900",
                     "--set", "num_hidden_layers=3", "--set", "num_local_experts=4"]) == 0
    c = config(out)
    assert c["num_hidden_layers"] == 3 and c["num_local_experts"] == 4
    assert 500 < c["vocab_size"] <= 900         # Mixtral's vocab is the tokenizer's, unpadded
    assert len(list(out.glob("model-*-of-00003.safetensors"))) == 3
    assert cli.main(["--arch", "mixtral", "--out", str(tmp_path / "x"),
                     "--set", "vocab_size=100"]) == 2
    assert "vocab_size" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,field", [
    ({"arch": "llama"}, "arch"), ({"arch": "mixtral", "fmt": "int4"}, "format"),
    ({"arch": "mixtral", "num_shards": 0}, "num_shards"),
    ({"arch": "qwen3_moe", "overrides": {"vocab_size": 64}}, "vocab_size")])
def test_bad_options_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(ConfigError) as e:
        build_tiny_model(tmp_path / "m", **kwargs)
    assert e.value.field == field and field in str(e.value)
