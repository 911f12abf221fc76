"""Tiny random Hugging Face checkpoints, laid out exactly as the publishers lay
out the real ones (DeepSeek-V3/R1 FP8, Kimi-K2 FP8, Qwen3-30B-A3B(-FP8),
Mixtral-8x7B, Qwen1.5-MoE / Qwen2-MoE): config.json field spellings, tensor
names, FP8 tensors with float32 `weight_scale_inv` block grids, INT4 as
compressed-tensors `pack-quantized` (Kimi-K2-Thinking's layout: BF16 group
scales, an `ignore` list) or GPTQ (`qweight`, `qzeros`, FP16 `scales`, `g_idx`;
v1 or v2 zero points, symmetric or not, act-order with a real permuted g_idx),
sharded safetensors with an index, generation_config.json and a trained
byte-level BPE tokenizer (Kimi-K2: the same BPE as `tiktoken.model` ranks, no
tokenizer.json).

Dims are small but ragged (160, 136, 296: not multiples of 128, some above it)
so FP8 edge blocks are partial and some dims have several blocks. Weights are
seeded per tensor (same arch, format, seed and overrides -> same bytes) and
scaled so activations stay O(1) and logits and router scores have clear
margins: greedy tokens compared against transformers must not hinge on ties.

Tensors are generated one at a time and streamed into their shard, so a
benchmark-sized model (via `overrides`) never sits in memory twice.
"""
import base64
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moed.errors import ConfigError
from moed.model.formats import (FP8_DTYPE, GPTQ_FORMATS, INT4_GROUPS, block_grid, pack_int4,
                                 quantize_fp8, quantize_int4)
from moed.model.tiktoken_bpe import KIMI_PATTERN, TIKTOKEN_FILE, byte_level_alphabet

ARCHS = ("deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe", "kimi_k2")
LAYOUTS = {"kimi_k2": "deepseek_v3"}     # checkpoint kinds that reuse another's tensors
FORMATS = ("bf16", "fp8", "int4-ct", "int4-gptq")
FP8_BLOCK = (128, 128)
TOKENIZER_VOCAB = 500          # tokenizer size; config vocab_size is padded above it
CORPUS = Path(__file__).with_name("tiny_corpus.txt")

# Init scales (std of the value each tensor produces, inputs being RMS-normed).
LOGIT_STD = 6.0                # final logits: top tokens several units apart
ROUTER_STD = {"softmax": 2.5, "sigmoid": 1.5}   # sigmoid saturates (ties at 1.0) beyond ~4
# Linear layers: output std ~ input rms. Each decoder layer then adds ~0.7x the
# residual's rms to it, so attention and experts matter to the logits (a bug in
# rotary or routing moves them by units) without activations blowing up.
LINEAR_GAIN = 1.0
NORM_JITTER = 0.1              # RMSNorm weights = 1 + N(0, 0.1)


# ---------------------------------------------------------------- config.json

def deepseek_v3_config():
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "attention_dropout": 0.0,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 160,
        "initializer_range": 0.02, "intermediate_size": 296, "kv_lora_rank": 72,
        "max_position_embeddings": 256, "moe_intermediate_size": 136, "moe_layer_freq": 1,
        "n_group": 4, "n_routed_experts": 8, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 4, "num_experts_per_tok": 3, "num_hidden_layers": 3,
        "num_key_value_heads": 4, "num_nextn_predict_layers": 0, "q_lora_rank": 96,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "rms_norm_eps": 1e-6,
        # the published YaRN block (factor 40 over 4096) scaled down: 4 x 64 = 256
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "tie_word_embeddings": False, "topk_group": 2, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 24,
    }


def kimi_k2_config():
    """DeepSeek-V3's architecture under its own model_type; one expert group (the
    router does not limit groups) and the config and modeling code it ships."""
    cfg = deepseek_v3_config()
    cfg.update(model_type="kimi_k2", n_group=1, topk_group=1, routed_scaling_factor=2.827,
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                         "AutoModel": "modeling_deepseek.DeepseekV3Model",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    return cfg


def qwen3_moe_config():
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "attention_dropout": 0.0, "decoder_sparse_step": 1,
        "head_dim": 48, "hidden_act": "silu", "hidden_size": 160, "initializer_range": 0.02,
        "intermediate_size": 296, "max_position_embeddings": 256, "max_window_layers": 3,
        "mlp_only_layers": [0], "moe_intermediate_size": 136, "norm_topk_prob": True,
        "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 4,
        "num_hidden_layers": 3, "num_key_value_heads": 2, "output_router_logits": False,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    }


def mixtral_config():
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 160,
        "initializer_range": 0.02, "intermediate_size": 136, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def qwen2_moe_config():
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "attention_dropout": 0.0, "decoder_sparse_step": 1, "hidden_act": "silu",
        "hidden_size": 160, "initializer_range": 0.02, "intermediate_size": 296,
        "max_position_embeddings": 256, "max_window_layers": 2, "mlp_only_layers": [],
        "moe_intermediate_size": 136, "norm_topk_prob": False, "num_attention_heads": 4,
        "num_experts": 8, "num_experts_per_tok": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 272, "sliding_window": 256,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False,
    }


CONFIGS = {"deepseek_v3": deepseek_v3_config, "qwen3_moe": qwen3_moe_config,
           "mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config,
           "kimi_k2": kimi_k2_config}


def quantization_config(arch, cfg):
    """As published: DeepSeek's block; Qwen3-FP8 also lists what stays BF16."""
    q = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
         "weight_block_size": list(FP8_BLOCK)}
    if arch == "qwen3_moe":
        keep = ["lm_head", "model.embed_tokens"]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            keep += [f"{p}.input_layernorm", f"{p}.post_attention_layernorm",
                     f"{p}.self_attn.q_norm", f"{p}.self_attn.k_norm"]
            if is_sparse(arch, cfg, i):
                keep.append(f"{p}.mlp.gate")
        q["modules_to_not_convert"] = keep + ["model.norm"]
    return q


@dataclass(frozen=True)
class Int4Options:
    """How an INT4 tiny checkpoint is quantized (compressed-tensors: symmetric only)."""
    group_size: int = 32
    sym: bool = True
    desc_act: bool = False                  # GPTQ act-order: a permuted g_idx
    checkpoint_format: str = "gptq"         # GPTQ: "gptq" (v1: zeros - 1) or "gptq_v2"

    @classmethod
    def of(cls, fmt, options):
        o = cls(**(options or {}))
        check_choice(o.group_size, INT4_GROUPS, "group_size")
        if fmt == "int4-ct":
            if not o.sym or o.desc_act:
                raise ConfigError("int4-ct checkpoints are symmetric without act-order "
                                  "(as Kimi-K2-Thinking's)", field="int4")
            return cls(o.group_size, checkpoint_format=None)
        check_choice(o.checkpoint_format, tuple(GPTQ_FORMATS), "checkpoint_format")
        return o


def ct_ignore(arch):
    """What stays BF16: Kimi-K2-Thinking's list for the DeepSeek-V3 architecture (only
    routed experts in INT4); the LM head and routers elsewhere."""
    if arch == "deepseek_v3":
        return ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    return ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$",
            "re:.*block_sparse_moe\\.gate$"]


def int4_quantization_config(arch, fmt, o):
    if fmt == "int4-ct":
        weights = {"actorder": None, "block_structure": None, "dynamic": False,
                   "group_size": o.group_size, "num_bits": 4, "observer": "minmax",
                   "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                   "type": "int"}
        return {"config_groups": {"group_0": {"input_activations": None,
                                              "output_activations": None,
                                              "targets": ["Linear"], "weights": weights}},
                "format": "pack-quantized", "ignore": ct_ignore(arch),
                "kv_cache_scheme": None, "quant_method": "compressed-tensors",
                "quantization_status": "compressed"}
    return {"bits": 4, "checkpoint_format": o.checkpoint_format, "damp_percent": 0.01,
            "desc_act": o.desc_act, "group_size": o.group_size, "model_file_base_name": None,
            "model_name_or_path": None, "quant_method": "gptq", "static_groups": False,
            "sym": o.sym, "true_sequential": True}


# ---------------------------------------------------------------- tokenizer spec

@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens and chat template in the style of one publisher."""
    leading: tuple           # specials at ids 0.. (DeepSeek, Mixtral)
    trailing: tuple          # specials appended after the BPE vocab (Qwen, chat markers);
                             # None: a reserved id (Kimi), named after training
    plain: tuple             # added tokens that are not special (Qwen3's <think>)
    bos: str                 # None when the model has no BOS (Qwen)
    eos: str                 # tokenizer_config eos_token
    generation_eos: tuple    # generation_config eos_token_id, as tokens
    pad: str
    add_bos: bool
    tokenizer_class: str
    max_length: int
    chat_template: str = field(repr=False)
    tiktoken: bool = False   # ships tiktoken.model (split by Kimi's regex), no tokenizer.json


DEEPSEEK_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] -%}{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<｜Assistant｜>' + m['content'] + eos_token -}}"
    "{%- elif m['role'] != 'system' -%}{{- raise_exception('unsupported role ' + m['role']) -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}")

CHATML_TEMPLATE = (
    "{%- if default_system and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}")

MIXTRAL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ...') -}}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}")


KIMI_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_system|>system<|im_middle|>' + default_system + '<|im_end|>' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '<|im_user|>user<|im_middle|>' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}"
    "{%- else -%}{{- '<|im_system|>' + (m.get('name') or m['role']) + '<|im_middle|>' -}}"
    "{%- endif -%}{{- m['content'] + '<|im_end|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_assistant|>assistant<|im_middle|>' -}}"
    "{%- endif -%}")

# Kimi's added tokens follow the BPE ranks: turn markers, tool-call markers, then a
# reserved block closed by [UNK] and [PAD] (256 ids in Kimi-K2, 32 here).
KIMI_ADDED = (("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", None,
               "<|start_header_id|>", "<|end_header_id|>", None, "[EOT]", "<|im_system|>",
               "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
               "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
               None, "<|im_middle|>") + (None,) * 12 + ("[UNK]", "[PAD]"))
KIMI_CHAT = ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
             "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>")


def chatml(default_system):
    return ("{%- set default_system = " + json.dumps(default_system) + " -%}"
            + CHATML_TEMPLATE)


DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOKENIZERS = {
    "deepseek_v3": TokenizerSpec(
        leading=(DS_BOS, DS_EOS, "<｜▁pad▁｜>"), trailing=("<｜User｜>", "<｜Assistant｜>"),
        plain=(), bos=DS_BOS, eos=DS_EOS, generation_eos=(DS_EOS,), pad=DS_EOS, add_bos=True,
        tokenizer_class="LlamaTokenizerFast", max_length=16384,
        chat_template=DEEPSEEK_TEMPLATE),
    "qwen3_moe": TokenizerSpec(
        leading=(), trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        plain=("<think>", "</think>"), bos=None, eos="<|im_end|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>", add_bos=False,
        tokenizer_class="Qwen2Tokenizer", max_length=131072, chat_template=chatml("")),
    "mixtral": TokenizerSpec(
        leading=("<unk>", "<s>", "</s>"), trailing=("[INST]", "[/INST]"), plain=(),
        bos="<s>", eos="</s>", generation_eos=("</s>",), pad=None, add_bos=True,
        tokenizer_class="LlamaTokenizerFast", max_length=1000000000000000019884624838656,
        chat_template=MIXTRAL_TEMPLATE),
    "qwen2_moe": TokenizerSpec(
        leading=(), trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), plain=(),
        bos=None, eos="<|im_end|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
        pad="<|endoftext|>", add_bos=False, tokenizer_class="Qwen2Tokenizer",
        max_length=32768, chat_template=chatml("You are a helpful assistant.")),
    "kimi_k2": TokenizerSpec(
        leading=(), trailing=KIMI_ADDED, plain=(), bos="[BOS]", eos="[EOS]",
        generation_eos=("<|im_end|>",), pad="[PAD]", add_bos=None,
        tokenizer_class="TikTokenTokenizer", max_length=1000000000000000019884624838656,
        chat_template=("{%- set default_system = 'You are a helpful assistant.' -%}"
                       + KIMI_TEMPLATE), tiktoken=True),
}


def train_tokenizer(spec, size, lines=None):
    """Byte-level BPE over `lines` (default: the packaged corpus); deterministic, a few
    ms on the packaged corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([        # what tiktoken does: Kimi's split, then bytes
            pre_tokenizers.Split(Regex(KIMI_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if spec.tiktoken else pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=size - len(spec.trailing) - len(spec.plain), show_progress=False,
        special_tokens=list(spec.leading), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if lines is None:
        lines = CORPUS.read_text(encoding="utf-8").splitlines(True)
    tok.train_from_iterator(lines, trainer)
    first = tok.get_vocab_size()
    tok.add_special_tokens([name or f"<|reserved_token_{first + k}|>"
                            for k, name in enumerate(spec.trailing)])
    tok.add_tokens(list(spec.plain))
    return tok


def added_names(spec, tok):
    """The added tokens' contents in id order, reserved ones named."""
    first = tok.get_vocab_size() - len(spec.trailing) - len(spec.plain)
    return (spec.leading + tuple(tok.id_to_token(first + k) for k in range(len(spec.trailing)))
            + spec.plain)


def tokenizer_config(spec, tok):
    added = {}
    for name in added_names(spec, tok):
        added[str(tok.token_to_id(name))] = {
            "content": name, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": name not in spec.plain}
    if spec.tiktoken:       # as Kimi publishes it: its own tokenizer class, no BOS flags
        return {"added_tokens_decoder": added, "additional_special_tokens": list(KIMI_CHAT),
                "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
                "bos_token": spec.bos, "chat_template": spec.chat_template,
                "clean_up_tokenization_spaces": False, "eos_token": spec.eos,
                "model_max_length": spec.max_length, "pad_token": spec.pad,
                "tokenizer_class": spec.tokenizer_class, "unk_token": "[UNK]"}
    return {"add_bos_token": spec.add_bos, "add_eos_token": False,
            "added_tokens_decoder": added, "bos_token": spec.bos,
            "chat_template": spec.chat_template, "clean_up_tokenization_spaces": False,
            "eos_token": spec.eos, "model_max_length": spec.max_length,
            "pad_token": spec.pad, "tokenizer_class": spec.tokenizer_class,
            "unk_token": "<unk>" if "<unk>" in spec.leading else None,
            **({"legacy": True} if spec.tokenizer_class == "LlamaTokenizerFast" else {})}


def tiktoken_model(tok):
    """The BPE as tiktoken.model lines: ids are ranks (merges were learned in id order)."""
    bytes_of = {ch: b for b, ch in byte_level_alphabet().items()}
    vocab = tok.get_vocab(with_added_tokens=False)
    ranked = sorted((i, bytes(bytes_of[ch] for ch in token)) for token, i in vocab.items())
    return "".join(f"{base64.b64encode(token).decode()} {i}\n" for i, token in ranked)


def generation_config(spec, tok):
    eos = [tok.token_to_id(t) for t in spec.generation_eos]
    gen = {"bos_token_id": tok.token_to_id(spec.bos or "<|endoftext|>"),
           "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if spec.pad:
        gen["pad_token_id"] = tok.token_to_id(spec.pad)
    return gen


# ---------------------------------------------------------------- tensor plan

@dataclass(frozen=True)
class Param:
    """One checkpoint tensor before its storage format is decided."""
    name: str
    shape: tuple
    role: str        # embed | lm_head | norm | linear | router | bias | ecb
    std: float = 1.0


def is_sparse(arch, c, i):
    if arch == "deepseek_v3":
        return i >= c["first_k_dense_replace"] and i % c.get("moe_layer_freq", 1) == 0
    if arch == "mixtral":
        return True
    return i not in (c.get("mlp_only_layers") or []) and (i + 1) % c["decoder_sparse_step"] == 0


def linear(name, out, inp):
    return Param(f"{name}.weight", (out, inp), "linear", LINEAR_GAIN / math.sqrt(inp))


def norm(name, size):
    return Param(f"{name}.weight", (size,), "norm", NORM_JITTER)


def mlp(prefix, D, inter, names=("gate_proj", "up_proj", "down_proj")):
    g, u, d = names
    return [linear(f"{prefix}.{g}", inter, D), linear(f"{prefix}.{u}", inter, D),
            linear(f"{prefix}.{d}", D, inter)]


def gqa_attention(p, c, head_dim, qkv_bias, qk_norm):
    D, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    params = [linear(f"{p}.q_proj", H * head_dim, D), linear(f"{p}.k_proj", KV * head_dim, D),
              linear(f"{p}.v_proj", KV * head_dim, D),
              linear(f"{p}.o_proj", D, H * head_dim)]
    if qkv_bias:
        params[3:3] = [Param(f"{p}.{x}_proj.bias", (n * head_dim,), "bias", 0.2)
                       for x, n in (("q", H), ("k", KV), ("v", KV))]
    if qk_norm:
        params += [norm(f"{p}.q_norm", head_dim), norm(f"{p}.k_norm", head_dim)]
    return params


def mla_attention(p, c):
    D, H, r = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"]
    dn, dr, dv, qr = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["q_lora_rank"]
    q = ([linear(f"{p}.q_a_proj", qr, D), norm(f"{p}.q_a_layernorm", qr),
          linear(f"{p}.q_b_proj", H * (dn + dr), qr)] if qr
         else [linear(f"{p}.q_proj", H * (dn + dr), D)])
    return q + [linear(f"{p}.kv_a_proj_with_mqa", r + dr, D), norm(f"{p}.kv_a_layernorm", r),
                linear(f"{p}.kv_b_proj", H * (dn + dv), r),
                linear(f"{p}.o_proj", D, H * dv)]


def attention(arch, c, i):
    p = f"model.layers.{i}.self_attn"
    if arch == "deepseek_v3":
        return mla_attention(p, c)
    heads_dim = c["hidden_size"] // c["num_attention_heads"]
    if arch == "qwen3_moe":
        return gqa_attention(p, c, c.get("head_dim") or heads_dim, c["attention_bias"], True)
    if arch == "qwen2_moe":
        return gqa_attention(p, c, heads_dim, c.get("qkv_bias", True), False)
    return gqa_attention(p, c, c.get("head_dim") or heads_dim, False, False)


def router(name, E, D, kind):
    return Param(f"{name}.weight", (E, D), "router", ROUTER_STD[kind] / math.sqrt(D))


def sparse_block(arch, c, i):
    D = c["hidden_size"]
    if arch == "mixtral":
        p, E = f"model.layers.{i}.block_sparse_moe", c["num_local_experts"]
        experts = [x for e in range(E) for x in mlp(f"{p}.experts.{e}", D,
                                                    c["intermediate_size"], ("w1", "w3", "w2"))]
        return [router(f"{p}.gate", E, D, "softmax")] + experts
    p, inter = f"model.layers.{i}.mlp", c["moe_intermediate_size"]
    E = c["n_routed_experts"] if arch == "deepseek_v3" else c["num_experts"]
    experts = [x for e in range(E) for x in mlp(f"{p}.experts.{e}", D, inter)]
    if arch == "deepseek_v3":
        return ([router(f"{p}.gate", E, D, "sigmoid"),
                 Param(f"{p}.gate.e_score_correction_bias", (E,), "ecb", 0.1)] + experts
                + mlp(f"{p}.shared_experts", D, inter * c["n_shared_experts"]))
    params = [router(f"{p}.gate", E, D, "softmax")] + experts
    if arch == "qwen2_moe":
        params += mlp(f"{p}.shared_expert", D, c["shared_expert_intermediate_size"])
        params.append(Param(f"{p}.shared_expert_gate.weight", (1, D), "router", 1 / math.sqrt(D)))
    return params


def decoder_layer(arch, c, i):
    p, D = f"model.layers.{i}", c["hidden_size"]
    ffn = (sparse_block(arch, c, i) if is_sparse(arch, c, i)
           else mlp(f"{p}.mlp", D, c["intermediate_size"]))
    return ([norm(f"{p}.input_layernorm", D)] + attention(arch, c, i)
            + [norm(f"{p}.post_attention_layernorm", D)] + ffn)


def model_params(arch, c):
    """Every tensor of the checkpoint, in the order the layers use them (no lm_head
    when the embeddings are tied)."""
    D, V = c["hidden_size"], c["vocab_size"]
    layers = [x for i in range(c["num_hidden_layers"]) for x in decoder_layer(arch, c, i)]
    head = ([] if c.get("tie_word_embeddings")
            else [Param("lm_head.weight", (V, D), "lm_head", LOGIT_STD / math.sqrt(D))])
    return ([Param("model.embed_tokens.weight", (V, D), "embed")] + layers
            + [norm("model.norm", D)] + head)


# ---------------------------------------------------------------- storage format

@dataclass(frozen=True)
class Stored:
    """A tensor as written: name, shape, dtype, and the Param it comes from."""
    name: str
    shape: tuple
    dtype: torch.dtype
    param: Param
    is_scale: bool = False

    @property
    def nbytes(self):
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def is_fp8(param, fmt):
    """Publishers quantize every Linear inside the decoder layers except routers."""
    return fmt == "fp8" and param.role in ("linear")


def is_int4(param, fmt, arch):
    """GPTQ: every Linear in the decoder layers but routers; compressed-tensors: those
    its `ignore` list does not keep."""
    if not fmt.startswith("int4") or param.role != "linear":
        return False
    if fmt == "int4-gptq":
        return True
    from moed.model.formats import QuantConfig
    return not QuantConfig("compressed-tensors", ignore=tuple(ct_ignore(arch))).ignores(
        param.name.removesuffix(".weight"))


def int4_plan(p, fmt, G):
    """The tensors of one INT4 Linear as the format names and shapes them."""
    out, inp = p.shape
    prefix, ng = p.name.removesuffix(".weight"), -(-inp // G)
    if fmt == "int4-ct":
        parts = [("weight_packed", (out, -(-inp // 8)), torch.int32),
                 ("weight_scale", (out, ng), torch.bfloat16), ("weight_shape", (2,), torch.int64)]
    else:
        parts = [("qweight", (inp // 8, out), torch.int32),
                 ("qzeros", (ng, -(-out // 8)), torch.int32),
                 ("scales", (ng, out), torch.float16), ("g_idx", (inp,), torch.int32)]
    return [Stored(f"{prefix}.{n}", shape, dtype, p, is_scale=i > 0)
            for i, (n, shape, dtype) in enumerate(parts)]


def storage_plan(params, fmt, arch="qwen3_moe", int4=None):
    plan = []
    for p in params:
        if is_fp8(p, fmt):
            plan += [Stored(p.name, p.shape, FP8_DTYPE, p),
                     Stored(p.name + "_scale_inv", block_grid(p.shape, FP8_BLOCK),
                            torch.float32, p, is_scale=True)]
        elif is_int4(p, fmt, arch):
            plan += int4_plan(p, fmt, int4.group_size)
        else:
            dtype = torch.float32 if p.role == "ecb" else torch.bfloat16
            plan.append(Stored(p.name, p.shape, dtype, p))
    return plan


def tensor_seed(seed, name):
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def quiet_tokens(tok, vocab_size):
    """[V] bool: ids a trained model almost never emits. Padding rows, and tokens
    that are a piece of a multi-byte character: random weights would otherwise
    sample them next to unrelated bytes, and the streamed text would be full of
    U+FFFD where a real model writes whole characters."""
    quiet = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i], skip_special_tokens=False)
        quiet[i] = "\ufffd" in text or text.startswith("<|reserved_token_")
    return quiet


def init_values(p, seed, quiet):
    """float32 values of one Param, from its own generator (order-independent)."""
    g = torch.Generator().manual_seed(tensor_seed(seed, p.name))
    w = torch.randn(p.shape, generator=g) * p.std
    if p.role == "norm":
        w += 1.0
    if p.role == "lm_head":
        w[quiet] *= 0.1           # logits ~0.6 std against ~20 for the top tokens
    return w


def stored_tensors(plan, values, seed=0, int4=None):
    """Yield (Stored, tensor) in plan order, each Param's float32 values from
    `values(param)` quantized as the plan says; a quantized weight yields data then
    its scales (and zero points, group indices)."""
    pending = {}
    for s in plan:
        if s.is_scale:
            yield s, pending.pop(s.name)
            continue
        w = values(s.param)
        if s.dtype == FP8_DTYPE:
            w, pending[s.name + "_scale_inv"] = quantize_fp8(w, FP8_BLOCK)
        elif s.name.endswith((".weight_packed", ".qweight")):
            parts = int4_tensors(w, s.name.rsplit(".", 1)[0], int4, seed)
            w = parts.pop(s.name)
            pending.update(parts)
        yield s, w.to(s.dtype).contiguous()


def act_order(inp, G, g):
    """A real act-order g_idx [in]: the columns in a random order, cut into groups."""
    perm = torch.randperm(inp, generator=g)
    g_idx = torch.empty(inp, dtype=torch.int32)
    g_idx[perm] = (torch.arange(inp) // G).to(torch.int32)
    return g_idx


def int4_tensors(w, prefix, o, seed):
    """float32 [out, in] -> {name: tensor} in the layout of compressed-tensors (when
    `prefix.weight_packed` is asked for) or GPTQ."""
    out, inp = w.shape
    G = o.group_size
    if o.checkpoint_format is None:     # compressed-tensors
        codes, p = quantize_int4(w, G, torch.bfloat16)
        return {f"{prefix}.weight_packed": pack_int4(codes), f"{prefix}.weight_scale": p.scales,
                f"{prefix}.weight_shape": torch.tensor([out, inp], dtype=torch.int64)}
    g = torch.Generator().manual_seed(tensor_seed(seed, prefix + ".g_idx"))
    g_idx = act_order(inp, G, g) if o.desc_act else None
    v1 = GPTQ_FORMATS[o.checkpoint_format]
    codes, p = quantize_int4(w, G, torch.float16, o.sym, g_idx, min_zero=v1)
    zeros = p.zero_points() - v1                           # as stored: v1 lacks one
    return {f"{prefix}.qweight": pack_int4(codes).t().contiguous(),
            f"{prefix}.qzeros": pack_int4(zeros.t().contiguous().to(torch.uint8)),
            f"{prefix}.scales": p.scales.t().contiguous(),
            f"{prefix}.g_idx": (p.group_index() if g_idx is None else g_idx).to(torch.int32)}


# ---------------------------------------------------------------- safetensors writer

SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", FP8_DTYPE: "F8_E4M3",
                     torch.float16: "F16", torch.int32: "I32", torch.int64: "I64"}


def safetensors_header(items):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in items:
        header[s.name] = {"dtype": SAFETENSORS_DTYPE[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)       # data starts 8-byte aligned


def write_shard(path, items, tensors):
    """Header first (offsets known from the plan), then each tensor as it is made."""
    header = safetensors_header(items)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for s in items:
            got, t = next(tensors)
            assert got is s and tuple(t.shape) == s.shape and t.dtype == s.dtype, s.name
            f.write(t.view(torch.uint8).numpy().data)


def shard_bounds(sizes, num_shards):
    """Start index of each shard: about equal bytes, none empty."""
    total, starts, acc, k = sum(sizes), [0], 0, 1
    for i, n in enumerate(sizes):
        if k < num_shards and acc >= total * k / num_shards and i > starts[-1]:
            starts.append(i)
            k += 1
        acc += n
    while len(starts) < num_shards:     # huge last tensors: peel one off per shard
        starts.append(len(sizes) - num_shards + len(starts))
    return sorted(set(starts))


def write_checkpoint(out_dir, plan, tensors, num_shards):
    if num_shards < 1 or num_shards > len(plan):
        raise ConfigError(f"num_shards must be 1..{len(plan)}, got {num_shards}",
                          field="num_shards")
    if num_shards == 1:
        write_shard(out_dir / "model.safetensors", plan, tensors)
        return
    starts = shard_bounds([s.nbytes for s in plan], num_shards) + [len(plan)]
    weight_map = {}
    for k in range(num_shards):
        name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        items = plan[starts[k]:starts[k + 1]]
        write_shard(out_dir / name, items, tensors)
        weight_map.update({s.name: name for s in items})
    index = {"metadata": {"total_size": sum(s.nbytes for s in plan)},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / "model.safetensors.index.json", index)


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- the builder

def padded_vocab(arch, size):
    """Mixtral's vocab is exact; DeepSeek and Qwen pad the embedding (to 64 here)."""
    return size if arch == "mixtral" else -(-size // 64) * 64


def model_config(arch, fmt, tok, spec, overrides, tokenizer_vocab, int4=None):
    cfg = CONFIGS[arch]()
    gen = generation_config(spec, tok)
    cfg.update(bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"],
               vocab_size=padded_vocab(arch, tok.get_vocab_size()))
    cfg.update(overrides or {})
    if cfg["vocab_size"] < tok.get_vocab_size():
        raise ConfigError(f"vocab_size {cfg['vocab_size']} is below the tokenizer's "
                          f"{tok.get_vocab_size()} tokens (tokenizer_vocab={tokenizer_vocab})",
                          field="vocab_size")
    if fmt == "fp8":
        cfg["quantization_config"] = quantization_config(LAYOUTS.get(arch, arch), cfg)
    if fmt.startswith("int4"):
        cfg["quantization_config"] = int4_quantization_config(LAYOUTS.get(arch, arch), fmt, int4)
    return dict(sorted(cfg.items()))


def check_choice(value, choices, what):
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, choices))}, got {value!r}",
                          field=what)


def build_tiny_model(out_dir, arch, fmt="bf16", seed=0, num_shards=2, overrides=None,
                     tokenizer_vocab=TOKENIZER_VOCAB, int4=None):
    """Write a tiny random checkpoint of `arch` in `fmt` into out_dir; returns its path.
    int4: Int4Options fields for the INT4 formats (group_size, sym, desc_act,
    checkpoint_format)."""
    check_choice(arch, ARCHS, "arch")
    check_choice(fmt, FORMATS, "format")
    int4 = Int4Options.of(fmt, int4) if fmt.startswith("int4") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tensors this small only lose time waking a thread pool
    try:
        return write_model(Path(out_dir), arch, fmt, seed, num_shards, overrides,
                           tokenizer_vocab, int4)
    finally:
        torch.set_num_threads(threads)


def write_model(out, arch, fmt, seed, num_shards, overrides, tokenizer_vocab, int4=None):
    spec, tok, cfg = tokenizer_and_config(arch, fmt, overrides, tokenizer_vocab, int4)
    quiet = quiet_tokens(tok, cfg["vocab_size"])
    return write_model_dir(out, arch, fmt, spec, tok, cfg,
                           lambda p: init_values(p, seed, quiet), num_shards, int4, seed)


def tokenizer_and_config(arch, fmt, overrides=None, tokenizer_vocab=TOKENIZER_VOCAB, int4=None,
                         corpus_lines=None):
    """The tokenizer spec, a BPE trained on corpus_lines (default: the packaged corpus)
    and config.json's contents for a checkpoint of `arch` in `fmt`."""
    spec = TOKENIZERS[arch]
    size = min(tokenizer_vocab, (overrides or {}).get("vocab_size", 1 << 30))
    tok = train_tokenizer(spec, size, corpus_lines)
    return spec, tok, model_config(arch, fmt, tok, spec, overrides, tokenizer_vocab, int4)


def write_model_dir(out, arch, fmt, spec, tok, cfg, values, num_shards=1, int4=None, seed=0):
    """Write a checkpoint directory: the tensors model_params lists for cfg, each
    Param's float32 values from `values(param)` stored in `fmt` (random ones for the
    tiny models, trained ones for the demo model), config, tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = LAYOUTS.get(arch, arch)
    plan = storage_plan(model_params(layout, cfg), fmt, layout, int4)
    write_checkpoint(out, plan, stored_tensors(plan, values, seed, int4), num_shards)
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", generation_config(spec, tok))
    write_json(out / "tokenizer_config.json", tokenizer_config(spec, tok))
    if spec.tiktoken:
        (out / TIKTOKEN_FILE).write_text(tiktoken_model(tok), encoding="ascii")
    else:
        (out / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    return out
