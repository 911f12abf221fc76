"""The prefill worker (moed/engine/prefill_worker.py): long prompts prefilled in a
process of their own into the engine's shared KV cache give the single engine's
outputs bit for bit (greedy and seeded, prompts arriving while others decode), the
worker maps the same packed stores, and cancelling a prompt in the worker frees its
blocks once, when the worker is done with them."""
import os

import numpy as np
import pytest

from moed import LLM, SamplingParams

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


def test_a_cancelled_prompt_frees_its_blocks_after_the_worker(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    llm = LLM(model, device="cpu", prefill_worker=True, **SETTINGS)
    eng = llm.engine
    try:
        params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
        short, long = prompts(1)
        eng.add_request(short[0], params)
        eng.step()
        rid = eng.add_request(long[0], params)
        eng.step()
        assert rid in eng.remote
        held = eng.blocks.num_used
        assert eng.abort_request(rid)
        assert eng.blocks.num_used == held, "blocks kept while the worker writes them"
        while eng.remote:
            eng.step()
        assert all(o.request_id != rid for o in eng.step())
        while eng.has_unfinished():
            eng.step()
        assert eng.blocks.num_used == 0
    finally:
        eng.worker.close()


def test_a_killed_worker_fails_only_its_prompt(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    llm = LLM(model, device="cpu", prefill_worker=True, **SETTINGS)
    eng = llm.engine
    try:
        params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
        short, long = prompts(2)
        first = eng.add_request(short[0], params)
        eng.step()
        doomed = eng.add_request(long[0], params)
        eng.step()
        assert doomed in eng.remote
        eng.worker.process.kill()
        eng.worker.process.join()
        later = eng.add_request(long[1], params)     # no worker now: prefilled here
        ended = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    ended[o.request_id] = o
        assert ended[doomed].finish_reason == "error" and "died" in str(ended[doomed].error)
        assert ended[first].finish_reason == "length" and ended[later].finish_reason == "length"
        assert eng.blocks.num_used == 0
    finally:
        eng.worker.close()
