"""Block bookkeeping and scheduling with plain ints (no model)."""
import pytest

from moed.engine.kv_cache import BlockManager
from moed.engine.sampling_params import SamplingParams
from moed.engine.scheduler import Scheduler
from moed.engine.sequence import Sequence, Status


def test_grow_and_free_round_trip():
    bm = BlockManager(num_blocks=4, block_size=16)
    table = []
    assert bm.can_grow(table, 33)
    bm.grow(table, 33)
    assert len(table) == 3 and bm.num_used == 3
    assert not bm.can_grow(table, 65)          # needs 5 blocks, only 4 exist
    bm.grow(table, 48)                          # still 3 blocks: nothing new
    assert len(table) == 3
    bm.free(table)
    assert table == [] and bm.num_used == 0 and bm.num_free == 4


def test_grow_without_room_asserts():
    bm = BlockManager(num_blocks=1, block_size=4)
    with pytest.raises(AssertionError):
        bm.grow([], 5)


def seq(n_prompt, order_hint=None):
    return Sequence(f"r{order_hint}", list(range(n_prompt)), SamplingParams(max_new_tokens=8))


def run_step(chunks):
    """What the engine does after a forward: advance, and sample when the chunk is complete."""
    for s, n in chunks:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.output_ids.append(0)


def test_decodes_first_then_chunked_prefill_under_budget():
    bm = BlockManager(num_blocks=64, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, max_waiting=8)
    a, b = seq(3, "a"), seq(20, "b")
    sch.add(a)
    run_step(sch.schedule())                       # a prefilled in one chunk
    sch.add(b)
    chunks = sch.schedule()
    assert chunks[0] == (a, 1)                     # the running decode goes first
    assert chunks[1] == (b, 7)                     # b's prompt in a chunk of the remaining budget
    run_step(chunks)
    chunks = sch.schedule()
    assert [n for _, n in chunks] == [1, 7]
    assert sum(n for _, n in chunks) <= 8


def test_preemption_frees_blocks_and_recomputes():
    bm = BlockManager(num_blocks=3, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, max_waiting=8)
    a, b = seq(4, "a"), seq(4, "b")
    sch.add(a)
    sch.add(b)
    run_step(sch.schedule())            # both prefilled: 2 blocks used, each has 1 output token
    assert bm.num_used == 2
    run_step(sch.schedule())            # a needs a 2nd block (position 4), b too: only 1 free
    assert b.status is Status.WAITING and b.num_computed == 0 and b.block_table == []
    assert a.status is Status.RUNNING and len(a.block_table) == 2
    assert bm.num_used == 2


def test_finish_frees_at_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, max_waiting=8)
    a = seq(10, "a")
    sch.add(a)
    sch.schedule()
    assert bm.num_used == 3
    sch.finish(a)
    assert bm.num_used == 0 and a.finished and not sch.has_work()


def test_waiting_queue_bound():
    sch = Scheduler(BlockManager(8, 4), max_num_seqs=1, max_num_batched_tokens=4, max_waiting=2)
    sch.add(seq(2, 1))
    sch.add(seq(2, 2))
    assert not sch.can_add()


def test_slots_and_prefill_cache_reads():
    import numpy as np
    import torch

    from moed.engine.kv_cache import slots_of
    from moed.model.base import AttentionBatch, SeqSlice, run_start
    # positions 0..end-1 over a block table, and any start inside a block
    assert slots_of([3, 0, 7], 0, 40, 16).tolist() == \
        list(range(48, 64)) + list(range(0, 16)) + list(range(112, 120))
    assert slots_of([3, 0, 7], 20, 35, 16).tolist() == list(range(4, 16)) + [112, 113, 114]
    assert run_start(np.arange(32, 70)) == 32 and run_start(np.array([5])) == 5
    assert run_start(np.array([0, 1, 3, 3])) is None            # same ends, not one run
    assert run_start(np.array([16, 17, 0, 1])) is None
    cache = torch.randn(128, 2, 3)
    runs = [SeqSlice(0, 20, 20, slots_of([2, 3], 0, 20, 16)),       # one run: a view
            SeqSlice(20, 9, 25, slots_of([5, 0], 0, 25, 16))]       # two runs: a copy
    batch = AttentionBatch.build(runs, [cache], torch.device("cpu"))
    for p, s in zip(batch.prefills, runs):
        got = p.cached(cache)
        assert torch.equal(got, cache[torch.from_numpy(s.slots)])
    assert batch.prefills[0].cached(cache).data_ptr() == cache[32].data_ptr()
    assert batch.prefills[1].first is None
