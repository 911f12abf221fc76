"""Automatic prefix caching: the block bookkeeping with plain ints, then the engine —
outputs bit-identical with and without it (the chosen tokens' log-probabilities),
under batching, chunking, preemption, MLA and the prefill worker."""
import numpy as np
import pytest

from moed import LLM, SamplingParams
from moed.engine.kv_cache import BlockManager, chain_hash

BS = 4


def filled(bm, tokens):
    """A sequence's block table holding `tokens`, all computed and registered."""
    table, hashes = [], []
    bm.grow(table, len(tokens))
    bm.register(table, hashes, lambda a, b: tokens[a:b], len(tokens))
    return table, hashes


# -- bookkeeping
def test_lookup_finds_whole_registered_blocks_only():
    bm = BlockManager(8, BS, prefix_caching=True)
    tokens = list(range(10))                       # 2 full blocks + 2 tokens
    table, hashes = filled(bm, tokens)
    assert len(hashes) == 2 and bm.num_cached == 0
    shared, _ = bm.lookup(tokens + [99], 10)
    assert shared == table[:2]
    assert bm.lookup(tokens, 7)[0] == table[:1]    # at most max_tokens tokens
    assert bm.lookup([0, 1, 2, 9] + tokens[4:], 10)[0] == []     # the first block differs
    assert bm.lookup(tokens[:4] + [7, 7, 7, 7], 10)[0] == table[:1]


def test_a_block_key_stands_for_the_whole_chain_before_it():
    first = chain_hash(None, (1, 2, 3, 4))
    assert isinstance(first, bytes) and len(first) == 16
    assert chain_hash(None, (1, 2, 3, 4)) == first                 # no per-process salt
    assert chain_hash(first, (5, 6, 7, 8)) != chain_hash(chain_hash(None, (0, 2, 3, 4)),
                                                         (5, 6, 7, 8))
    assert chain_hash(None, (1, 2)) != chain_hash(None, (2, 1))
    # two prompts that end in the same block but differ before it share nothing of it
    bm = BlockManager(8, BS, prefix_caching=True)
    a, _ = filled(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.lookup([0, 2, 3, 4, 5, 6, 7, 8, 9], 8)[0] == []
    assert bm.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9], 8)[0] == a


def test_shared_blocks_are_counted_and_kept_until_the_last_holder():
    bm = BlockManager(6, BS, prefix_caching=True)
    tokens = list(range(8))
    a, _ = filled(bm, tokens)
    blocks = list(a)                   # free() empties the table
    shared, _ = bm.lookup(tokens + [5], 8)
    b = []
    assert bm.can_share(shared, b, 12)
    bm.share(b, shared)
    bm.grow(b, 12)
    assert b[:2] == a and bm.ref[a[0]] == 2 and bm.num_used == 3
    bm.free(a)
    assert bm.ref[b[0]] == 1 and bm.num_used == 3     # b still holds them: not free
    bm.free(b)
    assert bm.num_used == 0 and bm.num_cached == 2     # registered: kept for their prefix
    c = []
    bm.share(c, bm.lookup(tokens, 8)[0])               # taken back out of the LRU pool
    assert c == blocks and bm.num_cached == 0 and bm.num_used == 2


def test_eviction_is_least_recently_used_and_only_when_needed():
    bm = BlockManager(4, BS, prefix_caching=True)
    old, _ = filled(bm, [1] * 4)
    new, _ = filled(bm, [2] * 4)
    new_blocks = list(new)
    bm.free(old)
    bm.free(new)                       # LRU order: old, then new
    assert bm.num_free == 4 and bm.num_cached == 2
    t = []
    bm.grow(t, 8)                      # the two never-registered blocks go first
    assert bm.num_cached == 2
    bm.grow(t, 12)                     # then the least recently used cached one
    assert bm.lookup([1] * 4, 4)[0] == [] and bm.lookup([2] * 4, 4)[0] == new_blocks
    bm.free(t)
    assert bm.num_free == 4


def test_can_share_counts_idle_shared_blocks_as_taken():
    bm = BlockManager(3, BS, prefix_caching=True)
    table, _ = filled(bm, list(range(8)))
    bm.free(table)
    shared, _ = bm.lookup(list(range(9)), 8)
    assert len(shared) == 2 and bm.num_free == 3
    assert bm.can_share(shared, [], 12)           # 2 shared (idle) + 1 new = 3
    assert not bm.can_share(shared, [], 13)       # + 2 new: 4 > 3


def test_the_same_prefix_computed_twice_registers_once():
    bm = BlockManager(8, BS, prefix_caching=True)
    a, _ = filled(bm, [3] * 4)
    b, _ = filled(bm, [3] * 4)                   # computed at the same time, not shared
    assert bm.lookup([3] * 4, 4)[0] == a and a != b
    bm.free(a)
    bm.free(b)
    assert bm.num_cached == 1 and bm.num_free == 8


def test_off_means_no_sharing():
    bm = BlockManager(8, BS)
    table, hashes = filled(bm, list(range(8)))
    assert hashes == [] and bm.lookup(list(range(9)), 8)[0] == []
    bm.free(table)
    assert bm.num_cached == 0 and bm.num_free == 8


# -- the engine
SYSTEM = [int(t) for t in np.random.RandomState(0).randint(3, 200, size=70)]


def conversation_prompts():
    """Requests sharing a long system prompt, then their own turns; one repeated whole."""
    rs = np.random.RandomState(1)
    turns = [[int(t) for t in rs.randint(3, 200, size=n)] for n in (5, 19, 33, 1)]
    return [SYSTEM + t for t in turns] + [SYSTEM + turns[1]]


def run(llm, batch, params):
    return [(o.token_ids, [lp[1] for lp in o.logprobs]) for o in llm.generate(batch, params)]


def compare(model_dir, params, **engine):
    """Greedy or seeded: the same tokens and log-probabilities bit for bit with the
    cache as without, batched and one by one; -> the cached engine's stats."""
    batch = conversation_prompts()
    base = LLM(model_dir, device="cpu", prefix_caching=False, **engine)
    want = run(base, batch, params)
    cached = LLM(model_dir, device="cpu", **engine)
    assert run(cached, batch, params) == want            # batched: shared within a step
    one_by_one = [run(cached, [p], params)[0] for p in batch]
    assert one_by_one == want                            # later requests hit earlier ones
    stats = cached.engine.stats()
    assert stats["kv_blocks_used"] == 0
    return stats


GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=12, ignore_eos=True,
                        logprobs=0)


@pytest.mark.parametrize("arch,fmt", [("qwen3_moe", "fp8"), ("deepseek_v3", "fp8"),
                                      ("mixtral", "bf16")])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_same_outputs_with_and_without(tiny_model_dir, arch, fmt, params):
    stats = compare(tiny_model_dir(arch, fmt), params)
    hits, queries = stats["prefix_cache_hits"], stats["prefix_cache_queries"]
    assert hits >= 4 * (len(SYSTEM) // 16 * 16), stats     # every later request hit
    assert 0 < hits < queries
    assert stats["kv_blocks_cached"] > 0


@pytest.mark.parametrize("load", [
    {"max_num_batched_tokens": 16, "max_num_seqs": 4},            # chunked prefill
    {"num_kv_blocks": 14, "max_num_batched_tokens": 64, "max_num_seqs": 8},   # preemption
    {"num_kv_blocks": 9, "max_num_batched_tokens": 64, "max_num_seqs": 2},    # eviction
], ids=["chunked", "preempted", "evicted"])
def test_same_outputs_under_load(tiny_model_dir, load):
    stats = compare(tiny_model_dir("qwen3_moe", "fp8"), GREEDY, **load)
    assert stats["prefix_cache_hits"] > 0


def test_cached_tokens_reported_per_request(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3_moe", "fp8"), device="cpu")
    prompt = conversation_prompts()[0]
    eng = llm.engine
    first = eng.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=2))
    outs = [o for o in llm._run()]
    assert all(o.num_cached_tokens == 0 for o in outs if o.request_id == first)
    eng.add_request(prompt, SamplingParams(temperature=0, max_new_tokens=2))
    outs = [o for o in llm._run()]
    full = (len(prompt) - 1) // 16 * 16                  # whole blocks, last token computed
    assert outs and all(o.num_cached_tokens == full for o in outs)


def worker_engine(model):
    """An engine with a prefill worker and small steps (skips where none can run)."""
    llm = LLM(model, device="cpu", prefill_worker="on", max_num_batched_tokens=16,
              max_num_seqs=4)
    if llm.engine.worker is None:
        pytest.skip("no prefill worker on this machine (it needs 2 CPUs)")
    return llm


def beside_a_decode(eng, prompt, params):
    """`prompt` added while a stream decodes (so a long one goes to the worker), run to
    its end -> its outputs; the stream is then aborted."""
    keep_busy = eng.add_request([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=200,
                                                          ignore_eos=True))
    eng.step()                                    # a decode runs: long prompts go to the worker
    rid = eng.add_request(prompt, params)
    outs = []
    while rid in eng.seqs or rid in eng.remote:
        outs += [o for o in eng.step() if o.request_id == rid]
    eng.abort_request(keep_busy)
    return outs


def test_prefill_worker_blocks_are_shared_after(tiny_model_dir):
    """A prompt the worker prefilled is a prefix later requests hit in the engine."""
    model = tiny_model_dir("qwen3_moe", "fp8")
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, logprobs=0)
    prompt = conversation_prompts()[2]
    base = run(LLM(model, device="cpu", prefix_caching=False), [prompt], params)
    llm = worker_engine(model)
    eng = llm.engine
    outs = beside_a_decode(eng, prompt, params)
    assert [o.new_token_ids[0] for o in outs] == base[0][0]
    assert eng.stats()["prefix_cache_hits"] == 0
    again = run(llm, [prompt], params)
    assert again == base
    assert eng.stats()["prefix_cache_hits"] >= len(prompt) // 16 * 16 - 16
    llm.engine.close()


def test_prefill_worker_starts_after_the_cached_prefix(tiny_model_dir):
    """A long prompt whose prefix is cached goes to the worker with those blocks shared:
    the worker computes from the first uncached position, the outputs are unchanged."""
    model = tiny_model_dir("qwen3_moe", "fp8")
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, logprobs=0)
    rs = np.random.RandomState(4)
    tail = [int(t) for t in rs.randint(3, 200, size=60)]
    warm, prompt = conversation_prompts()[0], SYSTEM + tail
    base = run(LLM(model, device="cpu", prefix_caching=False), [prompt], params)
    llm = worker_engine(model)
    eng = llm.engine
    try:
        run(llm, [warm], params)                   # SYSTEM's blocks are cached now
        sent, original = [], eng.worker.submit
        eng.worker.submit = lambda rid, *a: (sent.append(a[-1]), original(rid, *a))[1]
        outs = beside_a_decode(eng, prompt, params)
        cached = len(SYSTEM) // 16 * 16
        assert sent == [cached], (sent, cached)    # the worker began after the cached blocks
        assert outs[-1].num_cached_tokens == cached
        assert [t for o in outs for t in o.new_token_ids] == base[0][0]
        while eng.has_unfinished():
            eng.step()
        assert eng.blocks.num_used == 0
    finally:
        eng.close()
