"""The `moed` daemon as a process: config errors exit 2 naming the setting; SIGTERM
drains (the in-flight stream finishes, new requests are refused) and exits 0."""
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moed.server.gen import generation_pb2 as pb
from moed.server.gen import generation_pb2_grpc


def moed(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "moed.cli.daemon", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("yaml_text, setting", [
    ("engine:\n  max_num_seqs: -3\n", "engine.max_num_seqs"),
    ("server:\n  colour: blue\n", "server.colour"),
])
def test_invalid_config_exits_2_naming_the_setting(tmp_path, yaml_text, setting):
    path = tmp_path / "moed.yaml"
    path.write_text(yaml_text)
    proc = moed("--config", str(path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and setting in err


def test_missing_model_and_bad_flag_exit_2(tmp_path):
    proc = moed("--model", str(tmp_path / "nothing-here"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "server.model" in err
    proc = moed("--port", "99999", "--model", str(tmp_path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "server.port" in err


def wait_listening(proc):
    """The daemon prints `listening on HOST:PORT` once bound (port 0 picks one)."""
    for line in proc.stderr:
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        if m:
            return f"{m.group(1)}:{m.group(2)}"
    raise AssertionError(f"daemon exited with {proc.wait()} before listening")


def wait_serving(channel, patience_s=120):
    stub = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest(service="moed.v1.GenerationService")
    end = time.monotonic() + patience_s
    while time.monotonic() < end:
        if stub.Check(req).status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.1)
    raise AssertionError("the daemon never became ready")


def test_sigterm_drains_inflight_stream_then_exits_0(tiny_model_dir):
    env = dict(os.environ, MOED_ADMIN_TOKEN="t")
    proc = moed("--model", str(tiny_model_dir("qwen3_moe", "bf16")), "--port", "0",
                "--http-port", "0", "--device", "cpu", "--experts", "torch", env=env)
    try:
        target = wait_listening(proc)
        channel = grpc.insecure_channel(target)
        wait_serving(channel)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        n = 120
        call = stub.Generate(pb.GenerateRequest(
            text="keep going", ignore_eos=True,
            sampling=pb.SamplingParams(temperature=0, max_new_tokens=n)))
        first = next(call)
        proc.send_signal(signal.SIGTERM)
        while "draining" not in proc.stderr.readline():
            pass
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="late")))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)
        got = len(first.chunk.token_ids) + sum(len(m.chunk.token_ids) for m in rest
                                               if m.HasField("chunk"))
        assert got == n and rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_a_prompt_in_the_prefill_worker_and_stops_the_worker(tiny_model_dir):
    import threading
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a prefill worker needs 2 CPUs")
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=1024)
    proc = moed("--model", str(model), "--port", "0", "--http-port", "0", "--device", "cpu",
                "--max-num-batched-tokens", "32", "--max-num-seqs", "8",
                env=dict(os.environ, MOED_ADMIN_TOKEN="t"))
    lines = []
    try:
        target = wait_listening(proc)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        channel = grpc.insecure_channel(target)
        wait_serving(channel)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        greedy = lambda ids, n: pb.GenerateRequest(  # noqa: E731
            token_ids=pb.TokenIds(ids=ids), ignore_eos=True,
            sampling=pb.SamplingParams(temperature=0, max_new_tokens=n))
        stream = stub.Generate(greedy([5, 6, 7], 200))
        next(stream)
        long = stub.Generate(greedy([3 + i % 500 for i in range(600)], 4))  # to the worker
        time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        got = [m for m in long if m.HasField("chunk")]
        rest = list(stream)
        assert sum(len(m.chunk.token_ids) for m in got) == 4
        assert rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=60) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pids = [int(m.group(1)) for line in lines
            for m in [re.search(r"prefill worker \(pid (\d+)\)", line)] if m]
    assert pids, "the daemon started no prefill worker"
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pids[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pids[0]}"), "the worker outlived the daemon"
