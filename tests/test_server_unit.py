"""Server plumbing over a scripted engine (same API as LLMEngine, no model): the
engine thread's admission, relay, aborts and failure isolation, plus the auth and
throughput pieces. The black-box tests (test_server_grpc.py) use the real engine."""
import asyncio
import threading
import time

import grpc
import pytest

from moed.config import Config
from moed.errors import CapacityError, InvalidRequestError
from moed.server.app import MoedServer
from moed.server.engine_loop import EndedOutput
from moed.server.auth import bearer_token
from moed.server.gen import admin_pb2 as apb
from moed.server.gen import admin_pb2_grpc
from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc
from moed.server.telemetry import Telemetry
from moed.server.throughput import TokenRate

TOKEN = "unit-secret"


class CharTokenizer:
    vocab_size = 128
    eos_token_ids = {0}

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


class ScriptedEngine:
    """Echoes the prompt's characters back, one per step; 'boom' in a prompt breaks a step."""

    def __init__(self, max_waiting=4):
        self.tokenizer = CharTokenizer()
        self.model_info = dict(architecture="Scripted", context_length=64, vocab_size=128,
                               weight_format="bf16", isa="generic", device="cpu", experts="torch",
                               backends="experts=torch", planner="off")
        self.seqs, self.max_waiting, self.gate = {}, max_waiting, threading.Event()
        self.gate.set()

    def add_request(self, prompt, params, request_id=None):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", field="prompt")
        if len(ids) + params.max_new_tokens > 64:
            raise InvalidRequestError("too long", field="max_new_tokens")
        if request_id in self.seqs:
            raise InvalidRequestError("in use", field="request_id")
        if len(self.seqs) >= self.max_waiting:
            raise CapacityError("the waiting queue is full")
        seq = type("Seq", (), {})()
        seq.prompt_ids, seq.num_computed, seq.out, seq.params = ids, 0, [], params
        seq.prefill_plan = None                 # no planner: a fixed step budget
        self.seqs[request_id] = seq
        return request_id

    def abort_request(self, rid):
        return self.seqs.pop(rid, None) is not None

    def has_unfinished(self):
        return bool(self.seqs)

    def stats(self):
        return dict(num_running=len(self.seqs), num_waiting=0, kv_blocks_used=len(self.seqs),
                    kv_blocks_total=8)

    def step(self):
        if not self.gate.is_set():          # paused: requests stay in flight, nothing comes out
            time.sleep(0.002)
            return []
        outs = []
        for rid, seq in list(self.seqs.items()):
            if any(t == ord("!") for t in seq.prompt_ids):
                raise RuntimeError("scripted failure")
            seq.num_computed = len(seq.prompt_ids)
            tok = seq.prompt_ids[len(seq.out) % len(seq.prompt_ids)]
            seq.out.append(tok)
            done = len(seq.out) >= seq.params.max_new_tokens
            if done:
                del self.seqs[rid]
            out = EndedOutput(rid, "length" if done else None, len(seq.prompt_ids), len(seq.out),
                              [tok], chr(tok), None, done)
            outs.append(out)
        return outs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started(engine, **cfg):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    telemetry = Telemetry("moed-test", "scripted", span_exporter=InMemorySpanExporter(),
                          batch=False)
    app = MoedServer(Config(port=0, http_port=0, admin_token=TOKEN, **cfg), "/scripted",
                     make_engine=lambda: engine, telemetry=telemetry)
    await app.start()
    await app.wait_ready()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    return app, channel, generation_pb2_grpc.GenerationServiceStub(channel), \
        admin_pb2_grpc.AdminServiceStub(channel)


ADMIN = (("authorization", f"Bearer {TOKEN}"),)


def greedy(text, n=4, **kw):
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(temperature=0, max_new_tokens=n),
                              **kw)


async def collect(stub, req, **kw):
    return [m async for m in stub.Generate(req, **kw)]


def test_stream_relays_engine_outputs_and_completes():
    async def body():
        app, ch, gen, _ = await started(ScriptedEngine())
        msgs = await collect(gen, greedy("abc", 5, request_id="r1"))
        text = "".join(m.chunk.text for m in msgs if m.HasField("chunk"))
        assert text == "abcab" and msgs[-1].request_id == "r1"
        done = msgs[-1].complete
        assert done.finish_reason == pb.FINISH_REASON_LENGTH
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 5)
        assert 0 <= done.timing.time_to_first_token_seconds <= done.timing.total_seconds
        await ch.close()
        await app.shutdown(timeout=1)
    run(body())


def test_engine_failure_fails_its_requests_only_and_server_keeps_serving():
    async def body():
        app, ch, gen, _ = await started(ScriptedEngine())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(gen, greedy("bad!", 3))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        msgs = await collect(gen, greedy("ok", 2))
        assert msgs[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        await ch.close()
        await app.shutdown(timeout=1)
    run(body())


def test_capacity_and_duplicate_ids_map_to_status_codes():
    async def body():
        engine = ScriptedEngine(max_waiting=1)
        app, ch, gen, _ = await started(engine)
        engine.gate.clear()                       # hold the first request in the engine
        first = gen.Generate(greedy("xy", 3, request_id="dup"))
        while not engine.seqs:
            await asyncio.sleep(0.01)
        for req, code in ((greedy("zz", 3, request_id="dup"), grpc.StatusCode.ALREADY_EXISTS),
                          (greedy("zz", 3), grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(gen, req)
            assert e.value.code() == code
        engine.gate.set()
        msgs = [m async for m in first]
        assert msgs[-1].complete.usage.completion_tokens == 3
        await ch.close()
        await app.shutdown(timeout=1)
    run(body())


def test_admin_cancel_ends_stream_as_cancelled_and_client_cancel_aborts():
    async def body():
        engine = ScriptedEngine()
        app, ch, gen, admin = await started(engine)
        engine.gate.clear()
        call = gen.Generate(greedy("abc", 50, request_id="victim"))
        while "victim" not in engine.seqs:
            await asyncio.sleep(0.01)
        listed = await admin.ListRequests(apb.ListRequestsRequest(), metadata=ADMIN)
        assert [r.request_id for r in listed.requests] == ["victim"]
        await admin.CancelRequest(apb.CancelRequestRequest(request_id="victim"), metadata=ADMIN)
        engine.gate.set()
        msgs = [m async for m in call]
        assert msgs[-1].complete.finish_reason == pb.FINISH_REASON_CANCELLED
        assert "victim" not in engine.seqs
        call = gen.Generate(greedy("abc", 50, request_id="gone"))
        async for _ in call:
            call.cancel()
            break
        while engine.seqs:                          # the abort reaches the engine thread
            await asyncio.sleep(0.01)
        await ch.close()
        await app.shutdown(timeout=1)
    run(body())


def test_unexpected_admission_error_fails_that_request_only():
    async def body():
        engine = ScriptedEngine()
        app, ch, gen, _ = await started(engine)
        real = engine.add_request

        def add_request(prompt, params, request_id=None):
            if request_id == "breaks":
                raise TypeError("/secret/path")
            return real(prompt, params, request_id)
        engine.add_request = add_request
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(gen, greedy("abc", 3, request_id="breaks"))
        assert e.value.code() == grpc.StatusCode.INTERNAL and "/secret" not in e.value.details()
        msgs = await collect(gen, greedy("ok", 2))
        assert msgs[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        await ch.close()
        await app.shutdown(timeout=1)
    run(body())


def test_dead_engine_thread_turns_health_not_serving_and_calls_unavailable():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def body():
        engine = ScriptedEngine()
        app, ch, gen, _ = await started(engine)
        health = health_pb2_grpc.HealthStub(ch)

        async def status(service=""):
            r = await health.Check(health_pb2.HealthCheckRequest(service=service))
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        assert await status() == "SERVING"
        engine.gate.clear()
        waiting = gen.Generate(greedy("abc", 50))
        while not engine.seqs:
            await asyncio.sleep(0.01)

        def stats():                    # outside any request: the thread itself dies
            raise SystemError("engine thread broken")
        engine.stats = stats
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [m async for m in waiting]
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        while await status() != "NOT_SERVING":
            await asyncio.sleep(0.01)
        assert await status("moed.v1.GenerationService") == "NOT_SERVING"
        assert await status("moed.v1.AdminService") == "NOT_SERVING"    # liveness: restart me
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(gen, greedy("later", 2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await ch.close()
        await app.shutdown(timeout=1)
    run(body())


def test_plaintext_non_loopback_bind_warns_at_start(caplog):
    async def body():
        app, ch, _, _ = await started(ScriptedEngine(), host="0.0.0.0")
        await ch.close()
        await app.shutdown(timeout=1)
    with caplog.at_level("WARNING", logger="moed.server"):
        run(body())
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_bearer_token_parsing_and_token_rate_window():
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    now = [100.0]
    rate = TokenRate(window_s=60, clock=lambda: now[0])
    now[0] = 130.0
    rate.add(30)
    assert rate.per_second() == pytest.approx(1.0)      # 30 tokens over 30 s observed
    now[0] = 200.0
    rate.add(60)
    assert rate.per_second() == pytest.approx(1.0)      # the first 30 fell out of the window


def test_otlp_export_only_when_endpoint_set(monkeypatch):
    from moed.server.telemetry import otlp_exporters
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert otlp_exporters() == (None, None)
    quiet = Telemetry("moed-test", "m")
    assert not quiet.tracer_provider._active_span_processor._span_processors
    quiet.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    spans, metrics = otlp_exporters()
    assert type(spans).__name__ == "OTLPSpanExporter"
    assert type(metrics).__name__ == "PeriodicExportingMetricReader"
    spans.shutdown()
    metrics.shutdown()
