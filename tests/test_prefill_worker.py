"""The prefill worker (moed/engine/prefill_worker.py): long prompts prefilled in a
process of their own into the engine's shared KV cache give the single engine's
outputs bit for bit (greedy and seeded, prompts arriving while others decode), the
worker maps the same packed stores, and cancelling a prompt in the worker frees its
blocks once, when the worker is done with them."""
import os

import numpy as np
import pytest

from moed import LLM, SamplingParams
from moed.errors import WorkerLostError

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="a prefill worker needs 2 CPUs")
SETTINGS = dict(max_num_batched_tokens=32, max_num_seqs=8)


def prompts(n_long=2):
    rs = np.random.RandomState(11)
    short = [[int(t) for t in rs.randint(3, 200, size=n)] for n in (5, 9, 12)]
    long = [[int(t) for t in rs.randint(3, 200, size=n)] for n in (150, 90)[:n_long]]
    return short, long


def staggered(llm, params):
    """Short prompts start decoding; the long ones arrive once they run."""
    eng = llm.engine
    short, long = prompts()
    ids = [eng.add_request(p, params) for p in short]
    outs = {}
    for _ in range(3):
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    ids += [eng.add_request(p, params) for p in long]
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            assert o.error is None, o.error
    return [outs[i] for i in ids]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
                                    SamplingParams(temperature=0.9, top_p=0.9, seed=5,
                                                   max_new_tokens=12, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_outputs_equal_the_single_engine(tiny_model_dir, params):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    single = staggered(LLM(model, device="cpu", **SETTINGS), params)
    llm = LLM(model, device="cpu", prefill_worker=True, **SETTINGS)
    eng = llm.engine
    try:
        sent = []
        original = eng.worker.submit
        eng.worker.submit = lambda rid, *a: (sent.append(rid), original(rid, *a))[1]
        two = staggered(llm, params)
        # the first long prompt arrives while streams decode; the second goes to the
        # worker too, or is prefilled here when no stream is left decoding by then
        assert sent, "no prompt went to the worker"
        assert two == single
        assert eng.blocks.num_used == 0, "every block freed once"
    finally:
        eng.worker.close()


@pytest.fixture
def engine(tiny_model_dir):
    """An engine with a prefill worker (closed after the test)."""
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    eng = LLM(model, device="cpu", prefill_worker=True, **SETTINGS).engine
    yield eng
    eng.worker.close()


def long_beside_a_stream(eng, tokens):
    """A short stream decoding, then a long prompt handed to the worker -> their ids."""
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
    short, long = prompts(2)
    stream = eng.add_request(short[0], params)
    eng.step()
    prompt = eng.add_request(long[0], params)
    eng.step()
    assert prompt in eng.remote
    return stream, prompt


def test_a_cancelled_prompt_frees_its_blocks_after_the_worker(engine):
    _, rid = long_beside_a_stream(engine, 40)
    held = engine.blocks.num_used
    assert engine.abort_request(rid)
    assert engine.blocks.num_used == held, "blocks kept while the worker writes them"
    while engine.remote:
        engine.step()
    assert all(o.request_id != rid for o in engine.step())
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0


def test_a_killed_worker_fails_only_its_prompt(engine):
    first, doomed = long_beside_a_stream(engine, 20)
    engine.worker.process.kill()
    engine.worker.process.join()
    later = engine.add_request(prompts(2)[1][1], SamplingParams(temperature=0, max_new_tokens=20,
                                                                ignore_eos=True))
    ended = {}
    while engine.has_unfinished():                 # no worker now: prefilled here
        for o in engine.step():
            if o.finished:
                ended[o.request_id] = o
    assert ended[doomed].finish_reason == "error" and "died" in str(ended[doomed].error)
    assert isinstance(ended[doomed].error, WorkerLostError)
    assert ended[first].finish_reason == "length" and ended[later].finish_reason == "length"
    assert engine.blocks.num_used == 0


def test_a_dead_worker_is_restarted_and_takes_prompts_again(engine):
    import time
    first_pid = engine.worker.process.pid
    engine.worker.process.kill()
    engine.worker.process.join()
    deadline = time.monotonic() + 120
    while engine.worker.process.pid == first_pid or not engine.worker.alive:
        assert time.monotonic() < deadline, "the worker was not restarted"
        engine.step()                                # an idle engine still looks after it
        time.sleep(0.01)
    long_beside_a_stream(engine, 40)                 # the new worker takes long prompts
    for r in list(engine.seqs):
        engine.abort_request(r)
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_used == 0


def mapped(pid, suffixes):
    """{path: Counter of smaps fields (kB)} of pid's mappings of files with suffixes."""
    from collections import Counter
    out, cur = {}, None
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                path = head[5] if len(head) > 5 else ""
                cur = out.setdefault(path, Counter()) if path.endswith(suffixes) else None
            elif cur is not None and line.split(":")[0] in (
                    "Rss", "Shared_Clean", "Private_Clean", "Private_Dirty"):
                cur[line.split(":")[0]] += int(line.split()[1])
    return out


def test_one_copy_of_the_weights_the_worker_shares_the_engines_store_pages(engine):
    long_beside_a_stream(engine, 8)
    while engine.has_unfinished():
        engine.step()
    suffixes = (".moex", ".moed-dense")
    mine, theirs = mapped(os.getpid(), suffixes), mapped(engine.worker.process.pid, suffixes)
    assert theirs and set(theirs) <= set(mine), "the worker maps the engine's stores"
    for path, c in theirs.items():
        assert c["Private_Dirty"] == 0, f"{path}: the worker wrote to (copied) store pages"
        assert c["Shared_Clean"] > 0, f"{path}: no page shared with the engine"
        assert c["Shared_Clean"] >= 0.5 * c["Rss"], (path, c)


def test_the_cpu_split_and_its_bad_values():
    from moed.engine.prefill_worker import split_cpus
    from moed.errors import ConfigError
    assert split_cpus({0, 1}) == ([0], [1])
    assert split_cpus(range(8)) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert split_cpus(range(8), 2) == ([0, 1, 2, 3, 4, 5], [6, 7])
    for bad, cpus in ((0, range(4)), (4, range(4)), (True, range(4)), (None, [3])):
        with pytest.raises(ConfigError):
            split_cpus(cpus, bad)
