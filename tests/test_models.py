"""Every architecture x {BF16, FP8} against transformers on the same checkpoint.

Tolerance: moed and the reference both compute in float32 on the *same*
dequantized weights (FP8 x block scale is exact in float32), so the only
difference is floating-point summation order: about sqrt(K) * 2^-24 relative
per dot product of length K (K < 600 here) compounded over a few layers —
around 1e-6 of the logit scale. We allow 1e-4 of the logit scale (max |logit|),
two orders above that and far below any real bug (a wrong scale, rotary
layout or routing decision moves logits by > 1e-2 of their scale).
"""
import numpy as np
import pytest
import torch

from moed import LLM, SamplingParams
from moed.engine.sequence import Sequence

from hf_reference import hf_model

ARCHS = ["deepseek_v3", "qwen3_moe", "mixtral", "qwen2_moe"]
FORMATS = ["bf16", "fp8"]
REL_TOL = 1e-4


def prompt_ids(llm, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, llm.tokenizer.vocab_size, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    cache = {}

    def get(arch, fmt):
        if (arch, fmt) not in cache:
            d = tiny_model_dir(arch, fmt)
            cache[arch, fmt] = (d, LLM(d, device="cpu", experts="torch"), hf_model(d))
        return cache[arch, fmt]
    return get


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(models, arch, fmt):
    d, llm, ref = models(arch, fmt)
    ids = prompt_ids(llm, 40)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float().numpy()
    assert ours.shape == theirs.shape == (40, llm.model_info["vocab_size"])
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    scale = np.abs(theirs).max()
    err = np.abs(ours - theirs).max() / scale
    print(f"\n{arch} {fmt}: max |logit error| / max |logit| = {err:.2e} (scale {scale:.2f})")
    assert err <= REL_TOL


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_tokens_match_transformers(models, arch, fmt):
    d, llm, ref = models(arch, fmt)
    ids = prompt_ids(llm, 12, seed=1)
    out = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        gen = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                           min_new_tokens=0, eos_token_id=None, pad_token_id=0,
                           generation_config=_no_eos(ref))
    theirs = gen[0, len(ids):].tolist()
    assert len(out.token_ids) == 32 and out.finish_reason == "length"
    assert out.token_ids == theirs


def test_kimi_k2_runs_as_deepseek_v3(tiny_model_dir, tmp_path):
    """model_type kimi_k2 loads as DeepseekV3ForCausalLM: its logits are transformers'
    DeepSeek-V3 on the same weights (config relabelled deepseek_v3, remote code dropped)."""
    import json
    from moed.model.registry import model_class
    d = tiny_model_dir("kimi_k2", "bf16")
    cfg = json.loads((d / "config.json").read_text())
    assert model_class(cfg).architecture == "DeepseekV3ForCausalLM"
    for f in d.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    cfg.pop("auto_map")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    llm, ref = LLM(d, device="cpu", experts="torch"), hf_model(tmp_path)
    ids = prompt_ids(llm, 24, seed=2)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float().numpy()
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"\nkimi_k2 bf16: max |logit error| / max |logit| = {err:.2e}")
    assert ours.shape == theirs.shape and err <= REL_TOL


INT4 = [("qwen3_moe", "int4-ct", None), ("deepseek_v3", "int4-ct", None),
        ("qwen3_moe", "int4-gptq", {"group_size": 128, "sym": False, "desc_act": True}),
        ("deepseek_v3", "int4-gptq", {"group_size": 64, "checkpoint_format": "gptq_v2"})]


@pytest.mark.parametrize("arch,fmt,int4", INT4)
def test_int4_logits_match_transformers(tiny_model_dir, arch, fmt, int4):
    # INT4 as published (compressed-tensors pack-quantized; GPTQ v1/v2, asymmetric,
    # act-order) dequantized exactly: the same tolerance as BF16 and FP8
    d = tiny_model_dir(arch, fmt, int4=int4)
    llm, ref = LLM(d, device="cpu", experts="torch"), hf_model(d)
    ids = prompt_ids(llm, 40)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float().numpy()
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"\n{arch} {fmt} {int4}: max |logit error| / max |logit| = {err:.2e}")
    assert err <= REL_TOL


def _no_eos(ref):
    cfg = ref.generation_config.__class__.from_dict(ref.generation_config.to_dict())
    cfg.eos_token_id = None
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decode_equals_full_forward(models, arch):
    d, llm, ref = models(arch, "fp8")
    eng = llm.engine
    ids = prompt_ids(llm, 30, seed=2)
    full = torch.from_numpy(llm.logits(ids))
    seq = Sequence("inc", ids, SamplingParams())
    eng.blocks.grow(seq.block_table, len(ids))
    try:
        rows = [eng.runner.run([(seq, 17)])]             # a prefill chunk, then one token at a time
        seq.num_computed = 17
        while seq.num_computed < len(ids):
            rows.append(eng.runner.run([(seq, 1)]))
            seq.num_computed += 1
    finally:
        eng.blocks.free(seq.block_table)
    inc = torch.cat(rows)
    assert (inc - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_batched_and_chunked_generation_equals_alone(tiny_model_dir, arch):
    d = tiny_model_dir(arch, "fp8")
    alone = LLM(d, device="cpu", experts="torch")
    small = LLM(d, device="cpu", experts="torch", max_num_seqs=4, max_num_batched_tokens=8)
    prompts = [prompt_ids(alone, n, seed=n) for n in (5, 19, 33)]
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    expected = [alone.generate([p], params)[0].token_ids for p in prompts]
    together = [o.token_ids for o in small.generate(prompts, params)]
    assert together == expected
    assert small.engine.blocks.num_used == 0


def test_dims_are_ragged(tiny_model_dir):
    from moed.model.checkpoint import Checkpoint
    ck = Checkpoint(tiny_model_dir("qwen3_moe", "fp8"))
    c = ck.config
    assert c["hidden_size"] % 128 and c["moe_intermediate_size"] % 128
    w = ck.weight("model.layers.1.mlp.experts.0.gate_proj", c["moe_intermediate_size"],
                  c["hidden_size"])
    assert w.is_fp8 and w.scale_inv.shape[1] == -(-c["hidden_size"] // 128) >= 2


def test_yarn_config_as_published(tiny_model_dir):
    from moed.model.checkpoint import Checkpoint
    c = Checkpoint(tiny_model_dir("deepseek_v3", "fp8")).config
    rs = c["rope_scaling"]
    assert rs["type"] == "yarn" and rs["factor"] > 1 and rs["mscale_all_dim"]


def test_rope_parameters_form_reads_the_same(tiny_model_dir, tmp_path):
    """The newer `rope_parameters` spelling gives the same model as rope_theta + rope_scaling."""
    import json
    import shutil
    src = tiny_model_dir("deepseek_v3", "bf16")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_parameters"] = dict(cfg.pop("rope_scaling"), rope_theta=cfg.pop("rope_theta"))
    cfg["rope_parameters"]["rope_type"] = cfg["rope_parameters"].pop("type")
    (dst / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1, 30))
    a = LLM(src, device="cpu", experts="torch").logits(ids)
    b = LLM(dst, device="cpu", experts="torch").logits(ids)
    assert np.array_equal(a, b)


def test_mla_absorbed_and_expanded_prefill_both_match_transformers(models):
    """Short chunks attend in the latent space, long ones expand K/V: both are the model."""
    d, llm, ref = models("deepseek_v3", "fp8")
    attn = llm.engine.model.layers[0].attn
    assert attn.ops.absorbed_is_cheaper(20) and not attn.ops.absorbed_is_cheaper(150)
    for n in (20, 150):
        ids = prompt_ids(llm, n, seed=n)
        ours = llm.logits(ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float().numpy()
        assert np.abs(ours - theirs).max() <= REL_TOL * np.abs(theirs).max()


@pytest.mark.parametrize("limit", [1 << 26, 64, 1])
def test_latent_sdpa_folds_heads_and_matches_grouped_sdpa(limit, monkeypatch):
    """MLA's absorbed attention without the compiled kernel: every head against the one
    latent, heads folded into query rows, in row chunks of any size (limit 1: one row
    a call), with a boolean mask or plain causal."""
    import moed.backends.torch as ds
    from moed.backends.torch import sdpa
    monkeypatch.setattr(ds, "LATENT_MASK_BYTES", limit)
    g = torch.Generator().manual_seed(limit)
    for B, n, H, L, causal in ((2, 5, 4, 9, False), (1, 7, 3, 7, True), (1, 40, 8, 300, False),
                               (2, 33, 4, 33, True)):
        q, c = torch.randn(B, n, H, 20, generator=g), torch.randn(B, L, 1, 20, generator=g)
        mask = None if causal else \
            (torch.rand(B, n, L, generator=g) > 0.3) | (torch.arange(L) == 0)
        ref = sdpa(q, c, c[..., :16], mask, 0.3)
        got = ds.latent_sdpa(q, c, 16, mask, 0.3)
        assert got.shape == (B, n, H, 16)
        assert (got - ref).abs().max().item() < 1e-5, (B, n, H, L, causal)
