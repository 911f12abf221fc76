"""Broken checkpoints and bad requests raise moed errors that name the culprit."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moed import LLM, SamplingParams
from moed.errors import (CheckpointError, ConfigError, InvalidRequestError, MoedError,
                         UnsupportedArchitectureError)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen3_moe", "fp8"), dst)
    return dst


def shard_of(model_dir, name):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][name]


def load(model_dir):
    return LLM(model_dir, device="cpu", experts="torch")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load(tmp_path / "nope")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load(model_copy)


def test_invalid_config_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load(model_copy)


def test_missing_shard(model_copy):
    shard = shard_of(model_copy, "model.embed_tokens.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load(model_copy)


def test_truncated_shard(model_copy):
    shard = shard_of(model_copy, "model.embed_tokens.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load(model_copy)


def test_unsupported_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        load(model_copy)


def test_missing_config_field(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg["num_experts"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_experts") as e:
        load(model_copy)
    assert e.value.field == "num_experts"


def rewrite_shard(model_dir, name, change):
    shard = shard_of(model_dir, name)
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_missing_tensor(model_copy):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    rewrite_shard(model_copy, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="experts.3.down_proj") as e:
        load(model_copy)
    assert e.value.tensor == name


def test_wrong_shape(model_copy):
    name = "model.layers.0.self_attn.o_proj.weight"

    def shrink(t):
        t[name] = t[name][:-1].contiguous()
    rewrite_shard(model_copy, name, shrink)
    with pytest.raises(CheckpointError, match="o_proj") as e:
        load(model_copy)
    assert "shape" in str(e.value)


def test_missing_block_scale(model_copy):
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    rewrite_shard(model_copy, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="q_proj.weight_scale_inv"):
        load(model_copy)


def test_wrong_scale_grid(model_copy):
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"

    def widen(t):
        t[name] = torch.ones(t[name].shape[0], t[name].shape[1] + 1)
    rewrite_shard(model_copy, name, widen)
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        load(model_copy)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("qwen3_moe", "bf16"), device="cpu", experts="torch")


def test_token_ids_outside_vocab(llm):
    V = llm.model_info["vocab_size"]
    for bad in ([1, V], [-1]):
        with pytest.raises(InvalidRequestError, match="token_ids") as e:
            llm.generate([bad], SamplingParams(max_new_tokens=2))
        assert e.value.field == "token_ids"
    with pytest.raises(InvalidRequestError, match="token_ids"):
        llm.logits([0, V + 5])


def test_prompt_longer_than_context(llm):
    ctx = llm.model_info["context_length"]
    with pytest.raises(InvalidRequestError, match="context") as e:
        llm.generate([[1] * ctx], SamplingParams(max_new_tokens=1))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="max_new_tokens") as e:
        llm.generate([[1] * (ctx - 4)], SamplingParams(max_new_tokens=8))
    assert e.value.field == "max_new_tokens"


def test_empty_prompt(llm):
    for empty in ("", []):
        with pytest.raises(InvalidRequestError) as e:
            llm.engine.add_request(empty, SamplingParams())
        assert e.value.field == "prompt"


def test_bad_request_leaves_engine_clean(llm):
    with pytest.raises(MoedError):
        llm.generate([[10**9]], SamplingParams())
    stats = llm.engine.stats()
    assert {k: stats[k] for k in ("num_running", "num_waiting", "kv_blocks_used",
                                  "kv_blocks_total", "prefix_cache_queries")} == {
        "num_running": 0, "num_waiting": 0, "kv_blocks_used": 0,
        "kv_blocks_total": llm.engine.blocks.num_blocks, "prefix_cache_queries": 0}
    assert len(llm.generate(["ok"], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
               .token_ids) == 3
