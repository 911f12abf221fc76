"""The prefill worker behind the daemon, over real gRPC: streams equal their solo runs
on the single engine while long prompts go to the worker mid-decode; a worker killed
with SIGKILL fails the prompt it held with UNAVAILABLE, the other streams complete,
and after its restart a long prompt succeeds again."""
import asyncio
import os
import signal
import time

import grpc
import pytest

from grpc_health.v1 import health_pb2, health_pb2_grpc

from moed.server.app import PREFILL_WORKER
from moed.server.background import BackgroundServer
from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc
from test_server_invariance import CHUNKED, check_equal, concurrent_runs, config, generate, \
    requests, solo_runs

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="a prefill worker needs 2 CPUs")


def watch_submits(engine):
    sent, submit = [], engine.worker.submit
    engine.worker.submit = lambda rid, *a: (sent.append(rid), submit(rid, *a))[1]
    return sent


def test_streams_equal_solo_runs_with_long_prompts_in_the_worker(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8")
    with BackgroundServer(config(**CHUNKED), model) as srv:
        solo = asyncio.run(solo_runs(srv.target, requests("solo")))
    with BackgroundServer(config(prefill_worker="on", **CHUNKED), model) as srv:
        engine = srv.app.engine_loop.engine
        sent = watch_submits(engine)
        reqs = requests("load")
        together, _ = asyncio.run(concurrent_runs(srv.target, reqs))
        assert sent, "no long prompt went to the worker"
    check_equal(solo, together, reqs, "prefill worker")


def request(rid, ids, new_tokens):
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=ids), ignore_eos=True,
                              sampling=pb.SamplingParams(temperature=0, max_new_tokens=new_tokens))


async def decoding(stub, rid, new_tokens):
    """A stream of `new_tokens` tokens, returned once its first token is out."""
    started = asyncio.Event()
    stream = asyncio.ensure_future(generate(stub, request(rid, [5, 6, 7], new_tokens), started))
    await asyncio.wait_for(started.wait(), 60)
    return stream


async def in_the_worker(stub, engine, rid, new_tokens):
    """A long prompt's call, once the engine has handed it to the worker -> its future."""
    call = asyncio.ensure_future(generate(stub, request(rid, list(range(3, 200)), new_tokens)))
    deadline = time.monotonic() + 60
    while rid not in engine.remote:
        assert time.monotonic() < deadline, "the long prompt never reached the worker"
        await asyncio.sleep(0.001)
    return call


async def kill_mid_prefill(target, engine):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        stream = await decoding(stub, "stream", 300)
        doomed = await in_the_worker(stub, engine, "doomed", 4)
        deadline = time.monotonic() + 60
        health = health_pb2_grpc.HealthStub(ch)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service=PREFILL_WORKER))  # noqa: E731
        assert (await check()).status == health_pb2.HealthCheckResponse.SERVING
        pid = engine.worker.process.pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(doomed, 60)
        for _ in range(200):              # set by the engine thread's next step
            down = (await check()).status
            if down == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.005)
        ids, _, reason = await asyncio.wait_for(stream, 120)
        while engine.worker.process.pid == pid or not engine.worker.alive:
            assert time.monotonic() < deadline + 120, "the worker was not restarted"
            await generate(stub, request("nudge", [9, 9], 2))      # steps look after it
            await asyncio.sleep(0.05)
        again = await asyncio.wait_for(generate(stub, request("again", list(range(3, 180)), 4)), 120)
        assert down == health_pb2.HealthCheckResponse.NOT_SERVING, "health shows the worker down"
        assert (await check()).status == health_pb2.HealthCheckResponse.SERVING
        return err.value, (ids, reason), again


def test_a_killed_worker_fails_its_prompt_unavailable_and_is_restarted(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    with BackgroundServer(config(prefill_worker="on", **CHUNKED), model) as srv:
        engine = srv.app.engine_loop.engine
        err, (ids, reason), again = asyncio.run(kill_mid_prefill(srv.target, engine))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "prefill worker died" in err.details()
    assert reason == pb.FINISH_REASON_LENGTH and len(ids) == 300, "the other stream completed"
    assert again[2] == pb.FINISH_REASON_LENGTH and len(again[0]) == 4
    assert engine.blocks.num_used == 0, "a block leaked or was freed twice after the kill"


async def cancelled_in_the_worker(target, engine):
    """A long prompt's call cancelled by its client (the path a deadline takes) while the
    worker prefills it -> how many tries it took to catch it there."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        stream = await decoding(stub, "stream", 400)
        for attempt in range(1, 20):
            rid = f"late-{attempt}"
            call = stub.Generate(request(rid, list(range(3, 480)), 4))
            reader = asyncio.ensure_future(call.read())
            t0 = time.monotonic()
            while rid not in engine.remote and not reader.done() and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.0005)
            caught = rid in engine.remote
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if caught:
                break
        await asyncio.wait_for(stream, 120)
        deadline = time.monotonic() + 60
        while engine.remote or engine.has_unfinished():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        return attempt if caught else None


def test_a_request_cancelled_in_the_worker_frees_every_block_once(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    with BackgroundServer(config(prefill_worker="on", **CHUNKED), model) as srv:
        engine = srv.app.engine_loop.engine
        tries = asyncio.run(cancelled_in_the_worker(srv.target, engine))
        assert tries is not None, "never caught a long prompt in the worker"
        assert engine.blocks.num_used == 0, "a block leaked or was freed twice"
        worker = engine.worker.process
    assert not worker.is_alive(), "the daemon's stop stops its worker"


async def drained_with_a_prompt_in_the_worker(srv, engine):
    """Drain while a long prompt is in the worker and a stream decodes -> (the long
    prompt's result, the stream's, the error a new request got while draining)."""
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        stream = await decoding(stub, "stream", 200)
        long = await in_the_worker(stub, engine, "long", 4)
        deadline = time.monotonic() + 60
        await asyncio.to_thread(srv.call, srv.app.drain())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(stub, request("late", [4, 5, 6], 2))
        results = await asyncio.wait_for(asyncio.gather(long, stream), 120)
        while engine.remote or engine.has_unfinished():
            assert time.monotonic() < deadline + 60
            await asyncio.sleep(0.01)
        return results, refused.value


def test_a_drain_lets_the_prompt_in_the_worker_finish_and_frees_its_blocks(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    with BackgroundServer(config(prefill_worker="on", **CHUNKED), model) as srv:
        engine = srv.app.engine_loop.engine
        (long, stream), refused = asyncio.run(drained_with_a_prompt_in_the_worker(srv, engine))
        assert engine.blocks.num_used == 0, "a block leaked or was freed twice"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.details()
    assert long[2] == pb.FINISH_REASON_LENGTH and len(long[0]) == 4
    assert stream[2] == pb.FINISH_REASON_LENGTH and len(stream[0]) == 200
