"""`moectl`: drive a moed daemon.

    moectl [--target HOST:PORT] [--json] COMMAND
      generate PROMPT   stream text, then tokens/s and TTFT
      status            server status (admin)        requests   in-flight requests (admin)
      cancel ID         cancel a request (admin)     drain / resume                (admin)
      health            liveness and readiness       models     the loaded model
      bench             N concurrent streams: TTFT/TPOT p50/p99 and throughput
      pack MODEL_DIR    build the packed expert store of a checkpoint ahead of time (local);
                        --verify: check the stores' checksums instead (reads every byte)

--target or MOED_TARGET picks the daemon; admin commands send MOED_ADMIN_TOKEN
(or --token). Exit codes: 0 ok, 1 the daemon said no (status printed), 2 usage.
"""
import argparse
import asyncio
import json
import os
import sys
import time

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moed.cli import bench, tables
from moed.cli.client import Client
from moed.server.gen import admin_pb2 as apb
from moed.server.gen import generation_pb2 as pb

GENERATION = "moed.v1.GenerationService"


def build_parser():
    ap = argparse.ArgumentParser(prog="moectl", description="moed daemon control")
    ap.add_argument("--target", help="HOST:PORT (default $MOED_TARGET or 127.0.0.1:50051)")
    ap.add_argument("--token", help="admin token (default $MOED_ADMIN_TOKEN)")
    ap.add_argument("--ca-file", help="PEM roots for a TLS daemon")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a generation")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--request-id", default="")
    for name in ("status", "requests", "drain", "resume", "models"):
        sub.add_parser(name)
    sub.add_parser("cancel").add_argument("request_id")
    h = sub.add_parser("health")
    h.add_argument("--wait", type=float, default=0, help="poll up to this many seconds for ready")
    b = sub.add_parser("bench", help="concurrent streams: TTFT, TPOT, throughput")
    b.add_argument("--streams", type=int, default=16)
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--output-tokens", type=int, default=32)
    b.add_argument("--mixed", action="store_true",
                   help="the streams decode while long prompts arrive: decode TPOT idle and "
                        "during their prefill, their TTFT against alone")
    b.add_argument("--long-prompt-tokens", type=int, default=2048)
    b.add_argument("--long-prompts", type=int, default=1)
    p = sub.add_parser("pack", help="pack a checkpoint's experts for the CPU engine (local, "
                                    "no daemon)")
    p.add_argument("model_dir")
    p.add_argument("--verify", action="store_true",
                   help="check the checksums of the stores already built (reads them whole)")
    return ap


def generate_request(args):
    s = pb.SamplingParams(max_new_tokens=args.max_new_tokens)
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    return pb.GenerateRequest(
        request_id=args.request_id, text=args.prompt, sampling=s, stop=args.stop,
        ignore_eos=args.ignore_eos,
        prompt_format=pb.PROMPT_FORMAT_CHAT if args.chat else pb.PROMPT_FORMAT_RAW)


def cmd_generate(client, args):
    with client.channel() as ch:
        t0, first, text, done = time.perf_counter(), None, [], None
        for msg in client.generation(ch).Generate(generate_request(args)):
            if msg.HasField("chunk"):
                first = first or time.perf_counter()
                text.append(msg.chunk.text)
                if not args.json:
                    print(msg.chunk.text, end="", flush=True)
            else:
                done = msg
        wall = time.perf_counter() - t0
    c = done.complete
    decode = wall - (first - t0) if first else 0
    n = c.usage.completion_tokens
    summary = {"request_id": done.request_id, "finish_reason": pb.FinishReason.Name(c.finish_reason),
               "prompt_tokens": c.usage.prompt_tokens, "completion_tokens": n,
               "ttft_ms": round(1000 * (first - t0), 2) if first else None,
               "tokens_per_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
               "server_timing": json_format.MessageToDict(c.timing)}
    if args.json:
        print(json.dumps(dict(summary, text="".join(text)), indent=2))
    else:
        print()
        print(f"[{summary['finish_reason']}] {n} tokens, {summary['tokens_per_s']} tok/s, "
              f"TTFT {summary['ttft_ms']} ms", file=sys.stderr)


def cmd_status(client, args):
    with client.channel() as ch:
        r = client.admin(ch).GetServerStatus(apb.GetServerStatusRequest(),
                                             metadata=client.admin_metadata())
    data = {"uptime_s": round(r.uptime_seconds, 1), "ready": r.ready, "draining": r.draining,
            "model": f"{r.model.architecture} ({r.model.weight_format})" if r.ready else "-",
            "device": r.device, "isa": r.isa, "experts": r.model.experts,
            "backends": r.backends or "-", "planner": r.planner or "-",
            "running": r.num_running, "waiting": r.num_waiting,
            "kv_blocks": f"{r.kv_blocks_used}/{r.kv_blocks_total}",
            "kv_blocks_cached": r.kv_blocks_cached,
            "prefix_cache_hit_rate": prefix_hit_rate(r),
            "tokens_per_s_1m": round(r.tokens_per_second, 2), "requests_served": r.requests_served}
    tables.emit(data, args.json)


def prefix_hit_rate(r):
    """Prompt tokens found in the prefix cache, of those looked up ("-" before any)."""
    if not r.prefix_cache_queries:
        return "-"
    return (f"{100 * r.prefix_cache_hits / r.prefix_cache_queries:.1f}% "
            f"({r.prefix_cache_hits}/{r.prefix_cache_queries} tokens)")


def cmd_requests(client, args):
    with client.channel() as ch:
        r = client.admin(ch).ListRequests(apb.ListRequestsRequest(), metadata=client.admin_metadata())
    rows = [{"id": q.request_id, "state": apb.RequestState.Name(q.state).split("_")[-1].lower(),
             "prompt": q.prompt_tokens, "output": q.completion_tokens,
             "age_s": round(q.age_seconds, 2)} for q in r.requests]
    tables.emit(rows, args.json, ["id", "state", "prompt", "output", "age_s"])


def admin_call(method, request):
    def cmd(client, args):
        with client.channel() as ch:
            stub = client.admin(ch)
            r = getattr(stub, method)(request(args), metadata=client.admin_metadata())
        tables.emit(json_format.MessageToDict(r, always_print_fields_with_no_presence=True)
                    or {"ok": True}, args.json)
    return cmd


def cmd_health(client, args):
    deadline = time.monotonic() + args.wait
    with client.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            data = {name or "(server)": _health(stub, name) for name in ("", GENERATION)}
            if data[GENERATION] == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    tables.emit(data, args.json)
    return 0 if data[GENERATION] == "SERVING" else 1


def _health(stub, service):
    try:
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return e.code().name


def cmd_models(client, args):
    with client.channel() as ch:
        # with the admin token the answer includes model_path (the server's disk is theirs)
        r = client.generation(ch).GetModelInfo(pb.GetModelInfoRequest(),
                                               metadata=client.admin_metadata())
    tables.emit(json_format.MessageToDict(r, preserving_proto_field_name=True), args.json)


def cmd_bench(client, args):
    if args.mixed:
        result = asyncio.run(bench.run_mixed(client, args.streams, args.prompt_tokens,
                                             args.long_prompt_tokens, args.long_prompts,
                                             show_progress=not args.json))
    else:
        result = asyncio.run(bench.run_bench(client, args.streams, args.prompt_tokens,
                                             args.output_tokens, show_progress=not args.json))
    tables.emit(result, args.json)


COMMANDS = {
    "generate": cmd_generate, "status": cmd_status, "requests": cmd_requests,
    "cancel": admin_call("CancelRequest", lambda a: apb.CancelRequestRequest(request_id=a.request_id)),
    "drain": admin_call("Drain", lambda a: apb.DrainRequest()),
    "resume": admin_call("Resume", lambda a: apb.ResumeRequest()),
    "health": cmd_health, "models": cmd_models, "bench": cmd_bench,
}


def cmd_pack(args):
    from moed.errors import MoedError
    from moed.backends.cpu.store import pack_model, verify_model
    try:
        if args.verify:
            result = {"model_dir": args.model_dir, "verified": [str(p) for p in
                                                                 verify_model(args.model_dir)]}
        else:
            result = {"model_dir": args.model_dir,
                      "store": str(pack_model(args.model_dir, progress=not args.json))}
    except MoedError as e:
        print(f"moectl: pack: {e}", file=sys.stderr)
        if args.verify and getattr(e, "path", None) and os.path.exists(e.path):
            print(f"moectl: pack: to rebuild it, delete {e.path} and run `moectl pack "
                  f"{args.model_dir}` (or start moed: it packs what is missing)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    elif args.verify:
        print("\n".join(f"checksums ok: {p}" for p in result["verified"]))
    else:
        print(f"packed expert store: {result['store']}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "pack":      # local work: no daemon involved
        return cmd_pack(args)
    client = Client(args.target, args.token, args.ca_file)
    try:
        return COMMANDS[args.command](client, args) or 0
    except grpc.RpcError as e:
        print(f"moectl: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
