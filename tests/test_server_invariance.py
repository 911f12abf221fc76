"""Greedy output through the daemon does not depend on the load.

Over real gRPC, on the compiled CPU path of each ISA: eight prompts of 3..150 tokens
(six as token ids, two as text) are generated alone, one after another; then all of
them at once, arriving while earlier ones already decode. Every concurrent stream's
token ids and chosen-token log-probabilities must equal its solo run exactly, on a
server whose small step budget chunks the long prompts beside running decodes, and
on one whose KV cache is too small for all of them (preemption and recompute).

The server runs in this process (BackgroundServer, the daemon's MoedServer on its
own event loop) so that MOED_ISA can be set for the engine it builds and the
scheduler can be watched: the test asserts that prompts really were chunked beside
decodes and that preemption really happened, not only that the outputs agree.
"""
import asyncio

import grpc
import numpy as np
import pytest

import moed.backends.cpu.isa as cpu
from isa_kernels import kernels_or_skip
from moed.config import Config
from moed.server.background import BackgroundServer
from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc

NEW_TOKENS = 24
TOKEN_LENGTHS = (3, 150, 17, 64, 40, 96)
TEXTS = ("once upon a time there was a little fox",
         " ".join(f"the {w} jumps over the lazy dog;" for w in
                  ("quick", "brown", "red", "slow", "old", "young", "grey", "tired")))
# per-step token budget 32, eight running sequences: the 150-token prompt takes five
# chunks, the 64- and 96-token ones several, each beside the decodes already running
CHUNKED = dict(max_num_batched_tokens=32, max_num_seqs=8)
# 14 blocks of 16 tokens = 224 KV slots. The largest request (150 + 24 tokens, 11
# blocks) fits alone (a bigger one would be refused), but together the eight need 47
# blocks, over three times the cache, so running sequences are preempted and
# recomputed (counted below, not assumed).
PREEMPTING = dict(max_num_batched_tokens=32, max_num_seqs=8, num_kv_blocks=14)
ARCHS = [("qwen3_moe", "fp8"), ("deepseek_v3", "fp8")]


def token_prompts():
    rs = np.random.RandomState(7)
    return [[int(t) for t in rs.randint(3, 200, size=n)] for n in TOKEN_LENGTHS]


def requests(tag):
    """The eight requests, in arrival order: token-id prompts and text prompts mixed."""
    inputs = [dict(token_ids=pb.TokenIds(ids=ids)) for ids in token_prompts()]
    inputs[3:3] = [dict(text=TEXTS[0])]
    inputs.append(dict(text=TEXTS[1]))
    return [pb.GenerateRequest(
        request_id=f"{tag}-{i}", ignore_eos=True, logprobs=0,
        sampling=pb.SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS), **inp)
        for i, inp in enumerate(inputs)]


def describe(req):
    if req.HasField("token_ids"):
        return f"{len(req.token_ids.ids)}-token id prompt"
    return f"text prompt {req.text[:30]!r}"


async def generate(stub, req, started=None):
    """-> (token ids, chosen-token logprobs, finish reason); sets `started` at the
    first token."""
    ids, lps, done = [], [], None
    async for m in stub.Generate(req):
        if m.HasField("chunk"):
            ids += m.chunk.token_ids
            lps += [lp.logprob for lp in m.chunk.logprobs]
            if started is not None:
                started.set()
        else:
            done = m.complete.finish_reason
    return ids, lps, done


async def solo_runs(target, reqs):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        return [await generate(stub, r) for r in reqs]


# arrival gates: request i is sent once request GATES[i] has its first token (the
# 3-token, the 150-token and the 64-token prompts); the others a few ms after the
# previous send. So the long prompts arrive while earlier streams decode, whatever
# the machine's speed.
GATES = {2: 0, 4: 1, 6: 4}


async def concurrent_runs(target, reqs):
    """All requests on one channel, staggered (GATES). -> the results, and for each
    request how many streams were mid-decode when it was sent."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        started = [asyncio.Event() for _ in reqs]
        tasks, decoding_at_send = [], []
        for i, r in enumerate(reqs):
            if i in GATES:
                await asyncio.wait_for(started[GATES[i]].wait(), 60)
            elif i:
                await asyncio.sleep(0.003 * i)
            decoding_at_send.append(sum(s.is_set() and not t.done()
                                        for s, t in zip(started, tasks)))
            tasks.append(asyncio.ensure_future(generate(stub, r, started[i])))
        return await asyncio.wait_for(asyncio.gather(*tasks), 240), decoding_at_send


class Watch:
    """Each step's (request id, tokens) rows and every preemption, on the engine thread."""

    def __init__(self, engine):
        self.steps, self.preempted = [], []
        sched = engine.scheduler
        schedule, preempt = sched.schedule, sched.preempt

        def watched_schedule():
            chunks = schedule()
            self.steps.append([(seq.request_id, n, seq.num_computed + n < seq.num_tokens)
                               for seq, n in chunks])
            return chunks

        def watched_preempt(seq):
            self.preempted.append(seq.request_id)
            return preempt(seq)
        sched.schedule, sched.preempt = watched_schedule, watched_preempt

    def chunked_beside_decodes(self):
        """Steps where a prompt chunk that leaves more of its prompt for later ran
        beside at least one decode (a row of one token that samples)."""
        return sum(any(partial for _, _, partial in s) and
                   any(n == 1 and not partial for _, n, partial in s) for s in self.steps)


def config(**engine):
    # the prefill worker off unless asked: here long prompts are to chunk beside decodes
    engine.setdefault("prefill_worker", "off")
    # the concurrent run must compute what the solo runs did, not find it cached
    # (tests/test_prefix_cache.py holds the cache to the same outputs)
    engine.setdefault("prefix_caching", False)
    # the engine in this process: the tests watch its scheduler
    engine.setdefault("engine_process", False)
    return Config(port=0, http_port=0, device="cpu", experts="cpu", tokenizer_processes=0,
                  max_waiting=64, **engine)


def check_equal(solo, together, reqs, where):
    assert len(solo) == len(together) == len(reqs)
    for req, a, b in zip(reqs, solo, together):
        assert a[2] == pb.FINISH_REASON_LENGTH and len(a[0]) == len(a[1]) == NEW_TOKENS, \
            (where, describe(req), a)
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(zip(a[0], a[1]), zip(b[0], b[1])))
                          if x != y), min(len(a[0]), len(b[0])))
            pytest.fail(f"{where}: the {describe(req)}'s concurrent stream differs from its "
                        f"solo run at token {first}: solo {a[0]} {a[1][first:first + 1]}, "
                        f"concurrent {b[0]} {b[1][first:first + 1]}")


@pytest.mark.parametrize("arch,fmt", ARCHS)
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_concurrent_greedy_streams_equal_solo_runs(isa, arch, fmt, tiny_model_dir, monkeypatch):
    kernels_or_skip(isa)
    # read when the engine is built on its thread and again by kernels looked up per
    # call (the sampler's argmax): set for the whole test
    monkeypatch.setenv("MOED_ISA", isa)
    model = tiny_model_dir(arch, fmt)
    solo = None
    for name, settings in (("chunked", CHUNKED), ("preempting", PREEMPTING)):
        where = f"{arch} {fmt} {isa} {name} {settings}"
        with BackgroundServer(config(**settings), model) as srv:
            engine = srv.app.engine_loop.engine
            info = engine.model_info
            assert (info["isa"], info["experts"]) == (isa, f"cpu-{isa}"), info
            assert info["context_length"] >= max(TOKEN_LENGTHS) + NEW_TOKENS
            if solo is None:        # solo runs on the first server; both must equal them
                watch = Watch(engine)
                solo = asyncio.run(solo_runs(srv.target, requests("solo")))
                assert not watch.preempted
                assert max(len(s) for s in watch.steps) == 1     # alone, truly
            watch = Watch(engine)
            reqs = requests("load")
            together, decoding_at_send = asyncio.run(concurrent_runs(srv.target, reqs))
        check_equal(solo, together, reqs, where)
        # the load really was load: requests sent while others decoded, batched steps
        assert all(decoding_at_send[i] >= 1 for i in GATES), decoding_at_send
        assert max(len(s) for s in watch.steps) >= 4, where
        assert watch.chunked_beside_decodes() >= 3, where
        if "num_kv_blocks" in settings:
            assert watch.preempted, f"{where}: the small KV cache was meant to force preemption"
        print(f"\n{where}: {len(watch.steps)} steps, {len(watch.preempted)} preemptions, "
              f"{watch.chunked_beside_decodes()} steps with a prompt chunk beside decodes, "
              f"streams decoding at each send {decoding_at_send}")
