"""Greedy output repeats under any load (DESIGN.md, precision contract and determinism).

A position's logits are bit-identical however the engine computes it: in a decode
step or a prefill chunk, in any chunk split, alone or beside other requests, or
recomputed after preemption. Checked through the offline API on every
architecture and ISA (the chosen token's log-probability is compared bit for bit,
which is far more sensitive than the token), and on the kernels directly.
"""
import numpy as np
import pytest
import torch

import moed.backends.cpu.isa as cpu
from isa_kernels import kernels_or_skip
from moed import LLM, SamplingParams
from moed.backends.cpu.attention import causal_attention
from moed.backends.cpu.decode_attention import latent_decode_attention, paged_decode_attention
from test_decode_attention import slot_table

LENGTHS = (5, 17, 40, 64, 90, 33, 120, 8)
ARCHS = [("qwen3_moe", "fp8"), ("mixtral", "bf16"), ("deepseek_v3", "fp8"), ("qwen2_moe", "bf16"),
         ("qwen3_moe", "int4-gptq"), ("deepseek_v3", "int4-ct")]
INT4 = {"int4-gptq": {"sym": False, "group_size": 32}}      # asymmetric: zero points too
# (engine settings, what it exercises)
LOADS = [({}, "one step for all prompts, then batched decodes"),
         ({"max_num_batched_tokens": 32, "max_num_seqs": 8},
          "prompts chunked beside running decodes; chunks of 1 token run as decodes"),
         ({"num_kv_blocks": 20, "max_num_batched_tokens": 64, "max_num_seqs": 8},
          "a KV cache too small for all: preemption and recompute")]


def prompts():
    rs = np.random.RandomState(1)
    return [[int(t) for t in rs.randint(3, 200, size=n)] for n in LENGTHS]


def run(llm, batch, params):
    return [(o.token_ids, [lp[1] for lp in o.logprobs]) for o in llm.generate(batch, params)]


@pytest.mark.parametrize("arch,fmt", ARCHS)
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_greedy_continuations_equal_solo_runs(arch, fmt, isa, tiny_model_dir, monkeypatch):
    kernels_or_skip(isa)
    monkeypatch.setenv("MOED_ISA", isa)
    model = tiny_model_dir(arch, fmt, int4=INT4.get(fmt), max_position_embeddings=512) \
        if arch != "deepseek_v3" else tiny_model_dir(arch, fmt, int4=INT4.get(fmt))
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, logprobs=0)
    ps = prompts()
    solo_llm = LLM(model, device="cpu")
    solo = [run(solo_llm, [p], params)[0] for p in ps]
    for settings, what in LOADS:
        llm = LLM(model, device="cpu", **settings)
        preempted = []
        original = llm.engine.scheduler.preempt
        llm.engine.scheduler.preempt = lambda seq: (preempted.append(seq), original(seq))[1]
        together = run(llm, ps, params)
        if "num_kv_blocks" in settings:
            assert preempted, "the small cache was meant to force preemption"
        for p, a, b in zip(ps, solo, together):
            first = next((i for i, (x, y) in enumerate(zip(a[1], b[1])) if x != y), None)
            assert a == b, (f"{arch} {fmt} {isa}, {what}: the {len(p)}-token prompt's "
                            f"continuation differs from its solo run at token {first}")


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_requests_arriving_at_different_steps(isa, tiny_model_dir, monkeypatch):
    # requests added while others decode, stepped by hand
    kernels_or_skip(isa)
    monkeypatch.setenv("MOED_ISA", isa)
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, logprobs=0)
    ps = prompts()
    llm = LLM(model, device="cpu", max_num_batched_tokens=24, max_num_seqs=8)
    solo = [run(llm, [p], params)[0] for p in ps]
    eng = llm.engine
    got, finished, step = {}, set(), 0
    pending = list(enumerate(ps))
    while pending or len(finished) < len(ps):
        if pending and step % 3 == 0:          # a new request every third step
            i, p = pending.pop(0)
            got[eng.add_request(p, params, request_id=f"r{i}")] = ([], [])
        for out in eng.step():
            tokens, lps = got[out.request_id]
            tokens += out.new_token_ids
            lps += [lp[1] for lp in out.logprobs]
            if out.finished:
                finished.add(out.request_id)
        step += 1
        assert step < 2000
    assert [got[f"r{i}"] for i in range(len(ps))] == solo


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_equals_the_prefill_at_its_position(isa, dtype):
    # GQA (G 4) and MLA's latent form (one 88-wide kv head, V its 72-wide prefix):
    # decodes through the slot table, any batch and thread count, bit for bit the rows
    # of one prefill of the whole sequence and of a chunk after a cached prefix
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(3)
    L = 150
    for Hkv, G, dq, dv in ((2, 4, 64, 64), (1, 4, 88, 72)):
        S = L + 40
        perm = torch.randperm(S, generator=g)[:L]              # the sequence's slots
        cache = torch.randn(S, Hkv, dq, generator=g).to(dtype)
        k = cache[perm]                                         # [L, Hkv, dq] in order
        v = k[..., :dv] if Hkv == 1 else torch.randn(L, Hkv, dv, generator=g).to(dtype)
        q = 1.5 * torch.randn(L, Hkv * G, dq, generator=g)
        whole = causal_attention(q, k, v, 0.11, kernels=kernels)
        chunk = causal_attention(q[97:], k, v, 0.11, kernels=kernels)     # 97 cached
        assert torch.equal(chunk, whole[97:])
        for pos in ([149], [0, 63, 64, 149], [5, 129, 64]):
            slots = perm[None].repeat(len(pos), 1)
            ctx = torch.tensor([p + 1 for p in pos])
            for threads in (1, 2):
                if Hkv == 1:
                    out = latent_decode_attention(q[pos], cache[:, 0], dv, slots, ctx, 0.11,
                                                  threads=threads, kernels=kernels)
                else:
                    kv = torch.stack([cache, torch.zeros_like(cache)], 1)   # [S, 2, Hkv, d]
                    kv[perm, 1] = v
                    out = paged_decode_attention(q[pos], kv, slots, ctx, 0.11,
                                                 threads=threads, kernels=kernels)
                assert torch.equal(out, whole[pos]), (Hkv, pos, threads)
    # ragged batches of unrelated rows: each row as when decoded alone
    S, Hkv, G, d = 400, 2, 4, 64
    kv = torch.randn(S, 2, Hkv, d, generator=g).to(dtype)
    contexts = [1, 77, 300, 64, 65]
    slots = slot_table(contexts, S, g)
    q = torch.randn(len(contexts), Hkv * G, d, generator=g)
    both = paged_decode_attention(q, kv, slots, torch.tensor(contexts), 0.125, kernels=kernels)
    for i, c in enumerate(contexts):
        alone = paged_decode_attention(q[i:i + 1], kv, slots[i:i + 1, :c], torch.tensor([c]),
                                       0.125, kernels=kernels)
        assert torch.equal(alone[0], both[i])
