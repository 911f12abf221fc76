"""The gRPC daemon: grpc.aio services over one engine thread.

    app.py          MoedServer: binds, health, reflection, drain/resume, shutdown
    engine_loop.py  the thread that owns LLMEngine; commands in, outputs out
    tracked.py      one in-flight request as the server sees it (times, counts)
    generation.py   GenerationService: protobuf <-> engine, nothing else
    admin.py        AdminService (behind auth.py's token check)
    protocol.py     request validation and protobuf conversion
    status.py       moed errors -> gRPC status with the field named
    telemetry.py    OpenTelemetry spans and GenAI metrics
    throughput.py   tokens/s over a sliding window
    background.py   a MoedServer on its own loop thread (embedding, tests)
    gen/            generated protobuf code (tools/gen_protos.py; do not edit)
"""
