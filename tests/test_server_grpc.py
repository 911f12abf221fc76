"""Black-box tests of the daemon over real gRPC on 127.0.0.1, on a tiny Qwen3-MoE model."""
import contextlib
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from google.rpc import error_details_pb2
from moed.config import Config
from moed.server.background import BackgroundServer
from moed.server.gen import admin_pb2 as apb
from moed.server.gen import admin_pb2_grpc
from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc
from moed.server.telemetry import Telemetry

TOKEN = "test-admin-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
GENERATION = "moed.v1.GenerationService"
CODE = grpc.StatusCode


def server_config(**kw):
    base = dict(port=0, http_port=0, admin_token=TOKEN, device="cpu", experts="torch",
                max_num_seqs=16, max_num_batched_tokens=64, max_waiting=64,
                max_prompt_chars=4096)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_moe", "bf16")


@pytest.fixture(scope="module")
def telemetry():
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    t = Telemetry("moed-test", "tiny", span_exporter=spans, metric_reader=metrics, batch=False)
    t.spans, t.metrics = spans, metrics        # for the assertions
    return t


@pytest.fixture(scope="module")
def server(model_dir, telemetry):
    srv = BackgroundServer(server_config(), model_dir, telemetry=telemetry).start()
    yield srv
    srv.stop()


class Client:
    def __init__(self, target):
        self.channel = grpc.insecure_channel(target)
        self.gen = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def info(self):
        return self.gen.GetModelInfo(pb.GetModelInfoRequest())

    def status(self):
        return self.admin.GetServerStatus(apb.GetServerStatusRequest(), metadata=ADMIN)

    def serving(self, service=GENERATION):
        r = self.health.Check(health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def generate(self, req, **kw):
        """-> (chunks, complete)"""
        msgs = list(self.gen.Generate(req, **kw))
        return [m.chunk for m in msgs if m.HasField("chunk")], msgs[-1]

    def kv_blocks_drop_to_zero(self, patience_s=30):
        """Poll until the KV blocks in use are back to zero (they are freed on the engine
        thread, after the client has seen its status)."""
        end = time.monotonic() + patience_s
        while self.status().kv_blocks_used and time.monotonic() < end:
            time.sleep(0.02)
        return self.status().kv_blocks_used == 0


@pytest.fixture(scope="module")
def client(server):
    return Client(server.target)


def greedy(n=8, **kw):
    return pb.GenerateRequest(sampling=pb.SamplingParams(temperature=0, max_new_tokens=n),
                              ignore_eos=True, **kw)


# -- streaming
@contextlib.contextmanager
def engine_held_after_first_token(server, request_id):
    """Hold the engine thread before the step after `request_id`'s first token:
    whatever the client has by then was sent before the later tokens existed."""
    eng = server.app.engine_loop.engine
    real_step, seen, held, release = eng.step, [], threading.Event(), threading.Event()

    def step():
        if seen and not release.is_set():
            held.set()
            release.wait(60)
        outs = real_step()
        seen.extend(o for o in outs if o.request_id == request_id)
        return outs
    eng.step = step
    try:
        yield held
    finally:
        release.set()
        del eng.step


def test_stream_matches_offline_generation_and_arrives_incrementally(client, server, model_dir):
    from moed import LLM, SamplingParams
    n = 40
    with engine_held_after_first_token(server, "stream-1") as held:
        call = client.gen.Generate(greedy(n, text="once upon a time", request_id="stream-1"))
        first = next(call)
        assert held.wait(60)
        listed = {r.request_id: r for r in
                  client.admin.ListRequests(apb.ListRequestsRequest(), metadata=ADMIN).requests}
        assert first.HasField("chunk") and len(first.chunk.token_ids) == 1
        assert listed["stream-1"].completion_tokens == 1
        assert listed["stream-1"].state == apb.REQUEST_STATE_DECODE
    rest = list(call)
    chunks = [first.chunk] + [m.chunk for m in rest if m.HasField("chunk")]
    done = rest[-1].complete
    ref = LLM(model_dir, device="cpu", experts="torch").generate(
        ["once upon a time"], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[0]
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text
    assert done.finish_reason == pb.FINISH_REASON_LENGTH
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == \
        (len(ref.prompt_token_ids), n)
    t = done.timing
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds


def test_token_ids_logprobs_stop_token_and_tokenize(client):
    ids = list(client.gen.Tokenize(pb.TokenizeRequest(text="hello there")).token_ids)
    assert ids
    chunks, end = client.generate(greedy(6, token_ids=pb.TokenIds(ids=ids), logprobs=2))
    toks = [t for c in chunks for t in c.token_ids]
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == toks and all(len(lp.top) == 2 for lp in lps)
    assert all(lp.logprob <= 0 and lp.top[0].token_id == lp.token_id for lp in lps)
    chunks, end = client.generate(greedy(6, token_ids=pb.TokenIds(ids=ids),
                                         stop_token_ids=[toks[2]]))
    assert end.complete.finish_reason == pb.FINISH_REASON_STOP_TOKEN
    assert [t for c in chunks for t in c.token_ids] == toks[:toks.index(toks[2]) + 1]


# -- concurrency
def test_sixteen_concurrent_streams_equal_alone_and_share_steps(client, server):
    prompts = [f"story number {i}: the" for i in range(16)]
    loop = server.app.engine_loop
    steps0, t0 = loop.steps, time.perf_counter()
    alone = [[t for c in client.generate(greedy(12, text=p))[0] for t in c.token_ids]
             for p in prompts]
    sequential_steps, sequential_s = loop.steps - steps0, time.perf_counter() - t0
    together = [None] * 16

    def run(i):
        together[i] = [t for c in client.generate(greedy(12, text=prompts[i]))[0]
                       for t in c.token_ids]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    steps0, t0 = loop.steps, time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_steps, concurrent_s = loop.steps - steps0, time.perf_counter() - t0
    assert together == alone
    # Batched: the 16 streams advance in the same forward steps, so far fewer steps
    # run than one request after another (16 x 12 tokens sequentially).
    assert concurrent_steps * 4 < sequential_steps
    print(f"16 streams: {sequential_s / concurrent_s:.1f}x faster together "
          f"({sequential_steps} -> {concurrent_steps} steps)")


# -- bad requests
def bad_cases(info):
    V, ctx = info.vocab_size, info.context_length
    S = pb.SamplingParams
    text = dict(text="hi")
    return [
        (pb.GenerateRequest(text=""), CODE.INVALID_ARGUMENT, "text"),
        (pb.GenerateRequest(), CODE.INVALID_ARGUMENT, "input"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), CODE.INVALID_ARGUMENT, "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, V])), CODE.INVALID_ARGUMENT, "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * ctx)), CODE.INVALID_ARGUMENT,
         "token_ids"),
        (pb.GenerateRequest(sampling=S(max_new_tokens=ctx), **text), CODE.INVALID_ARGUMENT,
         "sampling.max_new_tokens"),
        (pb.GenerateRequest(sampling=S(max_new_tokens=0), **text), CODE.INVALID_ARGUMENT,
         "sampling.max_new_tokens"),
        (pb.GenerateRequest(sampling=S(temperature=-0.5), **text), CODE.INVALID_ARGUMENT,
         "sampling.temperature"),
        (pb.GenerateRequest(sampling=S(temperature=float("nan")), **text),
         CODE.INVALID_ARGUMENT, "sampling.temperature"),
        (pb.GenerateRequest(sampling=S(temperature=float("inf")), **text),
         CODE.INVALID_ARGUMENT, "sampling.temperature"),
        (pb.GenerateRequest(sampling=S(top_p=0), **text), CODE.INVALID_ARGUMENT, "sampling.top_p"),
        (pb.GenerateRequest(sampling=S(top_p=1.5), **text), CODE.INVALID_ARGUMENT, "sampling.top_p"),
        (pb.GenerateRequest(sampling=S(top_k=-1), **text), CODE.INVALID_ARGUMENT, "sampling.top_k"),
        (pb.GenerateRequest(sampling=S(min_p=1.0), **text), CODE.INVALID_ARGUMENT, "sampling.min_p"),
        (pb.GenerateRequest(sampling=S(repetition_penalty=0), **text), CODE.INVALID_ARGUMENT,
         "sampling.repetition_penalty"),
        (pb.GenerateRequest(sampling=S(presence_penalty=3), **text), CODE.INVALID_ARGUMENT,
         "sampling.presence_penalty"),
        (pb.GenerateRequest(sampling=S(frequency_penalty=-2.5), **text), CODE.INVALID_ARGUMENT,
         "sampling.frequency_penalty"),
        (pb.GenerateRequest(stop=["a"] * 9, **text), CODE.INVALID_ARGUMENT, "stop"),
        (pb.GenerateRequest(stop=["x" * 129], **text), CODE.INVALID_ARGUMENT, "stop[0]"),
        (pb.GenerateRequest(stop=["ok", ""], **text), CODE.INVALID_ARGUMENT, "stop[1]"),
        (pb.GenerateRequest(stop_token_ids=[V + 5], **text), CODE.INVALID_ARGUMENT,
         "stop_token_ids"),
        (pb.GenerateRequest(stop_token_ids=list(range(65)), **text), CODE.INVALID_ARGUMENT,
         "stop_token_ids"),
        (pb.GenerateRequest(logprobs=21, **text), CODE.INVALID_ARGUMENT, "logprobs"),
        (pb.GenerateRequest(prompt_format=7, **text), CODE.INVALID_ARGUMENT, "prompt_format"),
        (pb.GenerateRequest(prompt_format=pb.PROMPT_FORMAT_CHAT, token_ids=pb.TokenIds(ids=[1])),
         CODE.INVALID_ARGUMENT, "prompt_format"),
        (pb.GenerateRequest(request_id="x" * 129, **text), CODE.INVALID_ARGUMENT, "request_id"),
        (pb.GenerateRequest(request_id="has space", **text), CODE.INVALID_ARGUMENT, "request_id"),
        (pb.GenerateRequest(text="y" * 4097), CODE.INVALID_ARGUMENT, "text"),
    ]


def test_bad_requests_get_exact_status_naming_the_field(client):
    cases = bad_cases(client.info())
    assert len(cases) >= 20
    good = greedy(3, text="still fine")
    for req, code, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(client.gen.Generate(req))
        assert e.value.code() == code, (field, e.value.details())
        assert field in e.value.details()
        status = rpc_status.from_call(e.value)
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == field
        _, end = client.generate(good)          # the server is unharmed
        assert end.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert client.status().kv_blocks_used == 0


def test_bad_request_never_disturbs_a_running_stream(client):
    call = client.gen.Generate(greedy(30, text="steady stream"))
    first = next(call)
    for req, _, _ in bad_cases(client.info())[:8]:
        with pytest.raises(grpc.RpcError):
            list(client.gen.Generate(req))
    rest = list(call)
    n = len(first.chunk.token_ids) + sum(len(m.chunk.token_ids) for m in rest if m.HasField("chunk"))
    assert n == 30 and rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH


# -- cancel and deadlines
def test_client_cancel_frees_kv_blocks(client, server):
    with engine_held_after_first_token(server, "client-cancel") as held:
        call = client.gen.Generate(greedy(200, text="to be cancelled", request_id="client-cancel"))
        next(call)
        assert held.wait(60) and client.status().kv_blocks_used > 0
        call.cancel()
    assert client.kv_blocks_drop_to_zero()


def test_admin_cancel_ends_stream_cancelled_and_frees_blocks(client, server):
    with engine_held_after_first_token(server, "op-cancel") as held:
        call = client.gen.Generate(greedy(200, text="operator cancels me", request_id="op-cancel"))
        next(call)
        assert held.wait(60) and client.status().kv_blocks_used > 0
        cancel = client.admin.CancelRequest.future(
            apb.CancelRequestRequest(request_id="op-cancel"), metadata=ADMIN)
    cancel.result()
    last = list(call)[-1]
    assert last.complete.finish_reason == pb.FINISH_REASON_CANCELLED
    assert last.complete.usage.completion_tokens < 200
    assert client.kv_blocks_drop_to_zero()
    with pytest.raises(grpc.RpcError) as e:
        client.admin.CancelRequest(apb.CancelRequestRequest(request_id="op-cancel"), metadata=ADMIN)
    assert e.value.code() == CODE.NOT_FOUND and "op-cancel" in e.value.details()


def test_deadline_mid_stream_frees_kv_blocks(client):
    ctx = client.info().context_length
    t0 = time.perf_counter()
    full, _ = client.generate(greedy(ctx // 2, text="deadline"))
    full_s = time.perf_counter() - t0
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for m in client.gen.Generate(greedy(ctx // 2, text="deadline"), timeout=full_s / 3):
            got.append(m)
    assert e.value.code() == CODE.DEADLINE_EXCEEDED
    assert sum(len(m.chunk.token_ids) for m in got) < ctx // 2
    assert client.kv_blocks_drop_to_zero()


# -- admin, health, reflection
def test_admin_token_enforced(client):
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as e:
            client.admin.GetServerStatus(apb.GetServerStatusRequest(), metadata=metadata)
        assert e.value.code() == CODE.UNAUTHENTICATED
    s = client.status()
    assert s.ready and s.model.architecture and s.kv_blocks_total > 0 and s.isa and s.device


def test_status_reports_throughput_and_model(client):
    client.generate(greedy(5, text="count me"))
    s = client.status()
    assert s.tokens_per_second > 0 and s.requests_served > 0 and s.uptime_seconds > 0
    info = client.info()
    assert info.vocab_size > 0 and info.context_length > 0 and info.weight_format
    assert info.architecture == s.model.architecture and info.isa == s.isa


def test_reflection_lists_services(client):
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {GENERATION, "moed.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_drain_finishes_inflight_refuses_new_then_resume(client):
    assert client.serving("") == "SERVING" and client.serving() == "SERVING"
    call = client.gen.Generate(greedy(30, text="in flight during drain"))
    next(call)
    client.admin.Drain(apb.DrainRequest(), metadata=ADMIN)
    try:
        # "" follows readiness, as load balancers and k8s gRPC probes read it
        assert client.serving() == "NOT_SERVING" and client.serving("") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as e:
            client.generate(greedy(3, text="new"))
        assert e.value.code() == CODE.UNAVAILABLE and "draining" in e.value.details()
        assert list(call)[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        client.admin.Resume(apb.ResumeRequest(), metadata=ADMIN)
    assert client.serving() == "SERVING" and client.serving("") == "SERVING"
    assert client.generate(greedy(3, text="after resume"))[1].HasField("complete")


def test_unavailable_while_loading_then_serving(model_dir):
    gate = threading.Event()

    def slow_engine():
        from moed.engine.llm_engine import LLMEngine
        gate.wait(60)
        return LLMEngine(model_dir, device="cpu", max_num_seqs=4, max_num_batched_tokens=32,
                         experts="torch")
    srv = BackgroundServer(server_config(), model_dir, make_engine=slow_engine).start(
        wait_ready=False)
    try:
        c = Client(srv.target)
        assert c.serving("") == "NOT_SERVING" and c.serving() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as e:
            c.generate(greedy(2, text="too early"))
        assert e.value.code() == CODE.UNAVAILABLE and "loading" in e.value.details()
        gate.set()
        srv.call(srv.app.wait_ready())
        assert c.serving() == "SERVING" and c.serving("") == "SERVING"
        assert c.generate(greedy(2, text="now"))[1].HasField("complete")
    finally:
        gate.set()
        srv.stop()


# -- overload
def test_overload_rejects_with_resource_exhausted_and_queued_complete(model_dir):
    cfg = server_config(max_num_seqs=2, max_num_batched_tokens=16, max_waiting=2, num_kv_blocks=8)
    with BackgroundServer(cfg, model_dir) as srv:
        c = Client(srv.target)
        ctx = c.info().context_length
        if ctx > 8 * 16 + 8:        # one request larger than the whole KV cache
            with pytest.raises(grpc.RpcError) as e:
                c.generate(greedy(8 * 16 + 4, text="huge"))
            assert e.value.code() == CODE.RESOURCE_EXHAUSTED and "KV" in e.value.details()
        results = [None] * 10

        def run(i):
            try:
                results[i] = c.generate(greedy(24, text=f"load {i}"))[1].complete
            except grpc.RpcError as err:
                results[i] = err.code()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = [r for r in results if isinstance(r, pb.Complete)]
        rejected = [r for r in results if r == CODE.RESOURCE_EXHAUSTED]
        assert len(done) + len(rejected) == 10 and rejected and len(done) >= 2
        assert all(r.usage.completion_tokens == 24 for r in done)
        assert c.kv_blocks_drop_to_zero()
        assert c.generate(greedy(3, text="after the storm"))[1].HasField("complete")


# -- telemetry
def test_spans_and_metrics_recorded(client, telemetry):
    exporter = telemetry.spans
    exporter.clear()
    long_prompt = " ".join(f"w{i}" for i in range(60))      # > the 64-token step budget
    client.generate(greedy(6, text=long_prompt, request_id="traced"))
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.attributes.get("gen_ai.response.id") == "traced")
    kids = {s.name: s for s in spans if s.parent and s.parent.span_id == root.context.span_id}
    assert set(kids) == {"queue", "prefill", "decode"}
    a = root.attributes
    assert root.name == "text_completion tiny" and a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["gen_ai.request.max_tokens"] == 6
    prompt_tokens = a["gen_ai.usage.input_tokens"]
    assert kids["prefill"].attributes["moed.prefill.chunks"] == -(-prompt_tokens // 64)
    # max_num_batched_tokens set: the planner is off, every step has that budget
    assert kids["prefill"].attributes["moed.prefill.plan"] == "fixed budget"
    assert kids["prefill"].attributes["moed.prefill.where"] == "engine"   # nothing decoding
    assert kids["decode"].attributes["moed.decode.tokens"] == 6
    assert kids["queue"].end_time <= kids["prefill"].start_time <= kids["decode"].start_time
    data = telemetry.metrics.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token",
            "gen_ai.server.request.duration", "gen_ai.client.token.usage"} <= names
