"""Every client mistake is a status a client can act on (never UNKNOWN or INTERNAL,
no server paths in it), and what goes wrong under one request fails that request
only. Black-box over real gRPC on the tiny Qwen3-MoE model, plus the text stage's
stop strings against the offline engine."""
import json
import shutil
import threading

import grpc
import pytest

from moed import LLM, SamplingParams
from moed.config import Config
from moed.server.background import BackgroundServer
from moed.server.gen import admin_pb2 as apb
from moed.server.gen import generation_pb2 as pb
from test_server_grpc import ADMIN, CODE, Client, greedy, server_config


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_moe", "bf16")


@pytest.fixture(scope="module")
def server(model_dir):
    # the engine in this process: tests break its forward and its postprocess
    srv = BackgroundServer(server_config(tokenizer_processes=1, engine_process=False),
                           model_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.target)


def tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


def rejected(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# -- the text stage
def test_stop_strings_cut_off_the_engine_thread_like_offline(client, server, model_dir):
    assert server.app.engine_loop.engine.detokenize is False    # the text stage's job
    llm = LLM(model_dir, device="cpu", experts="torch")
    p = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    free = llm.generate(["once upon a time"], p)[0].text
    # a stop string that first occurs past the first third of the text
    stop = next(free[i:i + 2] for i in range(len(free) // 3, len(free) - 2)
                if free.find(free[i:i + 2]) == i)
    ref = llm.generate(["once upon a time"], SamplingParams(
        temperature=0, max_new_tokens=40, ignore_eos=True, stop=[stop]))[0]
    chunks, end = client.generate(greedy(40, text="once upon a time", stop=[stop]))
    assert ref.finish_reason == "stop_sequence" and stop not in ref.text
    assert "".join(c.text for c in chunks) == ref.text      # never a character past the stop
    assert tokens(chunks) == ref.token_ids
    assert end.complete.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert end.complete.usage.completion_tokens == len(ref.token_ids)
    assert client.kv_blocks_drop_to_zero()


# -- bad input
def test_undecodable_bytes_are_invalid_argument_naming_the_field(client):
    raw = client.channel.unary_stream("/moed.v1.GenerationService/Generate",
                                      request_serializer=None, response_deserializer=None)
    bad_text = b"\x12\x03a\xff\xfe"                         # field 2 (text): not UTF-8
    e = rejected(lambda: list(raw(bad_text)))
    assert e.code() == CODE.INVALID_ARGUMENT and e.details().startswith("text:")
    bad_stop = pb.GenerateRequest(text="hi").SerializeToString() + b"\x2a\x01\xc3"
    e = rejected(lambda: list(raw(bad_stop)))
    assert e.code() == CODE.INVALID_ARGUMENT and e.details().startswith("stop:")
    e = rejected(lambda: list(raw(b"\x12\x7fshort")))        # truncated
    assert e.code() == CODE.INVALID_ARGUMENT and "moed.v1.GenerateRequest" in e.details()
    tokenize = client.channel.unary_unary("/moed.v1.GenerationService/Tokenize",
                                          request_serializer=None, response_deserializer=None)
    e = rejected(lambda: tokenize(b"\x0a\x01\xff"))
    assert e.code() == CODE.INVALID_ARGUMENT and e.details().startswith("text:")


def test_tiny_sampling_values_are_computed_safely(client):
    base = [t for t in tokens(client.generate(greedy(8, text="tiny values"))[0])]
    S = pb.SamplingParams
    for s in (S(temperature=1e-30, max_new_tokens=8), S(temperature=1e-45, max_new_tokens=8),
              S(temperature=1e-30, top_p=1e-45, max_new_tokens=8),
              S(temperature=1e-30, min_p=0.999999, max_new_tokens=8),
              S(temperature=0.7, repetition_penalty=1e-38, seed=1, max_new_tokens=8),
              S(temperature=1e-30, repetition_penalty=1e38, max_new_tokens=8)):
        chunks, end = client.generate(pb.GenerateRequest(text="tiny values", sampling=s,
                                                         ignore_eos=True))
        assert end.complete.finish_reason == pb.FINISH_REASON_LENGTH, s
        if not s.HasField("repetition_penalty"):    # a near-zero temperature is greedy
            assert tokens(chunks) == base, s


def test_request_ids_are_bounded_where_echoed(client):
    e = rejected(lambda: client.admin.CancelRequest(
        apb.CancelRequestRequest(request_id="x" * 10_000), metadata=ADMIN))
    assert e.code() == CODE.INVALID_ARGUMENT and "x" * 200 not in e.details()


def test_unset_max_new_tokens_is_clipped_to_the_context_left(client):
    ctx = client.info().context_length
    ids = [5] * (ctx - 10)                  # the default 64 would overflow the context
    chunks, end = client.generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                     ignore_eos=True))
    assert end.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert end.complete.usage.completion_tokens == 10 == len(tokens(chunks))
    e = rejected(lambda: client.generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_new_tokens=11))))
    assert e.code() == CODE.INVALID_ARGUMENT and "sampling.max_new_tokens" in e.details()


def test_model_path_only_for_admin_callers(client, model_dir):
    assert client.info().model_path == ""
    assert client.gen.GetModelInfo(pb.GetModelInfoRequest(), metadata=ADMIN).model_path == \
        str(model_dir)
    assert client.status().model.model_path == str(model_dir)


# -- one request's failure is its own
def test_a_step_failure_fails_its_request_only(client, server):
    eng = server.app.engine_loop.engine
    real_run, real_post = eng.runner.run, eng.postprocess

    def run(chunks, last_of=None):          # the forward breaks on any batch holding "bad-fwd"
        if any(seq.request_id == "bad-fwd" for seq, _ in chunks):
            raise RuntimeError("/secret/path: forward broke")
        return real_run(chunks, last_of)

    def postprocess(seq, s):
        if seq.request_id == "bad-post":
            raise ValueError("/secret/path: postprocess broke")
        return real_post(seq, s)
    alone = tokens(client.generate(greedy(30, text="bystander"))[0])
    eng.runner.run, eng.postprocess = run, postprocess
    try:
        results = {}

        def go(rid):
            try:
                results[rid] = tokens(client.generate(greedy(30, text="bystander"
                                                             if rid == "ok" else rid,
                                                             request_id=rid))[0])
            except grpc.RpcError as err:
                results[rid] = err
        threads = [threading.Thread(target=go, args=(rid,)) for rid in ("ok", "bad-fwd",
                                                                       "bad-post")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del eng.runner.run, eng.postprocess
    assert results["ok"] == alone
    for rid in ("bad-fwd", "bad-post"):
        assert results[rid].code() == CODE.INTERNAL and "/secret" not in results[rid].details()
    assert client.kv_blocks_drop_to_zero()


# -- chat templates
def broken_checkpoint(model_dir, tmp_path, template):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if template is None:
        cfg.pop("chat_template")
    else:
        cfg["chat_template"] = template
    path.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("template, code, field", [
    (None, CODE.FAILED_PRECONDITION, "prompt_format"),                        # missing
    ("{% if %}", CODE.INVALID_ARGUMENT, "prompt_format"),                     # does not compile
    ("{% set _ = messages.append(1) %}", CODE.INVALID_ARGUMENT, "prompt_format"),  # unsafe
    ("{{ raise_exception('no users here') }}", CODE.INVALID_ARGUMENT, "text"),     # raises
    ("{{ messages[0]['content'] | int // 0 }}", CODE.INVALID_ARGUMENT, "text"),    # fails to render
])
def test_chat_template_failures_are_the_clients_to_act_on(model_dir, tmp_path, template, code,
                                                         field):
    ckpt = broken_checkpoint(model_dir, tmp_path, template)
    with BackgroundServer(server_config(tokenizer_processes=1), ckpt) as srv:
        c = Client(srv.target)
        e = rejected(lambda: c.generate(greedy(3, text="hi", prompt_format=pb.PROMPT_FORMAT_CHAT)))
        assert e.code() == code and e.details().startswith(f"{field}: "), e.details()
        assert str(tmp_path) not in e.details()
        assert c.generate(greedy(3, text="raw still works"))[1].HasField("complete")


def test_plaintext_beyond_loopback_is_warned_about():
    from moed.server.app import plaintext_exposure
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert plaintext_exposure(Config(host=host)) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "moed.internal"):
        assert "without TLS" in plaintext_exposure(Config(host=host)), host
    assert plaintext_exposure(Config(host="0.0.0.0", tls_cert_file="c", tls_key_file="k")) is None
