"""The engine in a process of its own (server.engine_process): streams equal their solo
runs on the in-process engine (long prompts arriving mid-decode, with the prefill
worker a grandchild); the front end maps no weights; an engine process killed with
SIGKILL fails the requests it held UNAVAILABLE and the next request starts a new one."""
import asyncio
import os
import signal
import time

import grpc
import pytest

from grpc_health.v1 import health_pb2, health_pb2_grpc

from moed.server.app import ENGINE_PROCESS
from moed.server.background import BackgroundServer
from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc
from test_prefill_worker import mapped
from test_server_prefill_worker import decoding, request
from test_server_invariance import CHUNKED, check_equal, concurrent_runs, config, generate, \
    requests, solo_runs

WEIGHTS = (".moex", ".moed-dense", ".safetensors")


def test_streams_equal_solo_runs_and_the_front_end_maps_no_weights(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8")
    with BackgroundServer(config(**CHUNKED), model) as srv:
        solo = asyncio.run(solo_runs(srv.target, requests("solo")))
    before = set(mapped(os.getpid(), WEIGHTS))
    with BackgroundServer(config(engine_process=True, prefill_worker="auto", **CHUNKED),
                          model) as srv:
        engine = srv.app.engine_loop.engine
        pid = engine.process.pid
        assert srv.app.engine_loop.engine.model_info["engine_process"] == pid
        reqs = requests("load")
        together, _ = asyncio.run(concurrent_runs(srv.target, reqs))
        theirs = mapped(pid, WEIGHTS)
        mine = set(mapped(os.getpid(), WEIGHTS)) - before
    check_equal(solo, together, reqs, "engine process")
    assert any(p.endswith(".moex") for p in theirs), "the engine process maps the experts"
    assert not mine, f"the front end mapped weights: {sorted(mine)}"


async def kill_the_engine(target, engine):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        stream = await decoding(stub, "held", 240)
        health = health_pb2_grpc.HealthStub(ch)
        status = lambda: health.Check(  # noqa: E731
            health_pb2.HealthCheckRequest(service=ENGINE_PROCESS))
        for _ in range(400):                        # set after the first step
            if (await status()).status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.005)
        assert (await status()).status == health_pb2.HealthCheckResponse.SERVING
        os.kill(engine.process.pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(stream, 60)
        for _ in range(400):
            down = (await status()).status
            if down == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.005)
        assert down == health_pb2.HealthCheckResponse.NOT_SERVING, "health shows it down"
        t0 = time.monotonic()
        after = await asyncio.wait_for(generate(stub, request("after", [8, 9], 5)), 300)
        took = time.monotonic() - t0
        for _ in range(400):
            if (await status()).status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.005)
        assert (await status()).status == health_pb2.HealthCheckResponse.SERVING, "back up"
        return err.value, after, took


def test_a_killed_engine_process_fails_its_requests_and_is_replaced(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8")
    with BackgroundServer(config(engine_process=True, prefill_worker="off", **CHUNKED),
                          model) as srv:
        engine = srv.app.engine_loop.engine
        first = engine.process.pid
        err, after, took = asyncio.run(kill_the_engine(srv.target, engine))
        assert engine.process is not None and engine.process.pid != first
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "engine process died" in err.details()
    assert after[2] == pb.FINISH_REASON_LENGTH and len(after[0]) == 5
    print(f"a new engine process served the next request {took:.1f} s after the kill")


def test_a_model_the_engine_process_cannot_load_is_reported_not_hung(tiny_model_dir, tmp_path):
    import json
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("qwen3_moe", "bf16"), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    srv = BackgroundServer(config(engine_process=True, prefill_worker="off"), broken)
    srv.start(wait_ready=False)
    try:
        loop = srv.app.engine_loop
        assert loop.loaded.wait(120), "the load never ended"
        err = loop.load_error
        assert type(err).__name__ == "UnsupportedArchitectureError" and "NoSuchForCausalLM" in str(err)
        assert err.path and err.path.endswith("config.json"), "its fields crossed the process"
        assert not srv.app.ready
    finally:
        srv.stop()


def test_a_loss_seen_outside_a_step_is_reported_by_the_next_step(tiny_model_dir):
    from moed.engine.sampling_params import SamplingParams
    from moed.errors import WorkerLostError
    from moed.server.engine_process import RemoteEngine
    engine = RemoteEngine(tiny_model_dir("qwen3_moe", "bf16"),
                          dict(device="cpu", experts="torch", prefill_worker="off"))
    try:
        engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=50))
        engine.step()
        os.kill(engine.process.pid, signal.SIGKILL)
        engine.process.join(10)
        assert engine.stats()["num_running"] == 0, "stats never raise"
        assert engine.has_unfinished(), "the loss is still to be reported"
        with pytest.raises(WorkerLostError):
            engine.step()
        assert not engine.has_unfinished() and not engine.seqs
        rid = engine.add_request([8, 9], SamplingParams(temperature=0, max_new_tokens=2))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        assert [o.request_id for o in outs if o.finished] == [rid], "a new engine process"
    finally:
        engine.close()
