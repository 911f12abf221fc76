"""The OpenAI-compatible HTTP API, driven by the official `openai` client (and raw HTTP
for the error cases), beside gRPC on the same daemon, on a tiny Qwen3-MoE model."""
import json
import shutil
import socket
import time

import grpc
import httpx
import pytest

from moed.config import Config
from moed.errors import ConfigError
from moed.server.background import BackgroundServer
from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc
from moed.server.http_api import required_key

openai = pytest.importorskip("openai", reason="the openai client is a test dependency")

PROMPT = "The quick brown fox"
LONG = 200          # tokens a request asks for when the test ends it early


def config(**kw):
    base = dict(port=0, http_port=0, device="cpu", max_num_seqs=8, max_num_batched_tokens=64,
                max_waiting=16, max_prompt_chars=4096, tokenizer_processes=0,
                engine_process=False, prefill_worker="off", admin_token="t")
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_moe", "bf16")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = BackgroundServer(config(served_model_name="tiny"), model_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://127.0.0.1:{server.app.http.port}"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_gen(server):
    channel = grpc.insecure_channel(server.target)
    yield generation_pb2_grpc.GenerationServiceStub(channel)
    channel.close()


def grpc_text(gen, req):
    msgs = list(gen.Generate(req))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


def until(predicate, patience_s=30):
    end = time.monotonic() + patience_s
    while not predicate() and time.monotonic() < end:
        time.sleep(0.02)
    return predicate()


def engine_idle(server):
    loop = server.app.engine_loop
    return lambda: not loop.snapshot.requests and loop.snapshot.stats["kv_blocks_used"] == 0


# -- completions
def test_completion_greedy_matches_grpc(client, grpc_gen):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    text, ids = grpc_text(grpc_gen, pb.GenerateRequest(
        text=PROMPT, sampling=pb.SamplingParams(temperature=0, max_new_tokens=8),
        ignore_eos=True))
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].text == text and len(ids) == 8
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_stream_equals_whole_with_usage(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_token_ids_prompt_and_logprobs(client, server):
    tok = server.app.engine_loop.engine.tokenizer
    ids = tok.encode(PROMPT)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True})
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text.choices[0].text
    lp = by_ids.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == by_ids.choices[0].text
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) <= 2
        assert max(top.values()) == pytest.approx(value, abs=1e-5)   # greedy: the best one


def test_stop_string_cuts_the_text(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"the greedy text {full!r} has no visible characters to stop at")
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.95,
              presence_penalty=0.5, frequency_penalty=0.3, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw, seed=7).choices[0].text
    b = client.completions.create(**kw, seed=7).choices[0].text
    assert a == b


# -- chat
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Tell me about foxes."}]


def test_chat_matches_grpc_conversation(client, grpc_gen):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                       max_completion_tokens=8, extra_body={"ignore_eos": True})
    conv = pb.Conversation(messages=[pb.ChatMessage(**m) for m in MESSAGES])
    text, _ = grpc_text(grpc_gen, pb.GenerateRequest(
        messages=conv, sampling=pb.SamplingParams(temperature=0, max_new_tokens=8),
        ignore_eos=True))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == 8


def test_grpc_conversation_is_the_template_rendering(server, grpc_gen):
    """messages go through the chat template exactly as the tokenizer renders them."""
    tok = server.app.engine_loop.engine.tokenizer
    ids = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    sampling = pb.SamplingParams(temperature=0, max_new_tokens=6)
    conv = pb.Conversation(messages=[pb.ChatMessage(**m) for m in MESSAGES])
    by_messages = grpc_text(grpc_gen, pb.GenerateRequest(messages=conv, sampling=sampling,
                                                         ignore_eos=True))
    by_ids = grpc_text(grpc_gen, pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                    sampling=sampling, ignore_eos=True))
    assert by_messages[1] == by_ids[1]


def test_chat_stream_equals_whole(client):
    kw = dict(model="tiny", messages=MESSAGES[:2], temperature=0, max_tokens=10,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES[:2], temperature=0,
                                       max_tokens=5, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert bytes(c.bytes).decode("utf-8") == c.token


def test_chat_reasoning_comes_apart(client, server, grpc_gen, monkeypatch):
    """A reply written as <think>...</think> answer: the reasoning in reasoning_content
    (and gRPC Chunk.reasoning), the answer in content."""
    tok = server.app.engine_loop.engine.tokenizer
    script = tok.encode("<think>\nfoxes are quick\n</think>\n\nThey jump.",
                        add_special_tokens=False)
    eng = server.app.engine_loop.engine
    real_step = eng.step

    def scripted_step():         # the model "writes" the script, one token a step
        outs = real_step()
        for out in outs:
            n0 = out.num_output_tokens - len(out.new_token_ids)
            out.new_token_ids = [script[(n0 + i) % len(script)]
                                 for i in range(len(out.new_token_ids))]
        return outs
    monkeypatch.setattr(eng, "step", scripted_step)
    kw = dict(model="tiny", messages=MESSAGES[:2], temperature=0, max_tokens=len(script),
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message
    assert whole.content == "They jump."
    assert whole.model_extra["reasoning_content"] == "foxes are quick\n"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "They jump."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) \
        == "foxes are quick\n"
    raw = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=len(script),
                                    temperature=0, extra_body={"ignore_eos": True})
    assert raw.choices[0].text.startswith("<think>")   # completions keep the raw text
    conv = pb.Conversation(messages=[pb.ChatMessage(**m) for m in MESSAGES[:2]])
    msgs = list(grpc_gen.Generate(pb.GenerateRequest(
        messages=conv, ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0, max_new_tokens=len(script)))))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    assert "".join(c.reasoning for c in chunks) == "foxes are quick\n"
    assert "".join(c.text for c in chunks) == "They jump."


def test_models_health_metrics(client, base_url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{base_url}/metrics").text
    for name in ("gen_ai_server_time_to_first_token_seconds_count",
                 "gen_ai_server_time_per_output_token_seconds_count",
                 "gen_ai_server_request_duration_seconds_count", "moed_prompt_tokens_total",
                 "moed_generation_tokens_total", "moed_requests_running",
                 "moed_requests_waiting", "moed_kv_cache_blocks_used",
                 "moed_kv_cache_blocks_total", "moed_prefill_duration_seconds_count"):
        assert name in text, name
    ttft = [line for line in text.splitlines()
            if line.startswith("gen_ai_server_time_to_first_token_seconds_count")]
    assert ttft and float(ttft[0].split()[-1]) >= 1
    assert 'moed_prefill_path="cpu"' in text


# -- errors, as OpenAI shapes them
@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "prompt": PROMPT, "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": PROMPT, "logprobs": 99}, 400, "logprobs"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "echo": True}, 400, "echo"),
    ({"model": "tiny", "prompt": [PROMPT, PROMPT]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 10 ** 6]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x" * 5000}, 400, "prompt"),
    ({"model": "tiny", "prompt": PROMPT, "stop": [""]}, 400, "stop"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
])
def test_completion_errors(base_url, body, status, param):
    r = httpx.post(f"{base_url}/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user"}], "tools": [{"type": "function"}]},
     "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
      "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
      "top_logprobs": 50}, "top_logprobs"),
])
def test_chat_errors(base_url, body, param):
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_bodies_and_routes(base_url, client):
    r = httpx.post(f"{base_url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/completions", content=b"[1, 2]",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.get(f"{base_url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, top_p=5)
    assert e.value.status_code == 400 and "top_p" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PROMPT)


def test_drain_answers_503_and_health_follows(server, base_url, client):
    server.call(server.app.drain())
    try:
        assert httpx.get(f"{base_url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503 and "draining" in str(e.value)
    finally:
        server.call(server.app.resume())
    assert httpx.get(f"{base_url}/health").status_code == 200


# -- a client that goes away frees its request at once
def test_dropped_stream_cancels_and_frees_blocks(client, server):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=LONG,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert server.app.engine_loop.snapshot.requests, "the request should be running"
    stream.close()
    assert until(engine_idle(server)), server.app.engine_loop.snapshot


def test_dropped_whole_request_cancels_and_frees_blocks(server):
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": LONG,
                       "temperature": 0, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.app.http.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert until(lambda: server.app.engine_loop.snapshot.requests), "never admitted"
    sock.close()
    assert until(engine_idle(server)), server.app.engine_loop.snapshot
    outputs = server.app.engine_loop.requests_served
    assert outputs >= 1


# -- authentication
def test_api_key_guards_v1_but_not_health(model_dir):
    with BackgroundServer(config(api_key="sesame"), model_dir) as srv:
        url = f"http://127.0.0.1:{srv.app.http.port}"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=srv.app.served_model_name, prompt=PROMPT,
                                       max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_beyond_loopback_needs_a_key():
    with pytest.raises(ConfigError, match="api_key"):
        required_key(Config(http_host="0.0.0.0"))
    assert required_key(Config(http_host="0.0.0.0", api_key="k")) == "k"
    assert required_key(Config()) is None


def test_http_port_in_use_is_a_config_error(model_dir):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    srv = BackgroundServer(config(http_port=taken.getsockname()[1]), model_dir)
    try:
        with pytest.raises(ConfigError, match="http_port"):
            srv.start()
    finally:
        taken.close()
        srv.stop()


# -- a checkpoint without tokenizer files serves token ids
@pytest.fixture(scope="module")
def ids_only(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ids-only") / "m"
    shutil.copytree(model_dir, d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink(missing_ok=True)
    with BackgroundServer(config(), d) as srv:
        yield srv


def test_token_id_only_checkpoint(ids_only):
    srv = ids_only
    assert srv.app.engine_loop.engine.model_info["has_tokenizer"] is False
    url = f"http://127.0.0.1:{srv.app.http.port}/v1"
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    r = c.completions.create(model="m", prompt=[1, 2, 3], max_tokens=4, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].text == ""
    for call in (lambda: c.completions.create(model="m", prompt="hello"),
                 lambda: c.chat.completions.create(model="m", messages=[
                     {"role": "user", "content": "hi"}])):
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            call()
    channel = grpc.insecure_channel(srv.target)
    gen = generation_pb2_grpc.GenerationServiceStub(channel)
    ids = list(m for m in gen.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2, 3]), ignore_eos=True,
        sampling=pb.SamplingParams(temperature=0, max_new_tokens=3))))
    assert sum(len(m.chunk.token_ids) for m in ids if m.HasField("chunk")) == 3
    assert not gen.GetModelInfo(pb.GetModelInfoRequest()).has_tokenizer
    for req in (pb.GenerateRequest(text="hello"),
                pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]), stop=["x"])):
        with pytest.raises(grpc.RpcError) as e:
            list(gen.Generate(req))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert "no tokenizer" in e.value.details()
    channel.close()


def test_grpc_conversation_errors(grpc_gen):
    for conv, field in ((pb.Conversation(), "messages.messages"),
                        (pb.Conversation(messages=[pb.ChatMessage(content="x")]),
                         "messages.messages[0].role"),
                        (pb.Conversation(messages=[pb.ChatMessage(role="user",
                                                                  content="x" * 5000)]),
                         "messages.messages")):
        with pytest.raises(grpc.RpcError) as e:
            list(grpc_gen.Generate(pb.GenerateRequest(messages=conv)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field), e.value.details()


def test_prefix_cache_hits_show_in_usage_status_and_metrics(client, server, base_url):
    from moed.server.gen import admin_pb2 as apb
    from moed.server.gen import admin_pb2_grpc
    long_chat = [{"role": "system", "content": " ".join(f"rule {i}." for i in range(12))},
                 {"role": "user", "content": "Go on."}]
    kw = dict(model="tiny", messages=long_chat, temperature=0, max_tokens=4,
              extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    assert again.choices[0].message.content == first.choices[0].message.content
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= again.usage.prompt_tokens - 16 > 0, again.usage
    channel = grpc.insecure_channel(server.target)
    status = admin_pb2_grpc.AdminServiceStub(channel).GetServerStatus(
        apb.GetServerStatusRequest(), metadata=(("authorization", "Bearer t"),))
    channel.close()
    assert status.prefix_cache_hits >= cached
    assert status.prefix_cache_queries > status.prefix_cache_hits
    assert status.kv_blocks_cached > 0
    text = httpx.get(f"{base_url}/metrics").text
    hits = [line for line in text.splitlines() if line.startswith("moed_prefix_cache_hits")]
    assert hits and float(hits[0].split()[-1]) >= cached
