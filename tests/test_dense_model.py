"""Dense linears installed in real (tiny) models: which linears move, the
`.moed-dense` store (mapped read-only, reused, rebuilt when truncated), logits
within the runtime's BF16-activation tolerance of the torch reference, same
greedy tokens."""
import numpy as np
import pytest

from moed import LLM, SamplingParams
from moed.backends.cpu.linears import count_linears, install_cpu_linears
from moed.backends.cpu.linears import CPUFusedLinear, CPUGatedMLP, CPULinear
from moed.backends.cpu.dense_store import DenseStore, store_path
from moed.model.layers import Linear
from moed.testing.tiny import build_tiny_model

PROMPT = [5, 17, 42, 99, 7, 3]
TOL = 2e-2      # mean relative L1 of logits, as tests/test_experts_model.py states it
GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_models")
    return {(a, f): build_tiny_model(root / f"{a}-{f}", a, fmt=f)
            for a, f in (("qwen3_moe", "fp8"), ("deepseek_v3", "fp8"), ("mixtral", "bf16"))}


def fast_llm(model_dir):
    llm = LLM(model_dir, device="cpu", linears="torch")    # installed here, to count them
    installed = install_cpu_linears(llm.engine.model, model_dir)
    return llm, count_linears(installed)


@pytest.mark.parametrize("key", [("qwen3_moe", "fp8"), ("deepseek_v3", "fp8"),
                                 ("mixtral", "bf16")])
def test_logits_and_greedy_tokens_match_the_reference(models, key):
    ref = LLM(models[key], device="cpu", experts="torch")
    fast, n = fast_llm(models[key])
    assert n > 0
    a, b = fast.logits(PROMPT), ref.logits(PROMPT)
    rel = np.abs(a - b).mean() / np.abs(b).mean()
    print(f"{key}: {n} linears, logits mean rel L1 vs torch reference {rel:.2e} (tol {TOL})")
    assert rel < TOL
    assert fast.generate(PROMPT, GREEDY)[0].token_ids == ref.generate(PROMPT, GREEDY)[0].token_ids


def test_qwen_every_projection_and_the_lm_head_move_routers_stay(models):
    llm, n = fast_llm(models[("qwen3_moe", "fp8")])
    m = llm.engine.model
    moe = [layer.mlp for layer in m.layers if hasattr(layer.mlp, "router")]
    dense = [layer.mlp for layer in m.layers if not hasattr(layer.mlp, "router")]
    from moed.backends.cpu.glue import CPUSoftmaxRouter
    assert moe and all(type(mlp.router.reference.gate) is Linear for mlp in moe)   # FP32 router
    assert all(isinstance(mlp.router, CPUSoftmaxRouter) for mlp in moe)  # compiled routing
    for layer in m.layers:
        assert all(isinstance(getattr(layer.attn, p), CPULinear) for p in "qkvo")
    for mlp in dense:
        assert all(isinstance(getattr(mlp, p), CPULinear) for p in ("gate", "up", "down"))
    assert isinstance(m.lm_head, CPULinear)
    assert n == 4 * len(m.layers) + 3 * len(dense) + 1


def test_deepseek_keeps_weights_and_fuses_gate_up(models):
    llm, _ = fast_llm(models[("deepseek_v3", "fp8")])
    m = llm.engine.model
    attn = m.layers[0].attn
    assert type(attn.kv_b) is Linear        # read whole (w_kv, the absorbed products), not called
    assert all(isinstance(getattr(attn, p), CPULinear) for p in ("q_a", "q_b", "kv_a", "o"))
    shared = [layer.mlp.shared for layer in m.layers if hasattr(layer.mlp, "shared")]
    assert shared and all(isinstance(s, CPUGatedMLP) for s in shared)
    s = shared[0]
    (g0, g1), (u0, u1) = s.gate_up.spans
    assert g0 == 0 and u0 % 128 == 0 and u1 - u0 == g1 and s.gate.weight is not None


def test_qwen_attention_reads_q_k_v_in_one_call(models):
    llm = LLM(models[("qwen3_moe", "fp8")], device="cpu")
    attn = llm.engine.model.layers[0].attn
    qkv = attn.ops.qkv
    assert isinstance(qkv, CPUFusedLinear)
    assert [p.out_features for p in qkv.parts] == [attn.q.out_features,
                                                   attn.k.out_features, attn.v.out_features]


def test_store_is_mapped_read_only_reused_and_rebuilt_when_truncated(models):
    d = models[("qwen3_moe", "fp8")]
    llm, _ = fast_llm(d)
    path = store_path(d)
    assert path.exists() and path.suffix == ".moed-dense"
    units = llm.engine.model.lm_head.packed.units
    assert not units.flags.writeable
    before = llm.logits(PROMPT)
    mtime = path.stat().st_mtime_ns
    fast_llm(d)
    assert path.stat().st_mtime_ns == mtime                      # mapped again, not rebuilt
    store = DenseStore.open(path)
    e = store.entries["lm_head"]
    raw = bytearray(path.read_bytes())
    raw[e["offset"] + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception) as err:
        DenseStore.open(path, verify=True)
    assert "lm_head" in str(err.value) and "checksum" in str(err.value)
    path.write_bytes(bytes(raw[:-4096]))
    llm2, _ = fast_llm(d)                                         # rebuilt, same logits
    np.testing.assert_array_equal(llm2.logits(PROMPT), before)
    DenseStore.open(path, verify=True)


def test_engine_installs_linears_unless_torch_and_install_is_idempotent(models, monkeypatch):
    d = models[("mixtral", "bf16")]
    monkeypatch.setenv("MOED_LINEARS", "torch")
    assert type(LLM(d, device="cpu").engine.model.lm_head) is Linear
    monkeypatch.delenv("MOED_LINEARS")
    llm = LLM(d, device="cpu")
    assert isinstance(llm.engine.model.lm_head, CPULinear)
    assert install_cpu_linears(llm.engine.model, d) == {}          # nothing left to replace


def chunked_logits(llm, ids, chunk):
    """Logits at every position, the prompt forwarded `chunk` tokens at a time: every
    chunk after the first attends to the tokens cached before it."""
    from moed.engine.sequence import Sequence
    eng = llm.engine
    seq = Sequence("chunked", ids, SamplingParams(max_new_tokens=1))
    eng.blocks.grow(seq.block_table, len(ids))
    outs = []
    try:
        for start in range(0, len(ids), chunk):
            n = min(chunk, len(ids) - start)
            outs.append(eng.runner.run([(seq, n)]).float().numpy())
            seq.num_computed += n
    finally:
        eng.blocks.free(seq.block_table)
    return np.concatenate(outs)


@pytest.mark.parametrize("key", [("qwen3_moe", "fp8"), ("mixtral", "bf16"),
                                 ("deepseek_v3", "fp8")])
def test_prefill_attention_kernel_matches_the_reference_across_chunks(models, key):
    from moed.backends.cpu.attention import causal_attention
    ref = LLM(models[key], device="cpu", experts="torch")
    fast = LLM(models[key], device="cpu", max_num_batched_tokens=16, max_num_seqs=4)
    from moed.backends.cpu.isa import load_kernels
    # deterministic (the default): the kernel on every ISA, decodes with its arithmetic
    assert all(layer.attn.ops.prefill.func is causal_attention
               for layer in fast.engine.model.layers)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 200, size=45)]
    b = ref.logits(prompt)
    for a in (fast.logits(prompt), chunked_logits(fast, prompt, 16)):
        rel = np.abs(a - b).mean() / np.abs(b).mean()
        print(f"{key}: prefill through the attention kernel, logits mean rel L1 {rel:.2e}")
        assert a.shape == b.shape and rel < TOL
    assert fast.generate(prompt, GREEDY)[0].token_ids == ref.generate(prompt, GREEDY)[0].token_ids


def test_mla_expanded_prefill_through_the_kernel_matches_the_reference(models, monkeypatch):
    # the tiny model always finds the latent form cheaper: force the expanded one (only
    # taken with deterministic off: deterministic keeps the decodes' absorbed form)
    from moed.backends.torch import MLAOps
    monkeypatch.setattr(MLAOps, "absorbed_is_cheaper", lambda self, n: n == 1)
    d = models[("deepseek_v3", "fp8")]
    ref = LLM(d, device="cpu", experts="torch")
    # a float32 cache, as the reference's: this compares the kernel's arithmetic, not the
    # cache's rounding (with the default bfloat16 latent cache this prompt's mean rel L1
    # is 2.5e-2 against 5.5e-3, while the contract's judge, the mean KL over the
    # fidelity prompts, is 9.0e-3 against 1.7e-2, the emulation's 1.4e-2)
    fast = LLM(d, device="cpu", deterministic=False, kv_cache_dtype="float32")
    seen = []
    for layer in fast.engine.model.layers:
        ops = layer.attn.ops
        if ops.prefill is not None:
            f = ops.prefill
            ops.prefill = lambda q, k, v, s, f=f: seen.append(k.shape[1]) or f(q, k, v, s)
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 200, size=45)]
    b = ref.logits(prompt)
    for a in (fast.logits(prompt), chunked_logits(fast, prompt, 16)):
        rel = np.abs(a - b).mean() / np.abs(b).mean()
        print(f"MLA expanded prefill, logits mean rel L1 {rel:.2e}")
        assert rel < TOL
    from moed.backends.cpu.isa import load_kernels
    if load_kernels().ISA in ("avx512", "avx512emu"):
        assert seen and all(h > 1 for h in seen)       # every chunk went the expanded way
    else:
        assert not seen                                # FP32 paths: torch's SDPA
