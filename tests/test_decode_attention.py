"""Paged decode attention and the KV store (moed/backends/cpu/decode_attention.py): every
ISA against the torch path the model used before (moed.model.layers.decode_attention
on a gathered copy of the cache), FP32 and BF16 caches, ragged batches with padded
and shuffled slot rows, GQA groups 1/4/8, head dims 64/128, the split-context path;
the store bit-exact against torch's index_put (BF16 rounding included); bad inputs;
and a tiny model's decode logits with the compiled path against the torch path.

Bound: every ISA computes in FP32 from the cache's values (BF16 widens exactly), so
the kernel and the torch path differ only by FP32 rounding in a different order:
max |err| <= 1e-5 on outputs of magnitude <= ~1 (measured <= 1.5e-6).
"""
import struct
import threading

import numpy as np
import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed import LLM, SamplingParams
from moed.errors import InvalidRequestError
from moed.backends.cpu.decode_attention import (latent_decode_attention, paged_decode_attention,
                                           store_kv)
from moed.backends.cpu.gqa import CPUGQAOps
from moed.backends.cpu.mla import CPUMLAOps, LatentAbsorb
from moed.backends.cpu.runtime import default_threads
from moed.backends.torch import GQAOps, MLAOps, decode_attention
from moed.model.deepseek_v3 import MLAttention
from moed.testing.tiny import build_tiny_model

from isa_kernels import kernels_or_skip

TOL = 1e-5


def tol(isa):
    """Max abs error against the FP32 torch path: FP32 kernels 1e-5; the AVX-512 builds
    take the prefill kernel's BF16 dot products (Q, K, P and V rounded to nearest even,
    ~2^-9 relative on outputs of size ~1), so a decode equals a prefill bit for bit."""
    return 3e-2 if isa in ("avx512", "avx512emu") else TOL
DTYPES = [torch.float32, torch.bfloat16]
# (contexts of the batch, Hkv, G, d): ragged rows, groups 1/4/8, head dims 64/128
CASES = [([1], 4, 8, 128), ([5, 37, 100], 2, 4, 64), ([64, 1, 17, 300], 3, 1, 128),
         ([130, 129], 1, 8, 64), ([700], 4, 4, 128)]


def make_cache(S, Hkv, d, dtype, g):
    return torch.randn(S, 2, Hkv, d, generator=g).to(dtype)


def slot_table(contexts, S, g):
    """[B, Lmax] int64: each row a shuffled set of distinct slots (not contiguous, not
    sorted), padded past its context by repeating its first slot, as AttentionBatch does."""
    Lmax = max(contexts)
    table = torch.empty(len(contexts), Lmax, dtype=torch.int64)
    for row, c in zip(table, contexts):
        row[:c] = torch.randperm(S, generator=g)[:c]
        row[c:] = row[0]
    return table


def torch_path(q, cache, slots, context, scale):
    kv = cache[slots]                                          # [B, Lmax, 2, Hkv, d]
    mask = torch.arange(slots.shape[1])[None, None, :] < context[:, None, None]
    return decode_attention(q, kv[:, :, 0], kv[:, :, 1], mask, scale)


def run_case(kernels, contexts, Hkv, G, d, dtype, seed, threads=2, S=None):
    g = torch.Generator().manual_seed(seed)
    S = S or 2 * sum(contexts) + 7
    cache = make_cache(S, Hkv, d, dtype, g)
    slots, context = slot_table(contexts, S, g), torch.tensor(contexts)
    q = 1.5 * torch.randn(len(contexts), Hkv * G, d, generator=g)    # sharper than uniform
    out = torch.full(q.shape, float("nan"))
    res = paged_decode_attention(q, cache, slots, context, d ** -0.5, out=out, threads=threads,
                                 kernels=kernels)
    assert res.data_ptr() == out.data_ptr()
    ref = torch_path(q, cache, slots, context, d ** -0.5)
    assert not torch.isnan(out).any()
    return (out - ref).abs().max().item()


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_isa_matches_the_torch_path_on_ragged_batches(isa):
    kernels = kernels_or_skip(isa)
    worst = 0.0
    for i, (contexts, Hkv, G, d) in enumerate(CASES):
        for dtype in DTYPES:
            err = run_case(kernels, contexts, Hkv, G, d, dtype, seed=i)
            assert err <= tol(isa), f"{isa} {contexts} Hkv={Hkv} G={G} d={d} {dtype}: {err:.2e}"
            worst = max(worst, err)
    print(f"{isa}: worst max abs err {worst:.2e} (<= {tol(isa)})")


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_long_context_takes_the_split_path(isa):
    # one (sequence, kv head) pair on 2 and 3 threads: the context is cut into key
    # chunks whose partial softmaxes are merged; 20000 keys is past any single block
    kernels = kernels_or_skip(isa)
    for threads, contexts, dtype in ((2, [20000], torch.bfloat16), (3, [4099], torch.float32)):
        err = run_case(kernels, contexts, 1, 8, 64, dtype, seed=threads, threads=threads)
        print(f"{isa}: {contexts[0]} keys on {threads} threads, max abs err {err:.2e}")
        assert err <= tol(isa)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_one_long_sequence_among_short_ones_and_wide_batches(isa):
    # items of very different lengths claimed by 2 and 3 threads, and a batch wider
    # than the threads several times over
    kernels = kernels_or_skip(isa)
    cases = ((2, [3000, 5, 70]), (3, [2, 1500, 1, 900]), (2, [300, 7, 260, 1, 90, 512, 33,
                                                              64, 129, 200]))
    for threads, contexts in cases:
        for dtype in DTYPES:
            err = run_case(kernels, contexts, 4, 2, 64, dtype, seed=len(contexts),
                           threads=threads)
            assert err <= tol(isa), f"{isa} {contexts} on {threads} threads {dtype}: {err:.2e}"


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_strided_q_and_one_thread(isa):
    # q a slice of the joint q/k buffer of the projection (token stride (H + Hkv) d)
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, d = 3, 8, 2, 64
    qk = torch.randn(B, H + Hkv, d, generator=g)
    cache = make_cache(50, Hkv, d, torch.float32, g)
    slots, context = slot_table([9, 20, 3], 50, g), torch.tensor([9, 20, 3])
    out = paged_decode_attention(qk[:, :H], cache, slots, context, 0.2, threads=1,
                                 kernels=kernels)
    ref = torch_path(qk[:, :H], cache, slots, context, 0.2)
    assert (out - ref).abs().max().item() <= tol(isa)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_mla_latent_cache(isa):
    # DeepSeek MLA absorbed decode: H heads share one latent row [r + dr] per token, the
    # value its first r columns (the same cache row read as K and V); B = 1 is one
    # (sequence, kv head) pair, so its 3000 keys take the split path on 2 threads
    kernels = kernels_or_skip(isa)
    H, r, dr = 16, 64, 16
    for i, (contexts, dtype) in enumerate((([3000], torch.bfloat16), ([7, 40, 1], torch.float32))):
        g = torch.Generator().manual_seed(20 + i)
        S = 2 * sum(contexts) + 3
        cache = torch.randn(S, r + dr, generator=g).to(dtype)
        slots, context = slot_table(contexts, S, g), torch.tensor(contexts)
        q = torch.randn(len(contexts), H, r + dr, generator=g)
        out = latent_decode_attention(q, cache, r, slots, context, 0.1, threads=2,
                                      kernels=kernels)
        rows = cache[slots][:, :, None]                       # [B, Lmax, 1, r + dr]
        mask = torch.arange(slots.shape[1])[None, None, :] < context[:, None, None]
        ref = decode_attention(q, rows, rows[..., :r], mask, 0.1)
        err = (out - ref).abs().max().item()
        print(f"{isa} MLA {contexts} {dtype}: max abs err {err:.2e}")
        assert out.shape == (len(contexts), H, r) and err <= tol(isa)
    with pytest.raises(InvalidRequestError):
        latent_decode_attention(q, cache, r + dr + 1, slots, context, 0.1, kernels=kernels)
    with pytest.raises(InvalidRequestError):
        latent_decode_attention(q, cache[:, :r], r, slots, context, 0.1, kernels=kernels)


def test_two_python_threads_at_once():
    # dual-batch overlap calls from two threads: the pool serialises the calls, each
    # thread has its own workspace, and one thread's slot table never stands in for
    # the other's
    kernels = cpu.load_kernels()
    g = torch.Generator().manual_seed(11)
    jobs = []
    for contexts in ([300, 20], [7, 900, 64]):
        S = 2 * sum(contexts)
        cache = make_cache(S, 2, 64, torch.bfloat16, g)
        slots, context = slot_table(contexts, S, g), torch.tensor(contexts)
        q = torch.randn(len(contexts), 8, 64, generator=g)
        jobs.append((q, cache, slots, context, torch_path(q, cache, slots, context, 0.125)))
    errors = []

    def run(q, cache, slots, context, ref):
        for _ in range(30):
            out = paged_decode_attention(q, cache, slots, context, 0.125, threads=2,
                                         kernels=kernels)
            errors.append((out - ref).abs().max().item())
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 60 and max(errors) <= tol(kernels.ISA)


def bf16_edge_values(n, g):
    """float32 values whose BF16 rounding is delicate: exact ties (even and odd),
    just above/below ties, infinities, the largest finite, subnormals, +-0."""
    bits = [0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, 0x7f800000, 0xff800000,
            0x7f7fffff, 0x00000001, 0x80000000, 0x00000000, 0x7f7f8000]
    edge = torch.tensor([struct.unpack("f", struct.pack("I", b))[0] for b in bits])
    x = torch.randn(n, generator=g) * 100
    x[:len(edge)] = edge
    return x


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_matches_index_put_bit_for_bit(isa, dtype):
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(4)
    N, H, Hkv, d, S = 7, 8, 2, 72, 40              # d 72: a vector body and a tail
    qk = bf16_edge_values(N * (H + Hkv) * d, g).view(N, H + Hkv, d)[:, torch.randperm(H + Hkv)]
    k = qk[:, H:]                                  # strided, as the projection leaves it
    v = bf16_edge_values(N * Hkv * 2 * d, g).view(N, Hkv, 2 * d)[..., :d]   # head stride 2d
    slot_mapping = torch.randperm(S, generator=g)[:N]
    ours, theirs = make_cache(S, Hkv, d, dtype, g), None
    theirs = ours.clone()
    store_kv(ours, slot_mapping, k, v, kernels=kernels)
    theirs[slot_mapping, 0] = k.to(dtype)
    theirs[slot_mapping, 1] = v.to(dtype)
    assert torch.equal(ours.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    k = k.clone()
    k[2, 1, 5] = float("nan")                      # NaN stays NaN
    store_kv(ours, slot_mapping, k, v, kernels=kernels)
    assert torch.isnan(ours[slot_mapping[2], 0, 1, 5]) and not torch.isnan(ours[slot_mapping[3]]).any()


def test_bad_inputs_are_refused_before_any_read_or_write():
    g = torch.Generator().manual_seed(5)
    S, Hkv, d = 30, 2, 64
    cache = make_cache(S, Hkv, d, torch.float32, g)
    q = torch.randn(2, 4, d, generator=g)
    slots, context = slot_table([5, 9], S, g), torch.tensor([5, 9])

    def refused(field, *args, fn=paged_decode_attention):
        with pytest.raises(InvalidRequestError) as e:
            fn(*args)
        assert e.value.field == field, e.value

    refused("q", q.bfloat16(), cache, slots, context, 0.1)
    refused("q", q[:, :3], cache, slots, context, 0.1)                 # 3 heads, Hkv 2
    refused("q", torch.randn(2, 4, 32), cache, slots, context, 0.1)    # head size
    refused("q", q.to("meta"), cache, slots, context, 0.1)
    refused("kv_cache", q, cache.half(), slots, context, 0.1)
    refused("kv_cache", q, cache[:, :, :, ::2], slots, context, 0.1)
    refused("slots", q, cache, slots.int(), context, 0.1)
    refused("slots", q, cache, slots[:1], context, 0.1)
    refused("context", q, cache, slots, torch.tensor([5, 0]), 0.1)
    refused("context", q, cache, slots, torch.tensor([5, 10]), 0.1)  # past the row
    # the slot table is checked once per step (every layer shares it): not once per
    # object, a q with another row count is refused with the same table
    paged_decode_attention(q, cache, slots, context, 0.1)
    refused("slots", torch.randn(3, 4, d), cache, slots, context, 0.1)
    # a cache is checked once per tensor: a new tensor (even at a recycled address) again
    refused("kv_cache", q, torch.zeros(S, 2, Hkv, d, dtype=torch.float16), slots, context, 0.1)
    for bad in (-1, S):
        s = slots.clone()
        s[1, 8] = bad
        refused("slots", q, cache, s, context, 0.1)
    s = slots.clone()
    s[0, 7] = S + 5                                # padding past the context is never read
    assert not torch.isnan(paged_decode_attention(q, cache, s, context, 0.1)).any()
    # the store: nothing written when any slot is bad
    k = torch.randn(3, Hkv, d, generator=g)
    before = cache.clone()
    refused("slot_mapping", cache, torch.tensor([3, S, 4]), k, k, fn=store_kv)
    refused("slot_mapping", cache, torch.tensor([3, -2, 4]), k, k, fn=store_kv)
    refused("slot_mapping", cache, torch.tensor([3, 4]), k, k, fn=store_kv)
    refused("k", cache, torch.tensor([3, 4, 5]), k.bfloat16(), k, fn=store_kv)
    refused("v", cache, torch.tensor([3, 4, 5]), k, k[:, :1], fn=store_kv)
    assert torch.equal(cache, before)


# -- the model: a tiny Qwen3-MoE (GQA) and DeepSeek-V3 (MLA) decoding through the hooks
# vs the torch path
PROMPT = [5, 17, 42, 99, 7, 3, 60, 8]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("decode_model") / "qwen", "qwen3_moe")


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("decode_model") / "deepseek", "deepseek_v3")


def decode_logits(llm, ids):
    """Logits at every position, one token per step: every step is a decode."""
    from moed.engine.sequence import Sequence
    eng = llm.engine
    seq = Sequence("decodes", ids, SamplingParams(max_new_tokens=1))
    eng.blocks.grow(seq.block_table, len(ids))
    outs = []
    try:
        for _ in ids:
            outs.append(eng.runner.run([(seq, 1)]).float().numpy())
            seq.num_computed += 1
    finally:
        eng.blocks.free(seq.block_table)
    return np.concatenate(outs)


def hooked(llm, kernels, calls):
    """The hooks on `kernels`, each call counted in calls[name]."""
    def counted(name, fn):
        def call(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, kernels=kernels, **kw)
        return call
    class CountedAbsorb:
        def __init__(self, absorb):
            self.absorb = absorb

        def query(self, x):
            calls["absorb"] = calls.get("absorb", 0) + 1
            return self.absorb.query(x)

        def output(self, x):
            calls["absorb"] = calls.get("absorb", 0) + 1
            return self.absorb.output(x)

    for layer in llm.engine.model.layers:
        attn = layer.attn
        if isinstance(attn, MLAttention):
            absorb = CountedAbsorb(LatentAbsorb(attn.kv_b.weight, attn.H, attn.dn, attn.dv,
                                                attn.r, kernels=kernels))
            ops = CPUMLAOps(attn, kernels, default_threads(), flash=False, one_form=False,
                            absorb=absorb)
            ops.decode = counted("decode", latent_decode_attention)
        else:
            ops = CPUGQAOps(attn, kernels, default_threads(), flash=False)
            ops.decode = counted("decode", paged_decode_attention)
            ops.store = counted("store", store_kv)
        attn.ops = ops
    return llm


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["qwen", "deepseek"])
def test_tiny_model_decode_logits_match_the_torch_path(arch, isa, kv_dtype, monkeypatch, request):
    kernels = kernels_or_skip(isa)              # before the model: a skip builds none
    model = request.getfixturevalue(arch)
    monkeypatch.setenv("MOED_CACHE_DIR", str(model.parent / "cache"))
    # torch everywhere else on both sides, so attention is the only difference
    ref = LLM(model, device="cpu", experts="torch", kv_cache_dtype=kv_dtype)
    assert all(type(layer.attn.ops) in (GQAOps, MLAOps) for layer in ref.engine.model.layers)
    calls = {}
    fast = hooked(LLM(model, device="cpu", experts="torch", kv_cache_dtype=kv_dtype), kernels,
                  calls)
    a, b = decode_logits(fast, PROMPT), decode_logits(ref, PROMPT)
    layers = len(fast.engine.model.layers)
    expected = {"decode": layers * len(PROMPT)}
    if arch == "qwen":                           # MLA writes its latent with index_put
        expected["store"] = layers * len(PROMPT)
    else:                                        # kv_b's two products, as stored
        expected["absorb"] = 2 * layers * len(PROMPT)
    assert calls == expected
    err = np.abs(a - b).max() / np.abs(b).max()
    print(f"{arch} {isa} {kv_dtype} cache: decode logits max rel err {err:.2e}")
    # the AVX-512 builds round Q, K, P and V to BF16 like the prefill kernel
    assert a.shape == b.shape and err < (1e-2 if isa in ("avx512", "avx512emu") else 1e-5)
    # a ragged batch of decodes (and prefills beside them), greedy, token for token
    prompts = [PROMPT, PROMPT[:3], [9, 4, 2, 11, 12]]
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in fast.generate(prompts, greedy)] == \
           [o.token_ids for o in ref.generate(prompts, greedy)]


@pytest.mark.parametrize("deterministic", [True, False])
def test_engine_installs_the_decode_hooks(qwen, deepseek, monkeypatch, deterministic):
    # deterministic (the default): on every ISA the kernels whose per-query arithmetic
    # is one for prefill and decode (flash prefill, paged decode, MLA in one form);
    # otherwise the fastest: GQA and MLA decode kernels where they beat torch (not
    # generic's SSE2), kv_b as stored and the flash prefill with BF16 dots (AVX-512)
    monkeypatch.setenv("MOED_CACHE_DIR", str(qwen.parent / "cache"))
    isa = cpu.load_kernels().ISA
    bf16 = isa in ("avx512", "avx512emu")
    kernel_decodes = deterministic or isa != "generic"
    for layer in LLM(deepseek, device="cpu", deterministic=deterministic).engine.model.layers:
        ops = layer.attn.ops
        decode, absorb = ops.decode, ops.absorb
        if not kernel_decodes:
            assert decode is None
        else:
            assert decode.func is latent_decode_attention and decode.keywords["kernels"].ISA == isa
        assert (absorb is not None) == (deterministic or bf16)
        assert ops.one_form == deterministic
        assert (ops.prefill is not None) == (deterministic or bf16)
        if absorb is not None:
            assert isinstance(absorb, LatentAbsorb) and absorb.kernels.ISA == isa
    llm = LLM(qwen, device="cpu", deterministic=deterministic)
    for layer in llm.engine.model.layers:
        ops = layer.attn.ops
        store, decode = ops.store, ops.decode
        assert store.func is store_kv and store.keywords["kernels"].ISA == isa
        assert (ops.prefill is not None) == (deterministic or bf16)
        if not kernel_decodes:
            assert decode is None
        else:
            assert decode.func is paged_decode_attention and decode.keywords["kernels"].ISA == isa
