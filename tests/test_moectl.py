"""moectl against a real daemon (in-process, tiny model): every command, tables and --json."""
import json

import pytest

from moed.cli import moectl
from moed.cli.bench import percentile
from moed.config import Config
from moed.server.background import BackgroundServer

TOKEN = "ctl-token"


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    cfg = Config(port=0, http_port=0, admin_token=TOKEN, device="cpu", experts="torch",
                 max_num_seqs=16, max_num_batched_tokens=64)
    with BackgroundServer(cfg, tiny_model_dir("qwen3_moe", "bf16")) as srv:
        yield srv.target


def ctl(capsys, target, *args, token=TOKEN):
    rc = moectl.main(["--target", target, "--token", token, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_streams_text_then_prints_speed(capsys, target):
    rc, out, err = ctl(capsys, target, "generate", "hello", "--max-new-tokens", "8",
                       "--temperature", "0", "--ignore-eos")
    assert rc == 0 and out.strip() and "tok/s" in err and "TTFT" in err
    rc, out, _ = ctl(capsys, target, "--json", "generate", "hello", "--max-new-tokens", "8",
                     "--temperature", "0", "--ignore-eos")
    data = json.loads(out)
    assert data["completion_tokens"] == 8 and data["finish_reason"] == "FINISH_REASON_LENGTH"
    assert data["text"] and data["ttft_ms"] >= 0


def test_status_requests_models_health(capsys, target):
    rc, out, _ = ctl(capsys, target, "--json", "status")
    status = json.loads(out)
    assert rc == 0 and status["ready"] is True and status["kv_blocks"].endswith(tuple("0123456789"))
    assert status["backends"].startswith("experts=")          # which backend serves what
    assert status["planner"] not in ("", "-")                  # the prefill planner's choice
    rc, out, _ = ctl(capsys, target, "status")
    assert rc == 0 and "kv_blocks" in out and "isa" in out
    rc, out, _ = ctl(capsys, target, "requests")
    assert rc == 0 and (out.strip() == "(none)" or out.startswith("ID"))
    rc, out, _ = ctl(capsys, target, "--json", "models")
    assert rc == 0 and json.loads(out)["architecture"] and json.loads(out)["model_path"]
    rc, out, _ = ctl(capsys, target, "--json", "models", token="")
    assert rc == 0 and not json.loads(out).get("model_path")      # admin callers only
    rc, out, _ = ctl(capsys, target, "health")
    assert rc == 0 and "SERVING" in out


def test_admin_commands_and_errors(capsys, target):
    rc, _, err = ctl(capsys, target, "status", token="wrong")
    assert rc == 1 and "UNAUTHENTICATED" in err
    rc, _, err = ctl(capsys, target, "cancel", "no-such-request")
    assert rc == 1 and "NOT_FOUND" in err and "no-such-request" in err
    assert ctl(capsys, target, "drain")[0] == 0
    rc, _, err = ctl(capsys, target, "generate", "x")
    assert rc == 1 and "UNAVAILABLE" in err
    rc, out, _ = ctl(capsys, target, "health")
    assert rc == 1 and "NOT_SERVING" in out
    assert ctl(capsys, target, "resume")[0] == 0
    assert ctl(capsys, target, "health")[0] == 0


def test_bench_reports_latency_percentiles_and_throughput(capsys, target):
    rc, out, _ = ctl(capsys, target, "--json", "bench", "--streams", "4", "--prompt-tokens", "8",
                     "--output-tokens", "6")
    r = json.loads(out)
    assert rc == 0 and r["streams"] == 4 and r["total_output_tokens"] == 24
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"]
    assert r["throughput_tok_s"] > 0


def test_unreachable_target_is_an_error_not_a_traceback(capsys):
    rc, _, err = ctl(capsys, "127.0.0.1:1", "models")
    assert rc == 1 and "UNAVAILABLE" in err


def test_percentile_nearest_rank():
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([7], 99) == 7


def test_bench_mixed_reports_decode_latency_during_a_long_prefill(capsys, target):
    rc, out, _ = ctl(capsys, target, "--json", "bench", "--mixed", "--streams", "2",
                     "--prompt-tokens", "8", "--long-prompt-tokens", "200")
    r = json.loads(out)
    assert rc == 0 and r["streams"] == 2 and r["long_prompt_tokens"] == 200
    assert 0 < r["tpot_idle_p50_ms"] <= r["tpot_idle_p99_ms"]
    assert 0 < r["tpot_prefill_p50_ms"] <= r["tpot_prefill_p99_ms"]
    assert r["long_ttft_solo_ms"] > 0 and r["long_ttft_mixed_ms"] > 0
    assert r["tpot_p99_ratio"] > 0 and r["long_ttft_ratio"] > 0
    assert r["total_tokens"] >= 2 * 32 + 1 and r["throughput_tok_s"] > 0
